"""The built API reference shows every public name with its full signature and types.

``check_api_page(site)`` reads ``site/api/index.html`` (as ``mkdocs build`` writes it)
and returns what is missing: a heading for every public name (``tests/test_docstrings``'s
``public_objects``: what ``tracevene`` re-exports, the public functions of
``iv.metrics`` and ``iv.patching``), under its public path (``tracevene.Model``) or
where it is defined (``tracevene.errors.SiteError``); below each function's and class's
heading, a signature block naming every parameter with its annotation
(``model: Any``) and the return annotation (``-> Program``); a type in every row of the
Parameters / Attributes / Returns / Raises tables; no heading twice; and no Sphinx role
left in the text.

The test builds the site into a temporary directory (``mkdocs build --strict``, a few
seconds), or checks a site already built when ``TRACEVENE_SITE_DIR`` names one (CI
builds it anyway). By hand, on a built site:

    python tests/test_api_page.py /tmp/site
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_docstrings import public_objects  # noqa: E402

_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}


@dataclass
class Item:
    """One piece of the page, in document order."""

    kind: str  # "heading", "signature" or "table"
    id: str = ""
    text: str = ""
    classes: str = ""
    rows: list[list[str]] = field(default_factory=list)


class _Page(HTMLParser):
    """Headings (with ids), signature blocks and section tables, in document order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.items: list[Item] = []
        self.text: list[str] = []
        self._heading: Item | None = None
        self._signature: Item | None = None
        self._div_depth = 0
        self._title: list[str] | None = None
        self._last_title = ""
        self._table: Item | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = a.get("class") or ""
        if tag in _HEADINGS and a.get("id") and self._heading is None:
            self._heading = Item("heading", id=a["id"])
        elif self._heading is not None and tag == "code":
            self._heading.classes += " " + classes
        if tag == "div":
            if self._signature is not None:
                self._div_depth += 1
            elif "doc-signature" in classes.split():
                self._signature = Item("signature")
                self._div_depth = 1
        if tag == "span" and "doc-section-title" in classes.split():
            self._title = []
        if tag == "table":
            self._table = Item("table", id=self._last_title)
            self._last_title = ""
        if self._table is not None:
            if tag == "tr":
                self._table.rows.append([])
            elif tag in ("td", "th"):
                self._cell = []

    def handle_endtag(self, tag):
        if tag in _HEADINGS and self._heading is not None:
            self.items.append(self._heading)
            self._heading = None
        if tag == "div" and self._signature is not None:
            self._div_depth -= 1
            if self._div_depth == 0:
                self._signature.text = " ".join(self._signature.text.split())
                self.items.append(self._signature)
                self._signature = None
        if tag == "span" and self._title is not None:
            self._last_title = "".join(self._title).strip().rstrip(":")
            self._title = None
        if self._table is not None:
            if tag in ("td", "th") and self._cell is not None:
                self._table.rows[-1].append(" ".join("".join(self._cell).split()))
                self._cell = None
            elif tag == "table":
                self.items.append(self._table)
                self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._heading is not None:
            self._heading.text += data
        if self._signature is not None:
            self._signature.text += data
        if self._title is not None:
            self._title.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(html: str) -> _Page:
    """The page's headings, signature blocks and tables."""
    page = _Page()
    page.feed(html)
    page.close()
    for item in page.items:
        if item.kind == "heading":
            item.text = " ".join(item.text.replace("\u00b6", "").split())
    return page


def _signature_of(obj) -> inspect.Signature | None:
    """The signature the page must show, or ``None`` (a class without its own ``__init__``)."""
    if inspect.isclass(obj):
        owner = next(k for k in obj.__mro__ if "__init__" in vars(k))
        if not owner.__module__.startswith("tracevene"):
            return None
    return inspect.signature(obj)


def _expected_params(sig: inspect.Signature) -> list[tuple[str, bool]]:
    """``(text, annotated)`` for each parameter: ``model``, ``*args``, ``**kwargs``."""
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [
        (stars.get(p.kind, "") + p.name, p.annotation is not inspect.Parameter.empty)
        for p in sig.parameters.values()
    ]


def check_page(html: str, objects: dict[str, object]) -> list[str]:
    """What the API page ``html`` lacks for ``objects`` (public path -> object); empty: fine."""
    page = parse(html)
    items = page.items
    index = {item.id: i for i, item in enumerate(items) if item.kind == "heading"}
    problems = []
    ids = [item.id for item in items if item.kind == "heading"]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"{dup}: {ids.count(dup)} headings (documented twice in docs/api.md?)")
    for path, obj in objects.items():
        canonical = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        at = index.get(path, index.get(canonical))
        if at is None:
            problems.append(f"{path}: no heading (id {path!r} or {canonical!r})")
            continue
        heading = items[at]
        short = path.rsplit(".", 1)[-1]
        if short not in heading.text:
            problems.append(f"{path}: heading {heading.text!r} does not name it")
        kind = "class" if inspect.isclass(obj) else "function"
        if f"doc-symbol-{kind}" not in heading.classes:
            problems.append(f"{path}: heading has no {kind} symbol")
        sig = _signature_of(obj)
        if sig is None:
            continue
        block = None
        for item in items[at + 1 :]:
            if item.kind == "heading":
                break
            if item.kind == "signature":
                block = item.text
                break
        if block is None:
            problems.append(f"{path}: no signature block under its heading")
            continue
        if not re.match(rf"{re.escape(short)}\s*\(", block):
            problems.append(f"{path}: signature {block[:60]!r}... is not {short}(...)")
        for text, annotated in _expected_params(sig):
            pattern = rf"(?<![\w*]){re.escape(text)}\s*" + (":" if annotated else r"[,)=:]")
            if not re.search(pattern, block):
                want = f"{text}: <type>" if annotated else text
                problems.append(f"{path}: signature {block!r} lacks {want!r}")
        if not inspect.isclass(obj) and sig.return_annotation is not inspect.Signature.empty:
            if "->" not in block:
                problems.append(f"{path}: signature {block!r} lacks its return type")
    for item in items:
        if item.kind != "table" or not item.rows:
            continue
        header = [h.lower() for h in item.rows[0]]
        if "type" not in header:
            continue
        col = header.index("type")
        for row in item.rows[1:]:
            if len(row) > col and not row[col].strip():
                problems.append(f"{item.id} table: row {row[0]!r} has no type")
    text = "".join(page.text)
    for role in sorted(set(re.findall(r"(?<![\w:]):[a-z]+:`[^`]*`", text))):
        problems.append(f"Sphinx role left in the page: {role}")
    return problems


def check_api_page(site: Path) -> list[str]:
    """What ``site/api/index.html`` lacks (see the module docstring); empty: all there."""
    page = Path(site) / "api" / "index.html"
    if not page.is_file():
        return [f"{page}: no such file (build the site first)"]
    return check_page(page.read_text(encoding="utf-8"), public_objects())


# ---------------------------------------------------------------- the checker itself

_GOOD = """
<h3 id="tracevene.f" class="doc doc-heading"><code class="doc-symbol doc-symbol-function">
</code><span>tracevene.f</span><a class="headerlink">&para;</a></h3>
<div class="doc-signature highlight"><pre><code><span class="nf">f</span>(<span>x</span>:
<span>int</span>, <span>*</span><span>args</span>: Any, y: str = 'a') -&gt; int</code></pre></div>
<div class="doc doc-contents"><p><span class="doc-section-title">Parameters:</span></p>
<table><thead><tr><th>Name</th><th>Type</th><th>Description</th></tr></thead>
<tbody><tr><td><code>x</code></td><td><code>int</code></td><td>An int.</td></tr></tbody>
</table></div>
"""


def f(x: int, *args, y: str = "a") -> int:  # the object _GOOD documents
    """A function."""
    return x


def test_checker_passes_a_good_page():
    assert check_page(_GOOD, {"tracevene.f": f}) == []


@pytest.mark.parametrize(
    "change, message",
    [
        (('id="tracevene.f"', 'id="tracevene.g"'), "no heading"),
        (("doc-symbol-function", "doc-symbol-class"), "no function symbol"),
        (("doc-signature", "doc-other"), "no signature block"),
        (("<span>x</span>:", "<span>x</span>,"), "lacks 'x: <type>'"),
        (("y: str = 'a'", "z: str = 'a'"), "lacks 'y: <type>'"),
        ((") -&gt; int", ")"), "lacks its return type"),
        (("<td><code>int</code></td>", "<td></td>"), "has no type"),
        (("An int.", "An :class:`int`."), "Sphinx role"),
        (("</table></div>", "</table></div>" + _GOOD), "2 headings"),
    ],
)
def test_checker_finds_a_planted_gap(change, message):
    old, new = change
    assert old in _GOOD
    problems = check_page(_GOOD.replace(old, new), {"tracevene.f": f})
    assert any(message in p for p in problems), problems


# ---------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The built site: ``TRACEVENE_SITE_DIR`` if set, else a fresh strict build."""
    prebuilt = os.environ.get("TRACEVENE_SITE_DIR")
    if prebuilt:
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_api_page_shows_every_public_signature(site):
    problems = check_api_page(site)
    assert not problems, "docs/api.md / docstrings:\n" + "\n".join(problems)


def test_the_package_exports_through_one_all_list():
    import types

    import tracevene

    exported = tracevene.__all__
    assert len(exported) == len(set(exported)), "tracevene.__all__ names something twice"
    names = {name.removeprefix("tracevene.") for name in public_objects() if name.count(".") == 1}
    modules = {n for n in exported if isinstance(getattr(tracevene, n), types.ModuleType)}
    assert modules == {"metrics", "patching"}  # the two public submodules
    assert set(exported) - modules == names, (
        "tracevene/__init__.py: every public name it imports must be in __all__ and back"
    )
    star: dict[str, object] = {}
    exec("from tracevene import *", star)
    assert {n for n in star if not n.startswith("__")} == set(exported)


if __name__ == "__main__":
    found = check_api_page(Path(sys.argv[1] if len(sys.argv) > 1 else "site"))
    print("\n".join(found) or "API page: every public name has its heading and signature.")
    sys.exit(1 if found else 0)

"""Every ```python block in the README, docs/ and dsl/SPEC.md runs, like a notebook.

One test case per page. The page's python blocks run in order in one shared
namespace (``__name__ == "__main__"``, as in a notebook), with the working
directory set to a fresh temporary directory. Blocks in other languages (bash,
text, json, ...) are not executed. There is no way to skip a python block: an
example that cannot run does not belong in a python fence.

Snippet includes (``--8<-- "file"``, pymdownx.snippets, resolved against the
same base paths as ``mkdocs.yml``) are handled like this:

* a Markdown file included by a page is collected as a page of its own (so
  ``docs/dsl.md``, which is just ``--8<-- "SPEC.md"``, runs ``dsl/SPEC.md``);
* an include inside a python block is replaced by the file's text before the
  block runs (``--8<-- "recipes/x.py"`` inside a fence runs the recipe).

A failure names the page and the line of the block's opening fence; the
traceback's line numbers are the page's own.
"""

from __future__ import annotations

import linecache
import re
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Mirrors `pymdownx.snippets: base_path` in mkdocs.yml.
SNIPPET_BASE_PATHS = (ROOT, ROOT / "dsl")
PYTHON_LANGUAGES = {"python", "py", "python3"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n]*)$")
_SNIPPET_LINE = re.compile(r"^[ \t]*--8<--[ \t]+(?P<q>[\"'])(?P<target>.+?)(?P=q)[ \t]*$")
_SNIPPET_BLOCK_MARK = re.compile(r"^[ \t]*--8<--[ \t]*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    language: str
    code: str


def _language(info: str) -> str:
    """The language of a fence's info string: ``python``, ``{.python}``, ``python title="x"``."""
    info = info.strip()
    if info.startswith("{"):
        match = re.search(r"\.([\w+-]+)", info)
        return match.group(1).lower() if match else ""
    return info.split(maxsplit=1)[0].lower() if info else ""


def parse_blocks(text: str, page: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order (indented fences included)."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening or (opening["fence"][0] == "`" and "`" in opening["info"]):
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        start, body = i, []
        i += 1
        while i < len(lines) and not closing.match(lines[i]):
            line = lines[i]
            # Remove the fence's own indentation (fences nested in lists, admonitions).
            strip = len(line) - len(line.lstrip(" \t"))
            body.append(line[min(strip, len(indent)) :])
            i += 1
        if i == len(lines):
            raise ValueError(f"{page}:{start + 1}: code fence {fence!r} is never closed")
        blocks.append(Block(page, start + 1, i + 1, _language(opening["info"]), "\n".join(body)))
        i += 1
    return blocks


def _resolve_snippet(target: str) -> Path | None:
    """The file a snippet target names, looked up like pymdownx.snippets does."""
    for base in SNIPPET_BASE_PATHS:
        path = base / target
        if path.is_file():
            return path
    return None


def _split_snippet_target(target: str) -> tuple[str, int | None, int | None]:
    """``file``, ``file:start`` or ``file:start:end`` -> (file, start, end)."""
    parts = target.split(":")
    if len(parts) > 3 or not all(p.isdigit() or p == "" for p in parts[1:]):
        raise ValueError(
            f"snippet {target!r}: only 'file', 'file:start' and 'file:start:end' are supported here"
        )
    numbers = [int(p) if p else None for p in parts[1:]] + [None, None]
    return parts[0], numbers[0], numbers[1]


def _markdown_includes(text: str) -> list[str]:
    """Snippet targets outside code blocks: single-line and block form."""
    fenced: set[int] = set()
    for block in parse_blocks(text, "<page>"):
        fenced.update(range(block.line - 1, block.end))  # 0-based lines of the block
    targets, in_block = [], False
    for number, line in enumerate(text.splitlines()):
        if number in fenced:
            continue
        if _SNIPPET_BLOCK_MARK.match(line):
            in_block = not in_block
        elif in_block and line.strip():
            targets.append(line.strip())
        elif match := _SNIPPET_LINE.match(line):
            targets.append(match["target"])
    return targets


def expand_snippets(code: str, where: str) -> str:
    """Replace single-line snippet includes inside a python block by the file's text."""
    out = []
    for line in code.splitlines():
        if _SNIPPET_BLOCK_MARK.match(line):
            raise ValueError(f'{where}: inside code blocks use the form --8<-- "file"')
        match = _SNIPPET_LINE.match(line)
        if not match:
            out.append(line)
            continue
        name, start, end = _split_snippet_target(match["target"])
        path = _resolve_snippet(name)
        if path is None:
            raise ValueError(f"{where}: snippet {name!r} not found under {SNIPPET_BASE_PATHS}")
        included = path.read_text(encoding="utf-8").splitlines()
        out.extend(included[(start or 1) - 1 : end])
    return "\n".join(out)


def _relative(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


def collect_pages() -> tuple[list[str], list[str]]:
    """Pages to run (paths relative to the repo) and snippet targets that do not resolve."""
    queue = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "dsl" / "SPEC.md"]
    pages: list[str] = []
    missing: list[str] = []
    while queue:
        path = queue.pop(0)
        if not path.is_file() or _relative(path) in pages:
            continue
        pages.append(_relative(path))
        for target in _markdown_includes(path.read_text(encoding="utf-8")):
            name = target.split(":", 1)[0]
            resolved = _resolve_snippet(name)
            if resolved is None:
                missing.append(f"{_relative(path)}: {target}")
            elif resolved.suffix == ".md":
                queue.append(resolved)
    return pages, missing


PAGES, MISSING_SNIPPETS = collect_pages()


def run_page(page: str, text: str) -> int:
    """Run the python blocks of one page in one namespace; return how many ran.

    Raises ``pytest.fail.Exception`` naming the page and the block's line.
    """
    blocks = [b for b in parse_blocks(text, page) if b.language in PYTHON_LANGUAGES]
    namespace = types.ModuleType("__main__", f"python examples of {page}")
    saved_main = sys.modules.get("__main__")
    grad_enabled, default_dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    filenames = []
    sys.modules["__main__"] = namespace
    try:
        for block in blocks:
            where = f"{page}: python block at line {block.line}"
            filename = f"{page} (python block at line {block.line})"
            report = None
            try:
                # Pad so that line numbers in tracebacks are the page's own; register the
                # text with linecache so tracebacks, inspect and nnsight can read it back.
                source = "\n" * block.line + expand_snippets(block.code, where) + "\n"
                linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
                filenames.append(filename)
                exec(compile(source, filename, "exec"), namespace.__dict__)
            except Exception as exc:
                # Drop this harness's own frame from the traceback.
                frames = exc.__traceback__.tb_next if exc.__traceback__ else None
                report = "".join(traceback.format_exception(type(exc), exc, frames))
            if report is not None:
                pytest.fail(f"{where} failed:\n\n{report}", pytrace=False)
    finally:
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
        for filename in filenames:
            linecache.cache.pop(filename, None)
        torch.set_grad_enabled(grad_enabled)
        torch.set_default_dtype(default_dtype)
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
    return len(blocks)


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    run_page(page, text)


def test_pages_are_collected() -> None:
    assert PAGES, "found no documentation pages to check"
    assert "README.md" in PAGES
    if (ROOT / "dsl" / "SPEC.md").is_file():
        assert "dsl/SPEC.md" in PAGES


def test_snippet_includes_resolve() -> None:
    assert not MISSING_SNIPPETS, f"snippet includes that resolve to no file: {MISSING_SNIPPETS}"


# ---------------------------------------------------------------- the harness itself

_SAMPLE = """\
# Sample

```python
x = 1
```

```bash
echo not run
```

!!! note
    ```python title="nested"
    y = x + 1
    ```

~~~{.python .annotate}
z = y * 10
~~~

````text
```python
this is text inside a text block
```
````
"""


def test_parser_finds_languages_lines_and_dedents() -> None:
    blocks = parse_blocks(_SAMPLE, "sample.md")
    assert [(b.language, b.line) for b in blocks] == [
        ("python", 3),
        ("bash", 7),
        ("python", 12),
        ("python", 16),
        ("text", 20),
    ]
    assert blocks[2].code == "y = x + 1"
    assert "this is text" in blocks[4].code


def test_blocks_share_one_namespace_in_order() -> None:
    assert run_page("sample.md", _SAMPLE + "\n```python\nassert z == 20\n```\n") == 4


def test_failure_names_page_and_line() -> None:
    page = "# Broken\n\n```python\nok = True\n```\n\n```python\n\nraise ValueError('boom')\n```\n"
    with pytest.raises(pytest.fail.Exception) as info:
        run_page("broken.md", page)
    message = str(info.value)
    assert "broken.md: python block at line 7 failed" in message
    assert "line 9" in message and "ValueError: boom" in message


def test_snippet_inside_a_python_block_is_expanded() -> None:
    include = ROOT / "dsl" / "SPEC.md"
    if not include.is_file():
        pytest.fail("dsl/SPEC.md is missing")
    code = expand_snippets('--8<-- "SPEC.md:1:1"', "sample.md")
    assert code == include.read_text(encoding="utf-8").splitlines()[0]

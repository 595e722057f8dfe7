"""Docstrings are Markdown with Google-style sections: no Sphinx roles, no reST fields.

The API reference (docs/api.md) is rendered by mkdocstrings from the docstrings as
Markdown, where a Sphinx role such as ``:class:`Model``` shows up literally and a reST
field list (``:param x:``) or a NumPy-style section (``Parameters`` over a line of
dashes) is not turned into a table. Names are written as ``backticked`` code
(``iv.train``, ``Program.run``) and sections as ``Args:`` / ``Returns:`` / ``Raises:``
/ ``Attributes:``.

Two walks: every docstring in the source of ``tracevene/`` (modules, classes and
functions, private ones too, found with ``ast`` so nothing is imported), and the
runtime docstrings of the public API (every name ``tracevene`` re-exports, the public
functions of ``iv.metrics`` and ``iv.patching``, and their members).
"""

from __future__ import annotations

import ast
import inspect
import re
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import tracevene

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tracevene"

# A Sphinx role: ``:class:`x```, ``:py:meth:`x```, ``:ref:`x```, ...
_ROLE = re.compile(r"(?<![\w:`]):(?:[A-Za-z]+:)?[A-Za-z][\w-]*:`")
# A reST field list line: ``:param x:``, ``:returns:``, ``:raises KeyError:``, ...
_FIELD = re.compile(
    r"^[ \t]*:(?:param|parameter|arg|argument|key|keyword|type|returns?|rtype|raises?|"
    r"except|exception|yields?|ytype|ivar|cvar|var|vartype)\b[^:\n]*:",
    re.MULTILINE,
)
# A reST literal-block marker: a line of prose ending in ``::`` (Markdown shows both colons).
_LITERAL = re.compile(r"[^\s:]::[ \t]*$", re.MULTILINE)
# A NumPy-style section: a section title over a line of dashes.
_NUMPY = re.compile(
    r"^[ \t]*(?:Parameters|Other Parameters|Returns|Yields|Raises|Attributes|Examples?|Notes?"
    r"|See Also|Warns|Methods)[ \t]*\n[ \t]*-{3,}[ \t]*$",
    re.MULTILINE,
)


def problems(doc: str) -> list[str]:
    """What in ``doc`` is not Markdown with Google-style sections (empty: fine)."""
    found = [f"Sphinx role {m.group(0)}..." for m in _ROLE.finditer(doc)]
    found += [f"reST field {m.group(0).strip()}" for m in _FIELD.finditer(doc)]
    found += [f"reST literal block {m.group(0).strip()!r}" for m in _LITERAL.finditer(doc)]
    found += [f"NumPy-style section {m.group(0).split()[0]!r}" for m in _NUMPY.finditer(doc)]
    return found


def source_docstrings() -> Iterator[tuple[str, str]]:
    """``(where, docstring)`` for every module, class and function under ``tracevene/``."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), rel)):
            if isinstance(node, kinds):
                doc = ast.get_docstring(node, clean=False)
                if doc is not None:
                    name = getattr(node, "name", "<module>")
                    yield f"{rel}:{getattr(node, 'lineno', 1)} ({name})", doc


def public_objects() -> dict[str, object]:
    """The public API by its public path: ``tracevene.X``, ``tracevene.metrics.X``, ...

    Every name the package re-exports (not its submodules), the public functions of
    ``tracevene.metrics`` and every name in ``tracevene.patching.__all__``.
    """
    objs = {
        f"tracevene.{name}": obj
        for name, obj in vars(tracevene).items()
        if not name.startswith("_") and not isinstance(obj, types.ModuleType)
    }
    metrics = tracevene.metrics
    for name, obj in vars(metrics).items():
        if not name.startswith("_") and inspect.isfunction(obj):
            if obj.__module__ == metrics.__name__:
                objs[f"tracevene.metrics.{name}"] = obj
    for name in tracevene.patching.__all__:
        objs[f"tracevene.patching.{name}"] = getattr(tracevene.patching, name)
    return objs


def public_docstrings() -> Iterator[tuple[str, str]]:
    """``(where, docstring)`` for the public API, its modules and its members."""
    for module in (tracevene, tracevene.metrics, tracevene.patching):
        yield module.__name__, module.__doc__ or ""
    for path, obj in public_objects().items():
        yield path, obj.__doc__ or ""
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                if name.startswith("_") and name != "__init__":
                    continue
                doc = getattr(member, "__doc__", None)
                if isinstance(member, (staticmethod, classmethod)):
                    doc = member.__func__.__doc__
                if isinstance(doc, str) and (callable(member) or isinstance(member, property)):
                    yield f"{path}.{name}", doc


# ---------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(
    "doc",
    [
        "Create with :func:`wrap`.",
        "A :class:`tracevene.Model`.",
        "See :meth:`~tracevene.Program.run`.",
        ":attr:`value` is the tensor.",
        "Keys of :data:`NAMES`.",
        "In :mod:`tracevene.tasks`.",
        "Raises :exc:`KeyError`.",
        "Also :py:class:`Model` and :obj:`x`.",
        "See :ref:`sharing`.",
        "Args:\n    x: a tensor.\n\n:param y: the other one.\n",
        "Run it.\n\n:returns: the result.\n",
        "Run it.\n\nParameters\n----------\nx : int\n",
        "Index a site with it::\n\n    t.layer[0].mlp.out[:, last]\n",
    ],
)
def test_checker_finds_planted_problem(doc):
    assert problems(doc), doc


@pytest.mark.parametrize(
    "doc",
    [
        "Create with ``iv.wrap`` or ``iv.load``.",
        "Args:\n    x: A tensor, e.g. ``t[:, -1]``.\n\nReturns:\n    ``{name: value}``.\n",
        "A site: ``layer.{i}.attn.z:{h}`` (see https://example.org/a:b).",
        "``metric(logits) -> scalar``: the mean, as ``x[:, :2]``.",
        "Example:\n    ```python\n    d = {'a': 1}\n    ```\n",
        "Ratio 1:2, at 10:30, key:value, ``a:b:`` in code.",
        "Every row: ``x[::2]`` and ``x[::]``.\n    y = x[::2]\n",
    ],
)
def test_checker_passes_markdown(doc):
    assert problems(doc) == []


def test_the_walks_find_the_docstrings():
    """The walks must see the API: a walk that finds nothing would pass vacuously."""
    source = dict(source_docstrings())
    assert len(source) > 200
    assert any(where.endswith("(Program)") for where in source)
    public = dict(public_docstrings())
    for path in (
        "tracevene.trace",
        "tracevene.Program.run",
        "tracevene.metrics.iia",
        "tracevene.patching.path_patching",
        "tracevene.SiteError",
    ):
        assert path in public, path
    assert public["tracevene.Program.run"].strip()


# ---------------------------------------------------------------- the docstrings


def test_no_sphinx_markup_in_source_docstrings():
    bad = [f"{where}: {p}" for where, doc in source_docstrings() for p in problems(doc)]
    assert not bad, "write names as ``backticked`` code, sections Google-style:\n" + "\n".join(bad)


def test_no_sphinx_markup_in_public_docstrings():
    bad = [f"{where}: {p}" for where, doc in public_docstrings() for p in problems(doc)]
    assert not bad, "write names as ``backticked`` code, sections Google-style:\n" + "\n".join(bad)


def test_every_public_name_has_a_docstring():
    missing = [path for path, obj in public_objects().items() if not (obj.__doc__ or "").strip()]
    assert not missing, f"public names without a docstring: {missing}"

"""The import rules of docs/architecture.md, read from the source (no import runs).

Module-level imports only: an import under ``if TYPE_CHECKING:`` or inside a function
(``Program.run`` importing the model when it is called) does not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tracevene"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports at module level (runtime only)."""
    module, is_package = _module_name(path), path.name == "__init__.py"
    found: set[str] = set()
    pending = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and not _is_type_checking(node):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody
            pending += [n for h in node.handlers for n in h.body]
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = _target(node, module, is_package)
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # submodules
    return found


def files(package: str) -> list[Path]:
    return sorted((PACKAGE / package).rglob("*.py"))


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _ours(imports: set[str]) -> set[str]:
    return {name for name in imports if _within(name, ("tracevene",))}


@pytest.mark.parametrize("path", files("ir"), ids=lambda p: p.name)
def test_ir_imports_no_runtime_and_no_engine(path):
    engine_side = ("tracevene.runtime", "tracevene.backends")
    bad = {n for n in module_imports(path) if _within(n, engine_side)}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)} at module level"


@pytest.mark.parametrize("path", files("sites"), ids=lambda p: p.name)
def test_sites_import_only_errors_and_sites(path):
    allowed = ("tracevene.errors", "tracevene.sites")
    bad = {n for n in _ours(module_imports(path)) if not _within(n, allowed)}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", files("runtime"), ids=lambda p: p.name)
def test_runtime_imports_no_engine(path):
    bad = {n for n in module_imports(path) if _within(n, ("tracevene.backends",))}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_the_compat_seam_imports_nnsight():
    importers = {
        str(path.relative_to(ROOT))
        for path in PACKAGE.rglob("*.py")
        if any(_within(n, ("nnsight",)) for n in module_imports(path))
    }
    assert importers == {"tracevene/compat/nnsight.py"}


def test_the_reader_sees_relative_imports_and_skips_type_checking(tmp_path, monkeypatch):
    package = tmp_path / "tracevene" / "ir"
    package.mkdir(parents=True)
    (package / "x.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from ..sites.vocab import parse\n"
        "from . import nodes\n"
        "if TYPE_CHECKING:\n"
        "    from ..model import Model\n"
        "def f():\n"
        "    from ..runtime import plan\n"
    )
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    got = _ours(module_imports(package / "x.py"))
    assert got == {
        "tracevene.sites.vocab", "tracevene.sites.vocab.parse",
        "tracevene.ir", "tracevene.ir.nodes",
    }  # fmt: skip

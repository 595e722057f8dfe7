"""The package's layering: the IR stands alone, engines hold only engine code."""

import subprocess
import sys
from pathlib import Path

import tracevene

PACKAGE = Path(tracevene.__file__).parent

# tracevene/__init__.py imports the whole library; a bare parent package stands in
# for it so that what the IR itself pulls in is what shows in sys.modules.
_IMPORT_IR = f"""
import sys, types
pkg = types.ModuleType("tracevene")
pkg.__path__ = [{str(PACKAGE)!r}]
sys.modules["tracevene"] = pkg
import tracevene.ir.nodes, tracevene.ir.program, tracevene.ir.serialize
print(" ".join(sorted(m for m in sys.modules if m.startswith("tracevene."))))
"""


def test_importing_the_ir_loads_no_runtime_engine_or_model():
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_IR], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "tracevene.ir.program" in out  # the probe did import the IR
    loaded = [m for m in out if m.split(".")[1] in ("backends", "runtime", "model", "compat")]
    assert loaded == [], f"importing tracevene.ir loaded {loaded}"


def test_backends_holds_only_the_three_engines():
    files = sorted(p.name for p in (PACKAGE / "backends").glob("*.py"))
    assert files == ["__init__.py", "nnsight.py", "torch_hooks.py", "transformer_lens.py"]


def test_nnsight_internals_are_used_only_in_the_compat_module():
    private = ("STATE", "Controller", "module_body", ".routes", "interleaver.")
    users = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "nnsight.py" or p.parent.name != "compat"
        if any(word in p.read_text() for word in private)
    )
    assert users == []

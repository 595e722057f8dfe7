"""The DSL conformance suite: every program in dsl/conformance/ on every backend.

Each program file (``NN_name.py``: ``MODEL``, ``N_SOURCES``, ``record(model)`` and
optionally ``args(batch, pos)``) is recorded on the wrapped model, run with both
schedules, and every named save (and the base run's logits, or last hidden state for
encoders) is compared with an independent reference from tests/conformance_refs.py
(plain forward hooks on the Hugging Face modules), within float32 rounding of a
forward pass at the magnitude of the compared value (``numerics.MODEL``: the
references run the same math through other call paths and batch shapes).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path
from types import ModuleType

import numerics
import pytest
import torch
from conformance_refs import REFS

import models
import tracevene as iv
from tracevene.runtime.engine import BACKENDS as AVAILABLE

CONFORMANCE = Path(__file__).resolve().parents[1] / "dsl" / "conformance"
PROGRAMS = sorted(CONFORMANCE.glob("[0-9][0-9]_*.py"))
# Programs whose recording must fail (``RAISES``, ``MATCH``) have no reference.
REFUSED = {p for p in PROGRAMS if "\nRAISES = " in p.read_text()}
BACKENDS = ["torch", "nnsight", "transformer_lens"]
SCHEDULES = ["sequential", "batched"]
BATCH, POS = 2, 6

# Same token count (8 with [CLS]/[SEP]) in every sentence, so runs can share a batch.
MINILM_TEXT = [
    ["Mary gave the book to John", "Tom gave a pen to Alice"],
    ["James sent the letter to Bob", "Alice gave the cup to Tom"],
    ["John took the pen from Mary", "Bob sent a book to James"],
]


@functools.cache
def _program_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"conformance_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _hf_model(name: str) -> torch.nn.Module:
    return models.minilm() if name == "minilm" else models.DECODERS[name]()


@functools.cache
def _minilm_ids(i: int) -> torch.Tensor:
    return models.minilm_tokenizer()(MINILM_TEXT[i], return_tensors="pt")["input_ids"]


def _inputs(name: str, n_sources: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    if name == "minilm":
        return _minilm_ids(0), [_minilm_ids(1 + i) for i in range(n_sources)]
    base = models.tokens(BATCH, POS, seed=1)
    return base, [models.tokens(BATCH, POS, seed=2 + i) for i in range(n_sources)]


def _args(module: ModuleType) -> dict:
    return module.args(BATCH, POS) if hasattr(module, "args") else {}


@functools.cache
def _expected(path: Path, name: str | None = None) -> dict[str, torch.Tensor]:
    """The reference results of a program on its own model, or on the model ``name``."""
    module = _program_module(path)
    name = name or module.MODEL
    base, sources = _inputs(name, module.N_SOURCES)
    return REFS[path.stem](_hf_model(name), base, sources, **_args(module))


def test_suite_is_complete():
    assert len(PROGRAMS) >= 25, f"only {len(PROGRAMS)} conformance programs"
    missing = [p.stem for p in PROGRAMS if p.stem not in REFS and p not in REFUSED]
    assert not missing, f"programs without a reference in conformance_refs.py: {missing}"
    stale = sorted(set(REFS) - {p.stem for p in PROGRAMS})
    assert not stale, f"references without a program: {stale}"


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: p.stem)
def test_reference_is_not_a_clean_run(path: Path):
    """Guards the references themselves: every program that writes changes the output."""
    if path in REFUSED:
        pytest.skip("a program whose recording is refused")
    module = _program_module(path)
    program = module.record(iv.wrap(_hf_model(module.MODEL), backend="torch"))
    if not any(n.op == "write" for n in program.nodes):
        pytest.skip("a read-only program")
    base, _ = _inputs(module.MODEL, module.N_SOURCES)
    with torch.no_grad():
        clean = _hf_model(module.MODEL)(input_ids=base)
    expected = _expected(path)
    fields = [k for k in expected if k.startswith("output.")]
    assert fields, "the reference should return the base run's output"
    for key in fields:
        got, want = expected[key], getattr(clean, key.removeprefix("output."))
        assert not torch.allclose(got, want, atol=1e-4), f"{key} did not change"


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: p.stem)
def test_program_file_is_well_formed(path: Path):
    module = _program_module(path)
    doc = (module.__doc__ or "").strip()
    assert doc, f"{path.name} needs a module docstring saying what it exercises"
    assert module.MODEL == "minilm" or module.MODEL in models.DECODERS
    assert isinstance(module.N_SOURCES, int)
    assert isinstance(getattr(module, "MAGNITUDE", 0.0), float)
    assert callable(module.record)
    imports = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imports |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imports.add((node.module or "").split(".")[0])
    assert imports <= {"torch", "tracevene", "__future__"}, imports


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: p.stem)
def test_program_matches_reference(path: Path, schedule: str, backend: str):
    if backend not in AVAILABLE:
        pytest.skip(f"backend {backend!r} is not available in this version of tracevene")
    module = _program_module(path)
    model = iv.wrap(_hf_model(module.MODEL), backend=backend)
    if path in REFUSED:
        with pytest.raises(getattr(iv, module.RAISES), match=module.MATCH):
            module.record(model)
        return
    _check_program(module, model, _expected(path), module.MODEL, schedule)


#: Programs that also run on the architectures added as table entries, by the sites they
#: use (every site kind written, or read, in one program): (program, architecture) pairs.
_EVERY_SITE = ["qwen3", "gemma2", "olmo2", "gemma3"]
_PARALLEL = ["gptj"]  # no resid_mid: NeoX's every-site program
MORE_ARCHS = [
    *((stem, arch) for stem in ("44_llama_every_site", "47_mistral_read_every_site")
      for arch in _EVERY_SITE),
    *(("45_neox_every_site", arch) for arch in _PARALLEL),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("stem", "arch"), MORE_ARCHS, ids=[f"{s}-{a}" for s, a in MORE_ARCHS])
def test_program_on_more_architectures(stem: str, arch: str, schedule: str, backend: str):
    """A conformance program recorded and run on another architecture than its own."""
    path = CONFORMANCE / f"{stem}.py"
    module = _program_module(path)
    model = iv.wrap(_hf_model(arch), backend=backend)
    _check_program(module, model, _expected(path, arch), arch, schedule)


def _check_program(module: ModuleType, model: iv.Model, expected: dict, name: str,
                   schedule: str) -> None:  # fmt: skip
    """Record ``module``'s program on ``model`` (built from model ``name``), run it with
    ``schedule`` and compare every save and the output with ``expected``."""
    program = module.record(model)
    assert isinstance(program, iv.Program)
    assert program.n_sources == module.N_SOURCES
    assert program.saves, f"{module.__name__} saves nothing to compare"
    assert set(program.saves) == {k for k in expected if not k.startswith("output.")}

    base, sources = _inputs(name, module.N_SOURCES)
    result = program.run(model, base, sources, schedule=schedule, **_args(module))

    magnitude = getattr(module, "MAGNITUDE", 0.0)
    for save in program.saves:
        _assert_close(result[save], expected[save], save, magnitude)
    for key in (k for k in expected if k.startswith("output.")):
        got = getattr(result.output, key.removeprefix("output."))
        _assert_close(got, expected[key], key, magnitude)


def _assert_close(got: torch.Tensor, want: torch.Tensor, name: str, magnitude: float) -> None:
    """Within float32 rounding at the larger of the value's own magnitude and the
    program's ``MAGNITUDE`` (the largest intermediate it creates, where it sets one)."""
    got = got.detach()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    if got.dtype == torch.bool:
        assert torch.equal(got, want), f"{name}: boolean values differ"
        return
    scale = max(numerics.magnitude(want), magnitude)
    numerics.assert_close(got, want, what=f"{name}: program vs plain-hook reference", scale=scale)

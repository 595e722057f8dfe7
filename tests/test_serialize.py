"""Programs on disk: round trips, the JSON schema, damaged directories, atomic writes,
and loading that never runs code from the files (program.json + tensors.safetensors).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import models
import tracevene as iv
from tracevene.interventions import registry
from tracevene.ir import nodes as ir_nodes
from tracevene.ir import serialize

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "dsl" / "schema" / "program.v1.json"
B, P, D = 2, 6, 32


@iv.register("test_serialize.Shift")
class Shift(nn.Module):
    """A user intervention: ``x * scale + bias`` with a learned bias."""

    def __init__(self, d: int, init: float = 0.0):
        super().__init__()
        self.d, self.init = d, init
        self.bias = nn.Parameter(torch.full((d,), init))
        self.register_buffer("count", torch.arange(d, dtype=torch.int64))

    def spec(self) -> dict:
        return {"d": self.d, "init": self.init}

    @classmethod
    def from_spec(cls, spec: dict) -> Shift:
        return cls(**spec)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x * scale + self.bias + self.count.to(x.dtype) * 0.01


class Unregistered(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> iv.Model:
    return iv.wrap(models.gpt2(), backend="torch")


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return {
        "base": models.tokens(B, P, seed=1),
        "source": models.tokens(B, P, seed=2),
        "pos": torch.tensor([1, 4]),
    }


def record_everything(model: iv.Model) -> iv.Program:
    """A program that uses every op and every argument encoding."""
    torch.manual_seed(3)
    lin = nn.Linear(D, D)
    shift = Shift(D, init=0.25)
    with torch.no_grad():
        shift.bias.add_(torch.randn(D))
    rows = torch.arange(B)  # an index tensor (const)
    with iv.trace(model) as t:
        src = t.source()
        pos = t.arg("pos")  # placeholder
        h = t.layer[0].resid_post[:, -1]  # slice with None, negative int
        every_other = src.layer[1].mlp.out[..., 1:None:2]  # Ellipsis, step
        window = t.layer[0].resid_pre[:, -4:-1:2]  # negative start / stop with a step
        unsqueezed = h[:, None]  # None in an index
        at_pos = t.layer[0].resid_pre[rows, pos]  # index tensor + placeholder
        head = src.layer[1].attn.head[2].z[:, -1]
        mlp0 = t.module("transformer.h.0.mlp").output[:, 0]
        # writes: from a source, with a tensor index, through +=
        t.layer[1].mlp.out[:, -2:] = src.layer[1].mlp.out[:, -2:]
        t.layer[2].resid_pre[rows, pos] = at_pos * 0.5
        t.layer[2].resid_post += 1.0
        # torch functions with kwargs (a dtype, a string, a list, non-finite floats)
        torch.softmax(t.layer[2].attn.out, dim=-1, dtype=torch.float64).save("softmax")
        torch.cat([h, at_pos, head.reshape(B, -1)], dim=-1).save("cat")
        clamped = torch.clamp(h, min=float("-inf"), max=float("inf"))
        no_nan = torch.fmax(clamped, torch.full_like(h, float("nan")))
        gelu = torch.nn.functional.gelu(no_nan, approximate="tanh")
        # tensor methods with tuple / bool / dtype arguments
        gelu.reshape((B, 4, 8)).transpose(1, 2).sum(-1, keepdim=True).to(torch.float64).save(
            "methods"
        )
        # modules: nn.Linear (registered as torch.nn.Linear) and a registered user class
        y = lin(h)
        z = shift(y, scale=0.5)
        (z @ h.T).save("modules")
        # setitem on a computed value
        w = h.clone()
        w[:, 0] = 0.0
        w[:, 1:3] = y[:, 1:3]
        w.save()  # unnamed save
        (every_other.norm(dim=-1) - mlp0.mean()).save("src")
        window.mean().save("window")
        unsqueezed.save("unsqueezed")
        t.logits.save("logits")
    return t.program


@pytest.fixture(scope="module")
def program(model) -> iv.Program:
    return record_everything(model)


@pytest.fixture(scope="module")
def saved(program, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("saved") / "program"
    program.save(directory)
    return directory


def run(program: iv.Program, model: iv.Model, inputs: dict) -> iv.Result:
    return program.run(model, inputs["base"], [inputs["source"]], pos=inputs["pos"])


def assert_same_results(a: iv.Result, b: iv.Result) -> None:
    assert a.saves.keys() == b.saves.keys()
    for name in a.saves:
        assert torch.equal(a.saves[name], b.saves[name]), name
    assert a.values.keys() == b.values.keys()
    for key in a.values:
        assert torch.equal(a.values[key], b.values[key]), key
    assert torch.equal(a.output.logits, b.output.logits)


def _encodings(x, out: set[str]) -> set[str]:
    """Every argument encoding used in a JSON argument."""
    if isinstance(x, list):
        out.add("list")
        for v in x:
            _encodings(v, out)
    elif isinstance(x, dict):
        ((kind, v),) = x.items()
        out.add(kind)
        if kind in ("slice", "tuple"):
            for item in v:
                _encodings(item, out)
    else:
        out.add(type(x).__name__)
    return out


# -- round trip ---------------------------------------------------------------------------
def test_recorded_program_covers_every_op_and_encoding(program, saved):
    assert {n.op for n in program.nodes} == set(ir_nodes.OPS)
    graph = json.loads((saved / "program.json").read_text())
    used: set[str] = set()
    for node in graph["nodes"]:
        for arg in [*node["args"], *node.get("kwargs", {}).values()]:
            _encodings(arg, used)
    expected = {"ref", "slice", "tuple", "ellipsis", "dtype", "float", "list"}
    assert expected | {"NoneType", "bool", "int", "str"} <= used
    assert {f["float"] for f in _find(graph, "float")} == {"inf", "-inf", "nan"}
    assert {m["type"] for m in graph["modules"].values()} == {
        "torch.nn.Linear",
        "test_serialize.Shift",
    }
    assert {n["target"] for n in graph["nodes"] if n["op"] == "call_method"} >= {
        "reshape",
        "transpose",
        "sum",
        "to",
        "clone",
        "t",
        "norm",
        "mean",
    }


def _find(x, kind: str) -> list:
    if isinstance(x, dict):
        hits = [x] if kind in x and len(x) == 1 else []
        return hits + [h for v in x.values() for h in _find(v, kind)]
    if isinstance(x, list):
        return [h for v in x for h in _find(v, kind)]
    return []


def test_round_trip_equal_program_listing_and_results(program, saved, model, inputs):
    loaded = iv.Program.load(saved)
    assert loaded == program
    assert str(loaded) == str(program)
    assert loaded.args == program.args == ["pos"]
    assert loaded.saves == program.saves
    assert loaded.modules.keys() == program.modules.keys()
    for key, module in program.modules.items():
        twin = loaded.modules[key]
        assert type(twin) is type(module)
        assert registry.describe(twin) == registry.describe(module)
        state, twin_state = module.state_dict(), twin.state_dict()
        assert state.keys() == twin_state.keys()
        for name in state:
            assert torch.equal(state[name], twin_state[name]), (key, name)
            assert state[name].dtype == twin_state[name].dtype
    for key, tensor in program.tensors.items():
        assert loaded.tensors[key].dtype == tensor.dtype
    assert_same_results(run(program, model, inputs), run(loaded, model, inputs))


def test_save_load_save_is_byte_identical(program, saved, tmp_path):
    iv.Program.load(saved).save(tmp_path / "again")
    assert (tmp_path / "again" / "program.json").read_text() == (saved / "program.json").read_text()
    first, second = (
        load_file(tensor_path(saved)),
        load_file(tensor_path(tmp_path / "again")),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_empty_program_round_trips(model, tmp_path):
    with iv.trace(model) as t:
        pass
    t.program.save(tmp_path / "empty")
    loaded = iv.Program.load(tmp_path / "empty")
    assert loaded == t.program and not loaded.nodes and str(loaded) == str(t.program)


def test_aliasing_constants_and_tied_module_weights_can_be_saved(model, tmp_path):
    x = torch.randn(D)
    tied = nn.Linear(D, D)
    tied.bias = nn.Parameter(tied.weight[0])  # bias is a view of the weight
    with iv.trace(model) as t:
        h = t.layer[0].resid_post[:, -1]
        (h + x + x[:]).save("consts")  # two constants sharing memory
        tied(h).save("tied")
    t.program.save(tmp_path / "p")
    loaded = iv.Program.load(tmp_path / "p")
    assert loaded == t.program
    assert torch.equal(loaded.modules["m0"].bias, tied.bias)


def test_loaded_program_runs_identically_in_a_new_process(program, saved, model, inputs, tmp_path):
    """Acceptance: save here, load and run in a fresh interpreter, same numbers."""
    save_file(inputs, tmp_path / "inputs.safetensors")
    out_path = tmp_path / "out.safetensors"
    child = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        from safetensors.torch import load_file, save_file
        import tracevene as iv
        import models
        import test_serialize  # registers test_serialize.Shift, as a user's import would

        inputs = load_file({str(tmp_path / "inputs.safetensors")!r})
        program = iv.Program.load({str(saved)!r})
        model = iv.wrap(models.gpt2(), backend="torch")
        result = program.run(model, inputs["base"], [inputs["source"]], pos=inputs["pos"])
        out = {{f"save/{{k}}": v.clone() for k, v in result.saves.items()}}
        out.update({{f"value/{{k}}": v.clone() for k, v in result.values.items()}})
        out["logits"] = result.output.logits.clone()
        save_file(out, {str(out_path)!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", child], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(out_path)
    ours = run(program, model, inputs)
    expected = {f"save/{k}": v for k, v in ours.saves.items()}
    expected.update({f"value/{k}": v for k, v in ours.values.items()})
    expected["logits"] = ours.output.logits
    assert theirs.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(theirs[key], value), key


# -- schema ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def schema() -> dict:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def _validate(schema: dict, graph: dict) -> None:
    jsonschema.Draft202012Validator(schema).validate(graph)


def test_schema_op_enum_is_the_op_vocabulary(schema):
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$defs"]["op"]["enum"] == list(ir_nodes.OPS)
    assert schema["properties"]["format"]["const"] == serialize.FORMAT
    assert schema["properties"]["version"]["const"] == serialize.VERSION


def test_saved_programs_validate_against_the_schema(schema, saved, model, tmp_path):
    _validate(schema, json.loads((saved / "program.json").read_text()))
    with iv.trace(model) as t:
        pass
    with iv.trace(model) as u:
        u.layer[0].attn.head[1].z[:, 2] = 0.0
        (u.layer[1].mlp.hidden.max(dim=-1)[0].sum() / 3).save()
    for i, prog in enumerate([t.program, u.program]):
        prog.save(tmp_path / str(i))
        _validate(schema, json.loads((tmp_path / str(i) / "program.json").read_text()))


def test_schema_dtype_pattern_accepts_every_torch_dtype(schema):
    pattern = schema["$defs"]["dtype"]["pattern"]
    dtypes = {v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    for dtype in dtypes:
        jsonschema.validate(
            str(dtype).removeprefix("torch."), {"type": "string", "pattern": pattern}
        )


SCHEMA_REJECTS: dict[str, Callable[[dict], None]] = {
    "unknown op": lambda g: g["nodes"][0].update(op="frobnicate"),
    "unknown node field": lambda g: g["nodes"][0].update(extra=1),
    "unknown top field": lambda g: g.update(extra=1),
    "read without run": lambda g: _first(g, "read").pop("run"),
    "write with one argument": lambda g: _first(g, "write")["args"].pop(),
    "bad encoding": lambda g: _first(g, "getitem")["args"].append({"bogus": 1}),
    "slice of two": lambda g: _first(g, "getitem")["args"].append({"slice": [1, 2]}),
    "bad float": lambda g: _first(g, "getitem")["args"].append({"float": "1e999"}),
    "ref to a bool": lambda g: _first(g, "getitem")["args"].append({"ref": True}),
    "function outside the namespaces": lambda g: _first(g, "call_function").update(
        target="os.system"
    ),
    "module without tensors": lambda g: next(iter(g["modules"].values())).pop("tensors"),
    "negative shape": lambda g: next(iter(g["tensors"].values())).update(shape=[-1]),
    "version 2": lambda g: g.update(version=2),
}


@pytest.mark.parametrize("case", list(SCHEMA_REJECTS))
def test_schema_rejects_damaged_graphs(schema, saved, case):
    graph = json.loads((saved / "program.json").read_text())
    SCHEMA_REJECTS[case](graph)
    with pytest.raises(jsonschema.ValidationError):
        _validate(schema, graph)


# -- damaged directories ------------------------------------------------------------------------
def _first(graph: dict, op: str) -> dict:
    return next(n for n in graph["nodes"] if n["op"] == op)


def _edit_graph(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        graph = json.loads((d / "program.json").read_text())
        fn(graph)
        (d / "program.json").write_text(json.dumps(graph))

    return apply


def _edit_tensors(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        blobs = load_file(tensor_path(d))
        fn(blobs)
        save_file(blobs, tensor_path(d))

    return apply


def _set_arg(value) -> Callable[[dict], None]:
    return lambda g: _first(g, "getitem")["args"].__setitem__(1, value)


def _later_ref(g: dict) -> None:
    node = _first(g, "getitem")
    node["args"][0] = {"ref": len(g["nodes"]) - 1}


def _reshape_module_weight(d: Path) -> None:
    """A Linear weight whose file and manifest agree, but not with the module's spec."""
    graph = json.loads((d / "program.json").read_text())
    key = next(k for k, m in graph["modules"].items() if m["type"] == "torch.nn.Linear")
    graph["modules"][key]["tensors"]["weight"]["shape"] = [D, D + 1]
    (d / "program.json").write_text(json.dumps(graph))
    _edit_tensors(lambda b: b.__setitem__(f"module/{key}/weight", torch.zeros(D, D + 1)))(d)


def tensor_path(directory: Path) -> Path:
    """The tensor file ``program.json`` names."""
    graph = json.loads((directory / "program.json").read_text())
    return directory / graph["tensor_file"]["name"]


def _truncate(name: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        path = tensor_path(d) if name == "tensors" else d / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return apply


def _function(name: str) -> Callable[[Path], None]:
    return _edit_graph(lambda g: _first(g, "call_function").update(target=name))


def _method(name: str) -> Callable[[Path], None]:
    return _edit_graph(lambda g: _first(g, "call_method").update(target=name))


NOT_ALLOWED = r"function {!r} is not allowed in a program; allowed are torch\.\*"

DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing program.json": (
        lambda d: (d / "program.json").unlink(),
        r"is not a saved program: program\.json is missing",
    ),
    "truncated JSON": (_truncate("program.json"), r"program\.json is not valid JSON"),
    "not JSON text": (
        lambda d: (d / "program.json").write_bytes(b"\xff\xfe\x00garbage"),
        r"program\.json is not valid JSON",
    ),
    "wrong format field": (
        _edit_graph(lambda g: g.update(format="nnsight-graph")),
        r"is not a tracevene program \(format != 'tracevene-program'\)",
    ),
    "JSON list": (
        lambda d: (d / "program.json").write_text("[]"),
        r"is not a tracevene program",
    ),
    "unknown version": (
        _edit_graph(lambda g: g.update(version=2)),
        r"has version 2; this tracevene reads version 1\. Upgrade tracevene",
    ),
    "unknown op": (
        _edit_graph(lambda g: _first(g, "getitem").update(op="frobnicate")),
        r"\(frobnicate\): unknown op 'frobnicate'; the op vocabulary is arg, const, read",
    ),
    "ref to a later node": (
        _edit_graph(_later_ref),
        r"node %\d+ \(getitem\): refers to %\d+, which is not an earlier node",
    ),
    "ref to itself": (
        _edit_graph(
            lambda g: _first(g, "getitem")["args"].__setitem__(
                0, {"ref": _first(g, "getitem")["id"]}
            )
        ),
        r"refers to %(\d+), which is not an earlier node",
    ),  # fmt: skip
    "run out of range": (
        _edit_graph(lambda g: _first(g, "read").update(run=5)),
        r"\(read\): run 5 is not 0 \(base\) or a source 1\.\.1",
    ),
    "negative n_sources": (
        _edit_graph(lambda g: g.update(n_sources=-1)),
        r"'n_sources' an integer >= 0",
    ),
    "bad site": (
        _edit_graph(lambda g: _first(g, "read").update(target="layer.0.resid_middle")),
        r"\(read\): .*resid_middle",
    ),
    "os.system": (_function("os.system"), NOT_ALLOWED.format("os.system")),
    "builtins.eval": (_function("builtins.eval"), NOT_ALLOWED.format("builtins.eval")),
    "dotted import path": (_function("subprocess.run"), NOT_ALLOWED.format("subprocess.run")),
    "operator.attrgetter": (
        _function("operator.attrgetter"),
        NOT_ALLOWED.format("operator.attrgetter"),
    ),
    "operator.call": (_function("operator.call"), NOT_ALLOWED.format("operator.call")),
    "operator.iadd": (_function("operator.iadd"), NOT_ALLOWED.format("operator.iadd")),
    "torch.load": (_function("torch.load"), NOT_ALLOWED.format("torch.load")),
    "torch.save": (_function("torch.save"), NOT_ALLOWED.format("torch.save")),
    "torch.from_file": (_function("torch.from_file"), NOT_ALLOWED.format("torch.from_file")),
    "torch.set_default_dtype": (
        _function("torch.set_default_dtype"),
        NOT_ALLOWED.format("torch.set_default_dtype"),
    ),
    "torch class": (
        _function("torch.PyTorchFileReader"),
        NOT_ALLOWED.format("torch.PyTorchFileReader"),
    ),
    "private torch function": (_function("torch._C"), NOT_ALLOWED.format("torch._C")),
    "in-place torch function": (
        _function("torch.relu_"),
        r"torch\.relu_ would change a tensor in place",
    ),
    "out= keyword": (
        _edit_graph(
            lambda g: _first(g, "call_function").setdefault("kwargs", {}).update(out={"ref": 0})
        ),
        r"would change a tensor in place \(an in-place function, out= or inplace=True\)",
    ),  # fmt: skip
    "backward": (_method("backward"), r"tensor method 'backward' cannot be used in a program"),
    "add_": (
        _method("add_"),
        r"in-place tensor method 'add_' cannot be used on traced values: use the "
        r"out-of-place 'add'",
    ),
    "__iadd__": (_method("__iadd__"), r"in-place tensor method '__iadd__'.*'__add__'"),
    "__getattribute__": (
        _method("__getattribute__"),
        r"tensor method '__getattribute__' cannot be used in a program",
    ),
    "__class__": (_method("__class__"), r"tensor method '__class__' cannot be used"),
    "__call__ (from the metaclass)": (_method("__call__"), r"'__call__' is not a tensor method"),
    "not a method": (_method("frobnicate"), r"'frobnicate' is not a tensor method"),
    "unknown module type": (
        _edit_graph(lambda g: next(iter(g["modules"].values())).update(type="NoSuchModule")),
        r"unknown intervention type 'NoSuchModule'; registered types: .*torch\.nn\.Linear.*"
        r"import the module that registers it",
    ),
    "module type os.system": (
        _edit_graph(lambda g: next(iter(g["modules"].values())).update(type="os.system")),
        r"unknown intervention type 'os.system'",
    ),
    "bad module spec": (
        _edit_graph(lambda g: next(iter(g["modules"].values())).update(spec={"in_features": 1})),
        r"bad spec \{'in_features': 1\} for torch\.nn\.Linear",
    ),
    "module spec not an object": (
        _edit_graph(lambda g: next(iter(g["modules"].values())).update(spec=[1, 2])),
        r"bad spec \[1, 2\] for torch\.nn\.Linear: expected an object",
    ),
    "module without tensors": (
        _edit_graph(lambda g: next(iter(g["modules"].values())).pop("tensors")),
        r"module 'm0' must be an object with 'type', 'spec' and 'tensors'",
    ),
    "module call without the module": (
        _edit_graph(lambda g: g["modules"].pop("m1")),
        r"\(call_module\): calls module 'm1', which the program lacks",
    ),
    "missing tensor": (
        _edit_tensors(lambda b: b.pop("const/c0")),
        r"tensor 'const/c0' is missing from tensors\.safetensors",
    ),
    "missing module tensor": (
        _edit_tensors(lambda b: b.pop("module/m1/bias")),
        r"tensor 'module/m1/bias' is missing from tensors\.safetensors",
    ),
    "mis-shaped tensor": (
        _edit_tensors(lambda b: b.__setitem__("const/c0", torch.arange(B + 1))),
        r"tensor 'const/c0' has shape \[3\] torch\.int64 in tensors\.safetensors but "
        r"\[2\] int64 in program\.json",
    ),
    "mis-typed tensor": (
        _edit_tensors(lambda b: b.__setitem__("const/c0", torch.zeros(B))),
        r"tensor 'const/c0' has shape \[2\] torch\.float32 in tensors\.safetensors but "
        r"\[2\] int64",
    ),
    "module parameter with the wrong shape": (
        _reshape_module_weight,
        r"module m0: tensor 'weight' has shape \[32, 33\], but its spec gives \[32, 32\]",
    ),
    "const without its tensor": (
        _edit_graph(lambda g: g["tensors"].pop("c0")),
        r"\(const\): uses tensor 'c0', which the program lacks",
    ),
    "truncated safetensors": (
        _truncate("tensors"),
        r"tensors\.[0-9a-f]{16}\.safetensors is damaged or truncated",
    ),
    "empty safetensors": (
        lambda d: tensor_path(d).write_bytes(b""),
        r"tensors\.[0-9a-f]{16}\.safetensors is damaged or truncated",
    ),
    "missing tensor file": (
        lambda d: tensor_path(d).unlink(),
        r"tensors\.[0-9a-f]{16}\.safetensors is missing \(program\.json names it",
    ),
    "unknown encoding": (
        _edit_graph(_set_arg({"bogus": 1})),
        r"bad argument \{'bogus': 1\}",
    ),
    "two-key encoding": (
        _edit_graph(_set_arg({"ref": 0, "slice": [1, 2, 3]})),
        r"bad argument .*: expected one of ref/slice/tuple",
    ),
    "slice of two": (
        _edit_graph(_set_arg({"slice": [1, 2]})),
        r"bad argument \{'slice': \[1, 2\]\}",
    ),
    "ref to a string": (_edit_graph(_set_arg({"ref": "0"})), r"bad argument \{'ref': '0'\}"),
    "ref to a bool": (_edit_graph(_set_arg({"ref": True})), r"bad argument \{'ref': True\}"),
    "dtype that is not one": (
        _edit_graph(_set_arg({"dtype": "Tensor"})),
        r"bad argument \{'dtype': 'Tensor'\}",
    ),
    "finite float tag": (
        _edit_graph(_set_arg({"float": "1e999"})),
        r"bad argument \{'float': '1e999'\}",
    ),
    "unknown node field": (
        _edit_graph(lambda g: _first(g, "getitem").update(code="print(1)")),
        r"node \d+: unknown fields \['code'\]",
    ),
    "unknown top-level field": (
        _edit_graph(lambda g: g.update(pickle="gASV")),
        r"unknown fields \['pickle'\]",
    ),
    "target of the wrong type": (
        _edit_graph(lambda g: _first(g, "read").update(target=5)),
        r"node \d+: 'target' must be a string, got 5",
    ),
    "op of the wrong type": (
        _edit_graph(lambda g: _first(g, "read").update(op=["read"])),
        r"node \d+: 'op' must be a string, got \['read'\]",
    ),
    "node not an object": (
        _edit_graph(lambda g: g["nodes"].__setitem__(0, [1])),
        r"node 0: expected an object with an 'op' field",
    ),
    "ids out of order": (
        _edit_graph(lambda g: g["nodes"].reverse()),
        r"node %0 \(\w+\): has id \d+, expected 0 \(ids follow node order\)",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_directory_raises_program_format_error(saved, tmp_path, case):
    damage, message = DAMAGE[case]
    directory = tmp_path / "damaged"
    shutil.copytree(saved, directory)
    damage(directory)
    with pytest.raises(iv.ProgramFormatError, match=message):
        iv.Program.load(directory)


def test_damage_cases_start_from_a_program_with_the_names_they_edit(saved):
    """Guards the table above: it edits c0 (the index tensor), m0 (Linear), m1 (Shift)."""
    graph = json.loads((saved / "program.json").read_text())
    assert graph["tensors"]["c0"] == {"shape": [B], "dtype": "int64"}
    assert graph["modules"]["m0"]["type"] == "torch.nn.Linear"
    assert graph["modules"]["m1"]["type"] == "test_serialize.Shift"
    assert graph["nodes"][0]["op"] in ("arg", "read")


def test_missing_directory_raises_program_format_error(tmp_path):
    with pytest.raises(iv.ProgramFormatError, match=r"program\.json is missing"):
        iv.Program.load(tmp_path / "nowhere")


def test_eval_chains_from_a_file_are_rejected_at_load(saved, tmp_path):
    """Reflection through allowed names once reached builtins.eval: all of these must fail."""
    chains = {
        "operator": [
            {"id": 0, "op": "const", "target": "c0", "args": []},
            {"id": 1, "op": "call_function", "target": "operator.attrgetter",
             "args": ["__reduce_ex__.__globals__"]},
            {"id": 2, "op": "call_function", "target": "operator.call",
             "args": [{"ref": 1}, {"ref": 0}]},
        ],
        "methods": [
            {"id": 0, "op": "const", "target": "c0", "args": []},
            {"id": 1, "op": "call_method", "target": "__getattribute__",
             "args": [{"ref": 0}, "__reduce_ex__"]},
            {"id": 2, "op": "call_method", "target": "__call__", "args": [{"ref": 1}, "6*7"]},
        ],
    }  # fmt: skip
    for name, chain in chains.items():
        directory = tmp_path / name
        shutil.copytree(saved, directory)
        graph = json.loads((directory / "program.json").read_text())
        graph.update(nodes=chain, modules={}, n_sources=0)
        (directory / "program.json").write_text(json.dumps(graph))
        with pytest.raises(iv.ProgramFormatError, match=r"node %1 \(call_\w+\)"):
            iv.Program.load(directory)


# -- registry --------------------------------------------------------------------------------
def test_unregistered_module_cannot_be_saved(model, tmp_path):
    with iv.trace(model) as t:
        Unregistered()(t.layer[0].resid_post).save("x")
    target = tmp_path / "p"
    with pytest.raises(iv.RegistryError) as info:
        t.program.save(target)
    message = str(info.value)
    assert "cannot save a program that calls a Unregistered" in message
    assert "@tracevene.register()" in message and "spec() and from_spec()" in message
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_registering_a_class_without_spec_fails_with_how_to():
    with pytest.raises(iv.RegistryError, match=r"needs a spec\(\) method"):
        iv.register()(Unregistered)


# -- atomic writes -----------------------------------------------------------------------------
def _leftovers(parent: Path, keep: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != keep)


def _loads(directory: Path) -> bool:
    try:
        iv.Program.load(directory)
    except (iv.ProgramFormatError, OSError):
        return False
    return True


class Interrupted(Exception):
    pass


def _fail_write(monkeypatch, where: str) -> type[BaseException]:
    """Stop the tensor file's write ("save_file") or program.json's ("write_text") half way."""
    real, calls = serialize._write_all, []
    nth, error = (1, Interrupted) if where == "save_file" else (3, KeyboardInterrupt)

    def half(fd, data):
        calls.append(fd)
        if len(calls) != nth:  # the writes: tensor file, README.md, program.json
            return real(fd, data)
        real(fd, data[: len(data) // 2])
        raise error("power cut while writing")

    monkeypatch.setattr(serialize, "_write_all", half)
    return error


@pytest.mark.parametrize("where", ["save_file", "write_text"])
def test_interrupted_save_leaves_nothing_behind(program, tmp_path, monkeypatch, where):
    expected = _fail_write(monkeypatch, where)
    target = tmp_path / "program"
    with pytest.raises(expected):
        program.save(target)
    monkeypatch.undo()
    assert not target.exists() and not _loads(target)
    assert _leftovers(tmp_path, keep="program") == []


@pytest.mark.parametrize("where", ["save_file", "write_text", "final rename"])
def test_failed_overwrite_keeps_the_old_program(program, model, tmp_path, monkeypatch, where):
    with iv.trace(model) as t:
        t.layer[0].resid_post.sum().save("old")
    old = t.program
    target = tmp_path / "program"
    old.save(target)
    if where != "final rename":
        _fail_write(monkeypatch, where)
    else:
        real_replace = os.replace

        def flaky_replace(src, dst):
            if Path(dst).name == "program.json":  # the commit point
                raise Interrupted("power cut while renaming")
            real_replace(src, dst)

        monkeypatch.setattr(serialize.os, "replace", flaky_replace)
    with pytest.raises((Interrupted, KeyboardInterrupt)):
        program.save(target)
    monkeypatch.undo()
    assert iv.Program.load(target) == old
    assert _leftovers(tmp_path, keep="program") == []


def test_overwrite_replaces_a_saved_program(program, model, tmp_path):
    with iv.trace(model) as t:
        t.layer[0].resid_post.sum().save("old")
    target = tmp_path / "program"
    t.program.save(target)
    program.save(target)
    assert iv.Program.load(target) == program
    names = sorted(p.name for p in target.iterdir())
    assert names[:2] == ["README.md", "program.json"] and len(names) == 3
    assert names[2] == tensor_path(target).name
    assert _leftovers(tmp_path, keep="program") == []


def test_save_refuses_to_replace_a_directory_that_is_not_a_program(program, tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"exists and is not a saved program"):
        program.save(target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert _leftovers(tmp_path, keep="results") == []
    empty = tmp_path / "empty"
    empty.mkdir()
    program.save(empty)  # an empty directory is fine
    assert iv.Program.load(empty) == program


# -- loading never runs code from the files -------------------------------------------------------
LOADER_FILES = ["ir/serialize.py", "ir/program.py", "ir/nodes.py", "interventions/registry.py"]
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "importlib",
                     "pkgutil", "runpy", "joblib"}  # fmt: skip
FORBIDDEN_CALLS = {"__import__", "eval", "exec", "compile", "import_module", "load", "loads"}


@pytest.mark.parametrize("path", LOADER_FILES)
def test_loader_source_uses_no_pickle_torch_load_or_imports(path):
    tree = ast.parse((ROOT / "tracevene" / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = {(node.module or "").split(".")[0]} | {a.name for a in node.names}
        else:
            names = set()
        assert not names & FORBIDDEN_MODULES, f"{path}:{node.lineno} imports {names}"
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            owner = getattr(fn, "value", None)
            if name in FORBIDDEN_CALLS:
                # json.loads / safetensors' load_file are fine; torch.load / pickle.loads are not
                assert isinstance(owner, ast.Name) and owner.id == "json", (
                    f"{path}:{node.lineno} calls {ast.unparse(fn)}"
                )
    text = (ROOT / "tracevene" / path).read_text()
    assert "torch.load(" not in text and "pickle.load" not in text


def _payload_module(directory: Path) -> str:
    """A module on sys.path whose import leaves a marker file."""
    name = "tracevene_test_payload_xyz"
    (directory / f"{name}.py").write_text(
        f"open({str(directory / 'IMPORTED')!r}, 'w').write('imported')\n"
        "class Evil:\n    pass\n"
        "def run(*args):\n    return 1\n"
    )
    return name


@pytest.mark.parametrize("where", ["module type", "function", "function namespace"])
def test_dotted_paths_in_the_file_are_never_imported(saved, tmp_path, monkeypatch, where):
    name = _payload_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    directory = tmp_path / "p"
    shutil.copytree(saved, directory)
    graph = json.loads((directory / "program.json").read_text())
    if where == "module type":
        next(iter(graph["modules"].values()))["type"] = f"{name}.Evil"
        message = rf"unknown intervention type '{name}\.Evil'"
    elif where == "function":
        _first(graph, "call_function")["target"] = f"{name}.run"
        message = NOT_ALLOWED.format(f"{name}.run")
    else:
        _first(graph, "call_function")["target"] = f"torch.{name}.run"
        message = NOT_ALLOWED.format(f"torch.{name}.run")
    (directory / "program.json").write_text(json.dumps(graph))
    with pytest.raises(iv.ProgramFormatError, match=message):
        iv.Program.load(directory)
    assert name not in sys.modules
    assert not (tmp_path / "IMPORTED").exists()


def test_loading_imports_nothing_and_never_unpickles(saved, monkeypatch):
    iv.Program.load(saved)  # warm up lazy imports of the package itself

    def refuse(*args, **kwargs):
        raise AssertionError("loading a program must not unpickle or import")

    import pickle

    for owner, attr in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                        (torch, "load")]:  # fmt: skip
        monkeypatch.setattr(owner, attr, refuse)
    real_import = __import__
    imported: list[str] = []

    def watch_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name not in sys.modules:
            imported.append(name)
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr("builtins.__import__", watch_import)
    before = set(sys.modules)
    loaded = iv.Program.load(saved)
    monkeypatch.undo()
    assert loaded.nodes
    assert imported == [] and set(sys.modules) - before == set()


# -- equality of NaN arguments --------------------------------------------------------------------
def test_nan_arguments_compare_equal_after_loading(model, tmp_path):
    with iv.trace(model) as t:
        torch.nan_to_num(t.layer[0].resid_post, nan=float("nan"), posinf=1.0).save("x")
    t.program.save(tmp_path / "p")
    loaded = iv.Program.load(tmp_path / "p")
    assert loaded == t.program
    assert math.isnan(dict(loaded.nodes[1].kwargs)["nan"])


# -- hostile and damaged files: bounded loading, errors that name the file and the node ----------
def _module_program(modules: dict[str, nn.Module]) -> iv.Program:
    """``x -> m0(x) -> ... -> save``: a program that calls each module in turn."""
    nodes = [ir_nodes.Node(0, "arg", "x")]
    for key in modules:
        call = ir_nodes.Node(len(nodes), "call_module", key, args=(ir_nodes.Ref(len(nodes) - 1),))
        nodes.append(call)
    nodes.append(ir_nodes.Node(len(nodes), "save", "y", args=(ir_nodes.Ref(len(nodes) - 1),)))
    return iv.Program(nodes, 0, modules)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A saved program with one small module of each type the hostile specs edit."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("small") / "program"
    _module_program(
        {
            "lin": nn.Linear(8, 8),
            "mean": iv.MeanAblate(torch.randn(8)),
            "mask": iv.SigmoidMask(8),
            "rot": iv.RotatedSpace(8, k=2),
        }
    ).save(directory)
    return directory


def _spec(key: str, **spec) -> Callable[[Path], None]:
    return _edit_graph(lambda g: g["modules"][key]["spec"].update(spec))


#: Specs whose sizes, unchecked, allocate gigabytes (or compute for minutes) before failing.
HOSTILE_SPECS: dict[str, tuple[Callable[[Path], None], str]] = {
    "Linear 40000x40000": (
        _spec("lin", in_features=40000, out_features=40000),
        r"module lin: tensor 'weight' has shape \[8, 8\], but its spec gives \[40000, 40000\]",
    ),
    "MeanAblate of 1e9": (
        _spec("mean", mean={"tensor": [10**9], "dtype": "float32"}),
        r"module mean: tensor 'mean' has shape \[8\], but its spec gives \[1000000000\]",
    ),
    "SigmoidMask d=1e9": (
        _spec("mask", d=10**9),
        r"module mask: tensor 'logits' has shape \[8\], but its spec gives \[1000000000\]",
    ),
    "RotatedSpace d=12000": (
        _spec("rot", d=12000),
        r"module rot: tensor 'rotation\.parametrizations\.weight\.original' has shape "
        r"\[8, 8\], but its spec gives \[12000, 12000\]",
    ),
}

_PEAK = """
import json, resource, sys, time
import tracevene as iv
out = {}
for directory in sys.argv[1:]:
    start = time.perf_counter()
    try:
        iv.Program.load(directory)
        error = None
    except iv.ProgramFormatError as e:
        error = str(e)
    out[directory] = {"s": time.perf_counter() - start, "error": error,
                      "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
print(json.dumps(out))
"""


def _load_in_subprocess(*directories: Path) -> dict:
    """Load each directory in one fresh process: seconds, error, peak RSS after it (KiB)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, *map(str, directories)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hostile_specs_fail_fast_without_allocating(small, tmp_path):
    """Every size in a spec is checked against the file's tensors before anything is built.

    Measured in fresh processes: the peak RSS of loading the valid program and then every
    hostile one stays within 50 MB of loading the valid program alone, and each hostile
    load fails with ProgramFormatError in under a second.
    """
    hostile = []
    for i, (damage, _) in enumerate(HOSTILE_SPECS.values()):
        directory = tmp_path / f"hostile{i}"
        shutil.copytree(small, directory)
        damage(directory)
        hostile.append(directory)
    baseline = _load_in_subprocess(small)[str(small)]
    assert baseline["error"] is None
    runs = _load_in_subprocess(small, *hostile)
    for directory, (case, (_, message)) in zip(hostile, HOSTILE_SPECS.items(), strict=True):
        got = runs[str(directory)]
        assert got["error"] is not None and re.search(message, got["error"]), (case, got)
        assert got["s"] < 1.0, (case, got)
        assert got["peak_kb"] - baseline["peak_kb"] < 50 * 1024, (case, got, baseline)


def test_modules_are_built_on_the_meta_device_before_the_check(small, tmp_path, monkeypatch):
    """The check itself allocates nothing: a hostile spec's module never leaves meta."""
    devices = []
    real = registry.build
    monkeypatch.setattr(
        registry, "build", lambda n, s: devices.append(torch.empty(0).device.type) or real(n, s)
    )
    directory = tmp_path / "hostile"
    shutil.copytree(small, directory)
    HOSTILE_SPECS["Linear 40000x40000"][0](directory)
    with pytest.raises(iv.ProgramFormatError, match=r"spec gives \[40000, 40000\]"):
        iv.Program.load(directory)
    assert devices == ["meta"]


def _nest(depth: int):
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


_DEEP = "[" * 100000 + "]" * 100000


def _raw_text(edit: Callable[[str], str]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / "program.json").write_text(edit((d / "program.json").read_text()))

    return apply


def _number(text: str) -> Callable[[Path], None]:
    """Put ``text`` as a raw JSON number in the getitem node's index."""

    def edit(g: dict) -> None:
        _first(g, "getitem")["args"][1] = "@NUMBER@"

    def apply(d: Path) -> None:
        _edit_graph(edit)(d)
        _raw_text(lambda t: t.replace('"@NUMBER@"', text))(d)

    return apply


def _site(name: str) -> Callable[[Path], None]:
    return _edit_graph(lambda g: _first(g, "read").update(target=name))


def _getitem_node(saved: Path) -> int:
    graph = json.loads((saved / "program.json").read_text())
    return _first(graph, "getitem")["id"]


#: Damage that must be a ProgramFormatError naming program.json and the node (``{node}``:
#: the getitem node that _set_arg / _number edit; ``{read}``: the first read).
LOAD_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "deep JSON": (
        _raw_text(lambda t: t.replace('"nodes": [', '"nodes": [' + _DEEP + ", ", 1)),
        r"program\.json nests arrays or objects too deeply for a program",
    ),
    "deep arguments (900 levels)": (
        _edit_graph(_set_arg(_nest(900))),
        r"program\.json: node {node}: nested deeper than 64 levels",
    ),
    "Infinity": (_number("Infinity"), r"program\.json: node {node}: the number Infinity cannot"),
    "NaN": (_number("NaN"), r"program\.json: node {node}: the number NaN cannot"),
    "1e400": (_number("1e400"), r"program\.json: node {node}: the number 1e400 cannot"),
    "integer past the digit limit": (
        _number("9" * 5000),
        r"program\.json: node {node}: the number 9{{20}}\.\.\.\(5000 characters\) cannot",
    ),
    "integer past 64 bits": (
        _number(str(2**64)),
        r"program\.json: node {node}: the number 18446744073709551616 cannot",
    ),
    "bad argument names the node": (
        _edit_graph(_set_arg({"bogus": 1})),
        r"program\.json: node %{node} \(getitem\): bad argument \{{'bogus': 1\}}",
    ),
    "version true": (
        _edit_graph(lambda g: g.update(version=True)),
        r"has version True; this tracevene reads version 1",
    ),
    "version 1.0": (
        _edit_graph(lambda g: g.update(version=1.0)),
        r"has version 1\.0; this tracevene reads version 1",
    ),
    "Arabic-Indic digit in a site": (
        _site("layer.\u0660.resid_post"),
        r"program\.json: node %{read} \(read\): 'layer\.\u0660\.resid_post' is not a site name",
    ),
    "fullwidth digit in a site": (
        _site("layer.0.attn.head.\uff12.z"),
        r"node %{read} \(read\): 'layer\.0\.attn\.head\.\uff12\.z' is not a site name",
    ),
    "trailing newline in a site": (
        _site("layer.0.resid_post\n"),
        r"node %{read} \(read\): 'layer\.0\.resid_post\\n' is not a site name",
    ),
    "trailing space in a hook site": (
        _site("hook:blocks.0.hook_resid_post "),
        r"node %{read} \(read\): 'hook:blocks\.0\.hook_resid_post ' is not a site name",
    ),
    "space in a module site": (
        _site("module:transformer.h.0 :output"),
        r"node %{read} \(read\): 'module:transformer\.h\.0 :output' is not a site name",
    ),
    "operator.mul of a string": (
        _edit_graph(
            lambda g: _first(g, "call_function").update(
                target="operator.mul", args=["ab", 500000000], kwargs={}
            )
        ),
        r"program\.json: node %\d+ \(call_function\): operator\.mul takes tensors and numbers, "
        r"got the constant 'ab'",
    ),
    "operator.add of lists": (
        _edit_graph(
            lambda g: _first(g, "call_function").update(
                target="operator.add", args=[[1], {"tuple": [2]}], kwargs={}
            )
        ),
        r"operator\.add takes tensors and numbers, got the constant \[1\]",
    ),
    "method called on a constant": (
        _edit_graph(
            lambda g: _first(g, "call_method").update(target="__mul__", args=["ab", 500000000])
        ),
        r"program\.json: node %\d+ \(call_method\): tensor method '__mul__' must be called on "
        r"a computed value \(a ref\), got 'ab'",
    ),
}


@pytest.mark.parametrize("case", list(LOAD_DAMAGE))
def test_damaged_json_raises_program_format_error_naming_file_and_node(saved, tmp_path, case):
    damage, message = LOAD_DAMAGE[case]
    graph = json.loads((saved / "program.json").read_text())
    message = message.format(node=_getitem_node(saved), read=_first(graph, "read")["id"])
    directory = tmp_path / "damaged"
    shutil.copytree(saved, directory)
    damage(directory)
    with pytest.raises(iv.ProgramFormatError, match=message):
        iv.Program.load(directory)


def test_site_grammar_takes_ascii_digits_only():
    from tracevene.sites.vocab import parse

    assert parse("layer.10.attn.head.3.z").head == 3
    assert parse("hook:blocks.0.hook_resid_post").key == "blocks.0.hook_resid_post"
    assert parse("module:transformer.h.0:output").key == "transformer.h.0"
    for bad in ("layer.\u0661.resid_pre", "layer.0.resid_pre\n", "hook:a b", "hook:", "hook:x\n"):
        with pytest.raises(iv.SiteError):
            parse(bad)


# -- dtypes survive saving ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_module_dtypes_survive_saving(tmp_path, dtype):
    torch.manual_seed(0)
    modules = {
        "lin": nn.Linear(8, 8).to(dtype),
        "rot": iv.RotatedSpace(8, k=2).to(dtype),
        "add": iv.Add(torch.randn(8, dtype=dtype), scale=2.0),
        "shift": Shift(8, init=0.5).to(dtype),
    }
    program = _module_program(modules)
    program.save(tmp_path / "p")
    loaded = iv.Program.load(tmp_path / "p")
    x, source = torch.randn(3, 8, dtype=dtype), torch.randn(3, 8, dtype=dtype)
    for key, module in modules.items():
        again = loaded.modules[key]
        assert again.state_dict().keys() == module.state_dict().keys()
        for name, value in module.state_dict().items():
            assert again.state_dict()[name].dtype == value.dtype, (key, name)
            assert torch.equal(again.state_dict()[name], value), (key, name)
        args = (x, source) if key == "rot" else (x,)
        out, out_again = module(*args), again(*args)
        assert out_again.dtype == out.dtype and torch.equal(out_again, out), key
    assert loaded.modules["shift"].count.dtype == torch.int64  # an integer buffer as it was


def test_integer_bool_and_complex_constants_survive_saving(tmp_path):
    tensors = {
        "i": torch.arange(4, dtype=torch.int32),
        "b": torch.tensor([True, False]),
        "c": torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64),
        "u": torch.arange(3, dtype=torch.uint8),
    }
    nodes = [ir_nodes.Node(i, "const", k) for i, k in enumerate(tensors)]
    nodes += [ir_nodes.Node(len(nodes) + i, "save", k, args=(ir_nodes.Ref(i),))
              for i, k in enumerate(tensors)]  # fmt: skip
    iv.Program(nodes, 0, {}, tensors).save(tmp_path / "p")
    loaded = iv.Program.load(tmp_path / "p")
    for key, value in tensors.items():
        assert loaded.tensors[key].dtype == value.dtype and torch.equal(loaded.tensors[key], value)


def test_a_dtype_safetensors_cannot_store_is_refused_before_writing(tmp_path):
    nodes = [ir_nodes.Node(0, "const", "z"), ir_nodes.Node(1, "save", "z", args=(ir_nodes.Ref(0),))]
    program = iv.Program(nodes, 0, {}, {"z": torch.tensor([1 + 2j], dtype=torch.complex128)})
    with pytest.raises(
        iv.ArgumentError,
        match=r"cannot save 'const/z' \(torch\.complex128\): safetensors stores no such dtype"
        r".*complex128 -> complex64.*nothing was written",
    ):
        program.save(tmp_path / "p")
    assert not (tmp_path / "p").exists()


@iv.register("test_serialize.Tied")
class Tied(nn.Module):
    """One weight under two names, a non-persistent buffer, and a value read with .item()."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.full((d,), 2.0), persistent=False)
        self.total = float(self.scale.sum().item())  # cannot run on the meta device

    def spec(self) -> dict:
        return {"d": self.d}

    @classmethod
    def from_spec(cls, spec: dict) -> Tied:
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) * self.scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_user_modules_with_ties_and_non_persistent_buffers_load_whole(tmp_path, dtype):
    torch.manual_seed(0)
    module = Tied(4).to(dtype)
    _module_program({"m": module}).save(tmp_path / "p")
    loaded = iv.Program.load(tmp_path / "p").modules["m"]
    assert loaded.a.weight is loaded.b.weight and loaded.a.weight.dtype == dtype
    assert torch.equal(loaded.scale, torch.full((4,), 2.0, dtype=dtype)) and loaded.total == 8.0
    x = torch.randn(2, 4, dtype=dtype)
    assert torch.equal(loaded(x), module(x))


def test_op_literal_names_exactly_the_op_vocabulary():
    from typing import get_args

    from tracevene.ir.nodes import OPS, Op

    assert list(get_args(Op)) == list(OPS)

"""Programs on disk: versioned JSON for the graph, safetensors for tensors.

Schema: ``dsl/schema/program.v1.json``. No pickle; loading executes no code from
the files; every damaged directory raises :class:`ProgramFormatError`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ProgramFormatError
from ..interventions import registry
from .nodes import Node, Ref
from .program import Program

FORMAT = "tracevene-program"
VERSION = 1
GRAPH_FILE = "program.json"
TENSOR_FILE = "tensors.safetensors"


# -- values <-> JSON -----------------------------------------------------------
def encode(x: Any) -> Any:
    """A node argument as JSON."""
    if isinstance(x, Ref):
        return {"ref": x.id}
    if x is Ellipsis:
        return {"ellipsis": True}
    if isinstance(x, slice):
        return {"slice": [encode(x.start), encode(x.stop), encode(x.step)]}
    if isinstance(x, tuple):
        return {"tuple": [encode(v) for v in x]}
    if isinstance(x, list):
        return [encode(v) for v in x]
    if isinstance(x, torch.dtype):
        return {"dtype": str(x).removeprefix("torch.")}
    if isinstance(x, float) and not math.isfinite(x):
        return {"float": repr(x)}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise ProgramFormatError(f"cannot store argument {x!r} of type {type(x).__name__}")


def decode(x: Any) -> Any:
    """The inverse of :func:`encode`; rejects anything else."""
    if isinstance(x, list):
        return [decode(v) for v in x]
    if not isinstance(x, dict):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise ProgramFormatError(f"bad argument {x!r}")
    if len(x) != 1:
        raise ProgramFormatError(f"bad argument {x!r}: expected one of ref/slice/tuple/...")
    (kind, v), = x.items()
    if kind == "ref" and isinstance(v, int) and not isinstance(v, bool):
        return Ref(v)
    if kind == "ellipsis":
        return Ellipsis
    if kind == "slice" and isinstance(v, list) and len(v) == 3:
        return slice(*(decode(i) for i in v))
    if kind == "tuple" and isinstance(v, list):
        return tuple(decode(i) for i in v)
    if kind == "dtype" and isinstance(getattr(torch, str(v), None), torch.dtype):
        return getattr(torch, v)
    if kind == "float" and v in ("inf", "-inf", "nan"):
        return float(v)
    raise ProgramFormatError(f"bad argument {x!r}")


def node_to_json(node: Node) -> dict:
    """One node as a JSON object."""
    out: dict[str, Any] = {"id": node.id, "op": node.op}
    if node.target is not None:
        out["target"] = node.target
    if node.run is not None:
        out["run"] = node.run
    out["args"] = [encode(a) for a in node.args]
    if node.kwargs:
        out["kwargs"] = {k: encode(v) for k, v in node.kwargs}
    if node.loc:
        out["loc"] = node.loc
    return out


def node_from_json(obj: Any, i: int) -> Node:
    """One node from JSON, with a clear error for missing or odd fields."""
    if not isinstance(obj, dict) or "op" not in obj:
        raise ProgramFormatError(f"node {i}: expected an object with an 'op' field, got {obj!r}")
    unknown = set(obj) - {"id", "op", "target", "run", "args", "kwargs", "loc"}
    if unknown:
        raise ProgramFormatError(f"node {i}: unknown fields {sorted(unknown)}")
    kwargs = obj.get("kwargs", {})
    if not isinstance(kwargs, dict) or not isinstance(obj.get("args", []), list):
        raise ProgramFormatError(f"node {i}: args must be a list and kwargs an object")
    for name, typ in (("id", int), ("op", str), ("target", str), ("run", int), ("loc", str)):
        v = obj.get(name)
        if v is not None and (not isinstance(v, typ) or isinstance(v, bool)):
            kind = "an integer" if typ is int else "a string"
            raise ProgramFormatError(f"node {i}: {name!r} must be {kind}, got {v!r}")
    return Node(
        id=obj.get("id", i),
        op=obj["op"],
        target=obj.get("target"),
        run=obj.get("run"),
        args=tuple(decode(a) for a in obj.get("args", [])),
        kwargs=tuple((k, decode(v)) for k, v in kwargs.items()),
        loc=obj.get("loc", ""),
    )


# -- save ----------------------------------------------------------------------
def save_program(program: Program, directory: Path) -> None:
    """Write ``directory`` atomically: a crash never leaves a loadable half-write."""
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for key, module in program.modules.items():
        name, spec = registry.describe(module)
        state = module.state_dict()
        modules[key] = {"type": name, "spec": spec, "tensors": _manifest(state)}
        tensors.update({f"module/{key}/{k}": v for k, v in state.items()})
    tensors.update({f"const/{k}": v for k, v in program.tensors.items()})
    graph = {
        "format": FORMAT,
        "version": VERSION,
        "n_sources": program.n_sources,
        "nodes": [node_to_json(n) for n in program.nodes],
        "modules": modules,
        "tensors": _manifest(program.tensors),
    }
    text = json.dumps(graph, indent=1)
    _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        # clone: safetensors refuses tensors that share memory (x and x[0], tied weights)
        blobs = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                 for k, v in tensors.items()}  # fmt: skip
        save_file(blobs, tmp / TENSOR_FILE)
        (tmp / GRAPH_FILE).write_text(text)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _manifest(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in tensors.items()
    }


def _check_replaceable(target: Path) -> None:
    """Refuse to replace anything but an earlier saved program (or an empty directory)."""
    if not (target.exists() or target.is_symlink()):
        return
    names = set(os.listdir(target)) if target.is_dir() and not target.is_symlink() else None
    if names is None or not names <= {GRAPH_FILE, TENSOR_FILE}:
        raise FileExistsError(
            f"{target} exists and is not a saved program; program.save() replaces the whole "
            "directory, so it refuses to. Save to a new directory, or remove it first."
        )


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / "x")
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old / "x", target)  # put the old program back
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


# -- load ----------------------------------------------------------------------
def load_program(directory: Path) -> Program:
    """Read and check a program directory."""
    graph = _read_graph(directory)
    blobs = _read_tensors(directory)
    nodes = [node_from_json(obj, i) for i, obj in enumerate(graph["nodes"])]
    consts = {k: _take(blobs, f"const/{k}", m) for k, m in _field(graph, "tensors").items()}
    modules = {}
    for key, entry in _field(graph, "modules").items():
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
            raise ProgramFormatError(
                f"{GRAPH_FILE}: module {key!r} must be an object with 'type', 'spec' and "
                f"'tensors', got {entry!r}"
            )
        module = registry.build(entry.get("type"), entry.get("spec", {}))
        state = {k: _take(blobs, f"module/{key}/{k}", m) for k, m in entry["tensors"].items()}
        _load_state(module, state, key)
        modules[key] = module
    return Program(nodes, graph["n_sources"], modules, consts)


def _read_graph(directory: Path) -> dict:
    path = directory / GRAPH_FILE
    if not path.is_file():
        raise ProgramFormatError(f"{directory} is not a saved program: {GRAPH_FILE} is missing")
    try:
        graph = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProgramFormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(graph, dict) or graph.get("format") != FORMAT:
        raise ProgramFormatError(f"{path} is not a tracevene program (format != {FORMAT!r})")
    if graph.get("version") != VERSION:
        raise ProgramFormatError(
            f"{path} has version {graph.get('version')!r}; this tracevene reads version "
            f"{VERSION}. Upgrade tracevene, or re-save the program with this version."
        )
    n_sources = graph.get("n_sources")
    count = isinstance(n_sources, int) and not isinstance(n_sources, bool) and n_sources >= 0
    if not isinstance(graph.get("nodes"), list) or not count:
        raise ProgramFormatError(f"{path}: 'nodes' must be a list and 'n_sources' an integer >= 0")
    unknown = set(graph) - {"format", "version", "n_sources", "nodes", "modules", "tensors"}
    if unknown:
        raise ProgramFormatError(f"{path}: unknown fields {sorted(unknown)}")
    return graph


def _field(graph: dict, name: str) -> dict:
    value = graph.get(name, {})
    if not isinstance(value, dict):
        raise ProgramFormatError(f"{GRAPH_FILE}: {name!r} must be an object")
    return value


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / TENSOR_FILE
    if not path.is_file():
        raise ProgramFormatError(f"{directory}: {TENSOR_FILE} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ProgramFormatError(f"{path} is damaged or truncated: {e}") from None


def _take(blobs: dict[str, torch.Tensor], key: str, meta: dict) -> torch.Tensor:
    if not isinstance(meta, dict):
        raise ProgramFormatError(f"{GRAPH_FILE}: the entry of tensor {key!r} must be an object")
    if key not in blobs:
        raise ProgramFormatError(f"tensor {key!r} is missing from {TENSOR_FILE}")
    t = blobs[key]
    if list(t.shape) != meta.get("shape") or str(t.dtype).removeprefix("torch.") != meta.get(
        "dtype"
    ):
        raise ProgramFormatError(
            f"tensor {key!r} has shape {list(t.shape)} {t.dtype} in {TENSOR_FILE} but "
            f"{meta.get('shape')} {meta.get('dtype')} in {GRAPH_FILE}"
        )
    return t


def _load_state(module: torch.nn.Module, state: dict, key: str) -> None:
    expected = module.state_dict()
    for name, value in expected.items():
        if name not in state:
            raise ProgramFormatError(f"module {key}: tensor {name!r} is missing")
        if value.shape != state[name].shape:
            raise ProgramFormatError(
                f"module {key}: tensor {name!r} has shape {list(state[name].shape)}, "
                f"but its spec gives {list(value.shape)}"
            )
    extra = set(state) - set(expected)
    if extra:
        raise ProgramFormatError(f"module {key}: unexpected tensors {sorted(extra)}")
    module.load_state_dict(state)

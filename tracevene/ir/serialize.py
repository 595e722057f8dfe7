"""Programs on disk: versioned JSON for the graph, safetensors for tensors.

Schema: ``dsl/schema/program.v1.json``. No pickle; loading executes no code from
the files; every damaged directory raises ``iv.ProgramFormatError``. A saved
directory also holds a ``README.md`` model card (Hugging Face front matter plus a
description of the program) that loading ignores.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import PathExistsError, ProgramFormatError
from ..interventions import registry
from ..sites.vocab import display
from .nodes import Node, Ref
from .program import Program, run_name

FORMAT = "tracevene-program"
VERSION = 1
GRAPH_FILE = "program.json"
TENSOR_FILE = "tensors.safetensors"
CARD_FILE = "README.md"
#: How every model card tracevene writes begins (Hugging Face model-card metadata).
CARD_HEADER = "---\nlibrary_name: tracevene\ntags:\n- tracevene\n- interventions\n---\n"
_FROM_ONE_SAVE = (
    f"The two files must come from one save: copy both {GRAPH_FILE} and {TENSOR_FILE} "
    "from the same save, or save the program again."
)


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
    """The inverse of ``encode``; rejects anything else."""
    if isinstance(x, list):
        return [decode(v) for v in x]
    if not isinstance(x, dict):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise ProgramFormatError(f"bad argument {x!r}")
    if len(x) != 1:
        raise ProgramFormatError(f"bad argument {x!r}: expected one of ref/slice/tuple/...")
    ((kind, v),) = x.items()
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
def save_program(program: Program, directory: Path, repo_id: str | None = None) -> None:
    """Write ``directory`` atomically: a crash never leaves a loadable half-write.

    Args:
        program: The program to save.
        directory: The directory to create (or replace, if it holds a saved program).
        repo_id: The Hugging Face repository the directory is uploaded to, if any;
            the model card's loading example then downloads from it.
    """
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
    card = model_card(program, modules, repo_id or directory.name, hub=repo_id is not None)
    _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        # clone: safetensors refuses tensors that share memory (x and x[0], tied weights)
        blobs = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                 for k, v in tensors.items()}  # fmt: skip
        save_file(blobs, tmp / TENSOR_FILE)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
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
    ours = names is not None and names <= {GRAPH_FILE, TENSOR_FILE, CARD_FILE}
    if not ours or (CARD_FILE in names and not _is_card(target / CARD_FILE)):
        raise PathExistsError(
            f"{target} exists and is not a saved program; program.save() replaces the whole "
            "directory, so it refuses to. Save to a new directory, or remove it first."
        )


def _is_card(path: Path) -> bool:
    """Whether ``path`` is a model card tracevene wrote (not someone's own README)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(CARD_HEADER)) == CARD_HEADER.encode()
    except OSError:
        return False


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


# -- model card ----------------------------------------------------------------
def model_card(program: Program, modules: dict[str, dict], name: str, hub: bool = False) -> str:
    """The ``README.md`` of a saved program: Hugging Face front matter and a description.

    Args:
        program: The program being saved.
        modules: Its modules as they are written to ``program.json`` (type, spec, tensors).
        name: The repository id (``hub=True``) or the directory's name.
        hub: Whether the loading example downloads ``name`` from the Hugging Face hub.

    Returns:
        Markdown text; loading ignores it.
    """
    from .. import __version__

    parts = [
        CARD_HEADER,
        "# tracevene intervention program\n",
        f"An intervention program saved with tracevene {__version__}: a graph of reads, "
        "writes and intervention modules that runs on any model with the same site "
        "names and shapes (on the torch, nnsight or TransformerLens backend).\n",
        "## Runs, sites and placeholders\n",
        _card_runs(program),
        "## Modules\n",
        _card_modules(program, modules),
        "## Program\n",
        _fenced("text", str(program)),
        "## Loading\n",
        _card_loading(program, modules, name, hub),
        "Loading reads `program.json` and `tensors.safetensors` only (no pickle, no code "
        "from the files) and checks every node, module spec and tensor shape.\n",
    ]
    return "\n".join(parts)


def _card_runs(program: Program) -> str:
    runs = ["base"] + [run_name(i) for i in range(1, program.n_sources + 1)]
    inputs = f"one input per run: `sources=[...]` of length {program.n_sources}"
    lines = [
        f"- Source runs: {program.n_sources} ({inputs if program.n_sources else 'base only'})",
        f"- Placeholders: {_names(program.args)}",
        f"- Named saves: {_names(program.saves)}",
    ]
    for i, run in enumerate(runs):
        for op, verb in (("read", "reads"), ("write", "writes")):
            sites = dict.fromkeys(
                display(n.target) for n in program.nodes if n.op == op and n.run == i
            )
            if sites:
                lines.append(f"- `{run}` {verb} {_names(list(sites))}")
    return "\n".join(lines) + "\n"


def _card_modules(program: Program, modules: dict[str, dict]) -> str:
    if not modules:
        return "None.\n"
    lines = []
    for key, entry in modules.items():
        cls = type(program.modules[key])
        origin = "" if _builtin(cls) else f" (user-defined, from `{cls.__module__}`)"
        tensors = ", ".join(f"`{k}` {m['dtype']}{m['shape']}" for k, m in entry["tensors"].items())
        lines.append(
            f"- `{key}`: {_code(entry['type'])}{origin}, spec {_code(json.dumps(entry['spec']))}"
            f"; tensors: {tensors or 'none'}"
        )
    return "\n".join(lines) + "\n"


def _card_loading(program: Program, modules: dict[str, dict], name: str, hub: bool) -> str:
    lines = ["import tracevene as iv"]
    users = {type(program.modules[k]) for k in modules if not _builtin(type(program.modules[k]))}
    for module in sorted({cls.__module__ for cls in users} - {"__main__"}):
        lines.append(f"import {module}  # registers the user-defined interventions")
    if any(cls.__module__ == "__main__" for cls in users):
        lines.append("# first define the user-defined interventions listed under Modules")
    if hub:
        lines += ["", f"program = iv.Program.load({name!r})  # from the hub (huggingface_hub)"]
    else:
        lines += ["", f"program = iv.Program.load({name!r})  # this directory"]
    sources = ", ".join(f"source{i}" for i in range(1, program.n_sources + 1))
    args = "".join(f", {a}=..." for a in program.args)
    lines += [
        "model = iv.wrap(hf_model)  # the sites above, at the widths the modules were built for",
        f"result = program.run(model, base, sources=[{sources}]{args})",
    ]
    if program.saves:
        lines.append(f"print(result[{program.saves[0]!r}])")
    return _fenced("python", "\n".join(lines))


def _builtin(cls: type) -> bool:
    return cls.__module__.split(".")[0] in ("tracevene", "torch")


def _names(names: list[str]) -> str:
    return ", ".join(_code(n) for n in names) or "none"


def _code(text: str) -> str:
    """``text`` as a Markdown code span, whatever backticks it holds."""
    ticks = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _fenced(language: str, text: str) -> str:
    """``text`` in a fenced code block longer than any backtick run inside it."""
    fence = "`" * max(3, max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence}{language}\n{text}\n{fence}\n"


# -- load ----------------------------------------------------------------------
def load_program(directory: Path) -> Program:
    """Read and check a program directory."""
    graph = _read_graph(directory)
    blobs = _read_tensors(directory)
    nodes = [node_from_json(obj, i) for i, obj in enumerate(graph["nodes"])]
    consts = {k: _take(blobs, f"const/{k}", m) for k, m in _field(graph, "tensors").items()}
    modules = {k: _load_module(k, e, blobs) for k, e in _field(graph, "modules").items()}
    return Program(nodes, graph["n_sources"], modules, consts)


def _load_module(key: str, entry: Any, blobs: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Module ``key``: built from its registered type and spec, then given its tensors."""
    if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
        raise ProgramFormatError(
            f"{GRAPH_FILE}: module {key!r} must be an object with 'type', 'spec' and "
            f"'tensors', got {entry!r}"
        )
    try:
        module = registry.build(entry.get("type"), entry.get("spec", {}))
    except ProgramFormatError as e:
        raise ProgramFormatError(f"{GRAPH_FILE}: module {key!r}: {e}") from None
    state = {k: _take(blobs, f"module/{key}/{k}", m) for k, m in entry["tensors"].items()}
    _load_state(module, state, key, entry)
    return module


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
        raise ProgramFormatError(
            f"{path} is damaged or truncated ({e}); its tensors cannot be read. Copy or "
            "download the whole directory again, or save the program again."
        ) from None


def _take(blobs: dict[str, torch.Tensor], key: str, meta: dict) -> torch.Tensor:
    if not isinstance(meta, dict):
        raise ProgramFormatError(f"{GRAPH_FILE}: the entry of tensor {key!r} must be an object")
    if key not in blobs:
        raise ProgramFormatError(
            f"tensor {key!r} is missing from {TENSOR_FILE}, which {GRAPH_FILE} says holds it "
            f"({meta.get('shape')} {meta.get('dtype')}). {_FROM_ONE_SAVE}"
        )
    t = blobs[key]
    if list(t.shape) != meta.get("shape") or str(t.dtype).removeprefix("torch.") != meta.get(
        "dtype"
    ):
        raise ProgramFormatError(
            f"tensor {key!r} has shape {list(t.shape)} {t.dtype} in {TENSOR_FILE} but "
            f"{meta.get('shape')} {meta.get('dtype')} in {GRAPH_FILE}. {_FROM_ONE_SAVE}"
        )
    return t


def _load_state(module: torch.nn.Module, state: dict, key: str, entry: dict) -> None:
    """Give ``module`` its saved tensors, which must be those its spec builds."""
    expected = module.state_dict()
    built = f"{entry.get('type')} with spec {json.dumps(entry.get('spec', {}))}"
    fix = (
        f"The spec in {GRAPH_FILE} and the saved tensors do not fit together: restore the "
        "spec the program was saved with, or save the program again."
    )
    for name, value in expected.items():
        if name not in state:
            raise ProgramFormatError(
                f"module {key}: tensor {name!r} is missing; {built} has tensors "
                f"{sorted(expected)}, the saved program has {sorted(state)}. {fix}"
            )
        if value.shape != state[name].shape:
            raise ProgramFormatError(
                f"module {key}: tensor {name!r} has shape {list(state[name].shape)}, "
                f"but its spec gives {list(value.shape)} ({built}). {fix}"
            )
    extra = set(state) - set(expected)
    if extra:
        raise ProgramFormatError(
            f"module {key}: unexpected tensors {sorted(extra)}; {built} has tensors "
            f"{sorted(expected)}. {fix}"
        )
    module.load_state_dict(state)

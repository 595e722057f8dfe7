"""Programs on disk: versioned JSON for the graph, safetensors for tensors.

Schema: ``dsl/schema/program.v1.json``. No pickle; loading executes no code from
the files; every damaged directory raises ``iv.ProgramFormatError``. A saved
directory also holds a ``README.md`` model card (Hugging Face front matter plus a
description of the program) that loading ignores.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from ..errors import ArgumentError, DiskFullError, PathExistsError, ProgramFormatError
from ..interventions import registry
from ..sites.vocab import display
from .nodes import OPERATORS, Node, Ref
from .program import Program, run_name

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

FORMAT = "tracevene-program"
VERSION = 1
GRAPH_FILE = "program.json"
#: The tensor file of the first format layout (still loaded; a re-save replaces it).
TENSOR_FILE = "tensors.safetensors"
#: The tensor files saves write: named by the first 16 hex digits of their sha256.
TENSOR_PATTERN = r"tensors\.[0-9a-f]{16}\.safetensors"
#: How the names of a save's temporaries begin (removed by the next save).
TMP_PREFIX = ".tracevene-tmp-"
#: Without a lock (Windows), temporaries older than this many seconds are stale.
STALE_S = 3600
CARD_FILE = "README.md"
#: How every model card tracevene writes begins (Hugging Face model-card metadata).
CARD_HEADER = "---\nlibrary_name: tracevene\ntags:\n- tracevene\n- interventions\n---\n"
#: Below this line of a model card are the user's notes; re-saving keeps them.
NOTES_MARK = "<!-- tracevene: your notes go below this line; re-saving keeps them -->"
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
        return getattr(torch, str(v))
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
    try:
        args = tuple(decode(a) for a in obj.get("args", []))
        kwargs = tuple((k, decode(v)) for k, v in kwargs.items())
        _check_operands(obj["op"], obj.get("target"), args, kwargs)
    except ProgramFormatError as e:
        raise ProgramFormatError(f"{GRAPH_FILE}: node %{i} ({obj['op']}): {e}") from None
    return Node(
        id=obj.get("id", i),
        op=obj["op"],
        target=obj.get("target"),
        run=obj.get("run"),
        args=args,
        kwargs=kwargs,
        loc=obj.get("loc", ""),
    )


def _check_operands(op: str, target: Any, args: tuple, kwargs: tuple) -> None:
    """Operators and tensor methods take tensors (refs) and numbers, never sequences.

    ``operator.mul("ab", 500000000)`` would build a 1 GB string, and a method is
    looked up on its first argument, which must therefore be a computed value. The
    index of ``operator.getitem`` and the arguments of tensor methods (shapes, dims,
    dtypes as in ``x.reshape((2, 3))``) may be tuples, slices and lists.
    """
    if op == "call_method" and not (args and isinstance(args[0], Ref)):
        raise ProgramFormatError(
            f"tensor method {target!r} must be called on a computed value (a ref), got "
            f"{args[0] if args else 'no arguments'!r}"
        )
    if op != "call_function" or not isinstance(target, str):
        return
    name = target.removeprefix("operator.").strip("_")
    if not target.startswith("operator.") or name == "getitem" or name not in OPERATORS:
        return  # functions that are not allowed at all: Program's check names them
    for x in (*args, *(v for _, v in kwargs)):
        number = isinstance(x, (bool, int, float, complex)) or x is None
        if not (number or isinstance(x, Ref)):
            raise ProgramFormatError(
                f"{target} takes tensors and numbers, got the constant {_short(x)} "
                "(tensor maths only: no strings, lists or tuples)"
            )


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else f"{text[:40]}... ({type(x).__name__})"


# -- save ----------------------------------------------------------------------
def save_program(program: Program, directory: Path, repo_id: str | None = None) -> None:
    """Write ``directory`` so that it holds the old program or the new one at every instant.

    The tensors go to a new content-named file, then ``program.json``, which names it
    and records its sha256, replaces the old one with one ``os.replace`` (the commit
    point); files are fsynced before it. Saves to one path are serialised with a lock
    on the directory (where the platform has ``fcntl``); each save removes what killed
    saves left.

    Args:
        program: The program to save.
        directory: The directory to create (or replace, if it holds a saved program).
        repo_id: The Hugging Face repository the directory is uploaded to, if any;
            the model card's loading example then downloads from it.

    Raises:
        DiskFullError: The disk is full; an earlier program at ``directory`` is intact.
    """
    graph, blobs = _to_files(program)
    data = safetensors_save(blobs)
    card = model_card(program, graph["modules"], repo_id or directory.name, hub=repo_id is not None)
    _check_replaceable(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory):
            _check_replaceable(directory)
            _clean(directory)
            _commit(directory, graph, data, card)
            _clean(directory)
    except BaseException as e:
        if created:
            _remove_if_empty(directory)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise _disk_full(directory, created) from e
        raise


def _disk_full(directory: Path, created: bool) -> DiskFullError:
    kept = "nothing was written" if created else "the program saved there before is intact"
    return DiskFullError(
        errno.ENOSPC,
        f"No space left on device while saving the program to {directory}; {kept}. "
        "Free some disk space, or save to another disk.",
    )


def _to_files(program: Program) -> tuple[dict, dict[str, torch.Tensor]]:
    """The graph as JSON-ready dict and the tensors as safetensors takes them."""
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
    _check_storable(tensors)
    # clone: safetensors refuses tensors that share memory (x and x[0], tied weights)
    blobs = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
             for k, v in tensors.items()}  # fmt: skip
    return graph, blobs


def _check_storable(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse, before anything is written, tensors whose dtype safetensors cannot store."""
    bad = {k: str(v.dtype) for k, v in tensors.items() if not _storable(v.dtype)}
    if bad:
        listed = ", ".join(f"{k!r} ({d})" for k, d in bad.items())
        raise ArgumentError(
            f"cannot save {listed}: safetensors stores no such dtype, so the program could "
            "not be loaded as it was. Convert the tensor to a dtype it stores (for example "
            "complex128 -> complex64, or keep real and imaginary parts as float64) and save "
            "again; nothing was written."
        )


@functools.cache
def _storable(dtype: torch.dtype) -> bool:
    try:
        safetensors_save({"x": torch.zeros(1, dtype=dtype)})
    except (KeyError, ValueError, TypeError, SafetensorError):
        return False
    return True


def _commit(directory: Path, graph: dict, data: bytes, card: str) -> None:
    """Tensors, card, then ``program.json`` (the commit point), each fsynced.

    A failure before the commit puts the old card back and removes the new files.
    """
    digest = hashlib.sha256(data).hexdigest()
    name = f"tensors.{digest[:16]}.safetensors"
    old_card = _read_card(directory / CARD_FILE)
    try:
        _write_atomic(directory / name, data)
        _write_atomic(directory / CARD_FILE, _with_notes(card, old_card).encode())
        _fsync_dir(directory)
        graph = {**graph, "tensor_file": {"name": name, "sha256": digest}}
        _write_atomic(directory / GRAPH_FILE, json.dumps(graph, indent=1).encode())
    except BaseException:
        _undo(directory, old_card)
        raise
    _fsync_dir(directory)


def _undo(directory: Path, old_card: str | None) -> None:
    with contextlib.suppress(OSError):
        _clean(directory)
        if old_card is None:
            (directory / CARD_FILE).unlink(missing_ok=True)
        else:
            _write_atomic(directory / CARD_FILE, old_card.encode())


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary in ``path``'s directory, fsync it, rename it onto ``path``.

    The temporary is created with mode 0o666, so the umask decides its permissions.
    """
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened (nor fsynced) on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (POSIX ``flock``; none on Windows)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _clean(directory: Path) -> None:
    """Remove temporaries and tensor files ``program.json`` does not name.

    Called with the lock held, so no other save is writing them. Without a lock
    (Windows) only files older than ``STALE_S`` seconds go.
    """
    keep = _tensor_name(directory)
    for path in directory.iterdir():
        ours = path.name.startswith(TMP_PREFIX) or _is_tensor_file(path.name)
        if ours and path.name != keep and _stale(path):
            with contextlib.suppress(OSError):  # Windows: a reader has it open
                path.unlink()


def _tensor_name(directory: Path) -> str | None:
    try:
        graph = json.loads((directory / GRAPH_FILE).read_text())
        return str(graph.get("tensor_file", {}).get("name", TENSOR_FILE))
    except (OSError, ValueError, AttributeError):
        return None


def _stale(path: Path) -> bool:
    if fcntl is not None:
        return True
    with contextlib.suppress(OSError):
        return time.time() - path.stat().st_mtime > STALE_S
    return False


def _is_tensor_file(name: str) -> bool:
    return name == TENSOR_FILE or re.fullmatch(TENSOR_PATTERN, name) is not None


def _remove_if_empty(directory: Path) -> None:
    """Undo the creation of ``directory`` by a save that failed (if nothing else is there)."""
    with contextlib.suppress(OSError):
        directory.rmdir()


def _read_card(path: Path) -> str | None:
    """The model card tracevene wrote at ``path``, if there is one."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.startswith(CARD_HEADER) else None


def _with_notes(card: str, old: str | None) -> str:
    """The new card, followed by the user's notes below ``NOTES_MARK`` in the old one."""
    notes = old.split(NOTES_MARK, 1)[1] if old and NOTES_MARK in old else "\n"
    return f"{card}\n{NOTES_MARK}{notes}"


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
    ours = names is not None and all(
        n in (GRAPH_FILE, CARD_FILE) or n.startswith(TMP_PREFIX) or _is_tensor_file(n)
        for n in names
    )
    card = names is not None and CARD_FILE in names
    if not ours or (card and not _is_card(target / CARD_FILE)):
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
        "Loading reads `program.json` and the tensor file it names only (no pickle, no code "
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
                display(str(n.target)) for n in program.nodes if n.op == op and n.run == i
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
    graph, blobs, mismatch = _read_files(directory)
    nodes = [node_from_json(obj, i) for i, obj in enumerate(graph["nodes"])]
    consts = {k: _take(blobs, f"const/{k}", m) for k, m in _field(graph, "tensors").items()}
    modules = {k: _load_module(k, e, blobs) for k, e in _field(graph, "modules").items()}
    try:
        program = Program(nodes, graph["n_sources"], modules, consts)
    except ProgramFormatError as e:
        raise ProgramFormatError(f"{GRAPH_FILE}: {e}") from None
    if mismatch:
        raise ProgramFormatError(mismatch)
    return program


def _load_module(key: str, entry: Any, blobs: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Module ``key``: built from its registered type and spec, then given its tensors."""
    if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
        raise ProgramFormatError(
            f"{GRAPH_FILE}: module {key!r} must be an object with 'type', 'spec' and "
            f"'tensors', got {entry!r}"
        )
    state = {k: _take(blobs, f"module/{key}/{k}", m) for k, m in entry["tensors"].items()}
    # On the meta device first: a spec's sizes allocate nothing until they are checked
    # against the tensors the file holds (a width of 1e9 in the JSON costs no memory).
    meta = _build_on_meta(key, entry)
    if meta is not None:
        _check_state(meta, state, key, entry)
        if _self_contained(meta):  # all its tensors come from the file: take those
            meta.load_state_dict(state, assign=True)  # assign: keeps the saved dtypes
            return meta
    # Tied tensors, non-persistent buffers, or a class that cannot be built on the meta
    # device: build it for real (the sizes checked above bound what that allocates).
    module = _build(key, entry)
    _check_state(module, state, key, entry)
    if _self_contained(module):
        module.load_state_dict(state, assign=True)
    else:  # copy into the module's own tensors, which keeps ties; in the saved dtype
        floating = {t.dtype for t in state.values() if t.is_floating_point()}
        if len(floating) == 1:
            module.to(floating.pop())
        module.load_state_dict(state)
    return module


def _build(key: str, entry: dict, on_meta: bool = False) -> torch.nn.Module:
    """Module ``key`` built from its spec (on the meta device if ``on_meta``)."""
    try:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            return registry.build(entry.get("type"), entry.get("spec", {}))
    except (ProgramFormatError, NotImplementedError) as e:
        raise ProgramFormatError(f"{GRAPH_FILE}: module {key!r}: {e}") from None


def _build_on_meta(key: str, entry: dict) -> torch.nn.Module | None:
    """Module ``key`` on the meta device (``None``: it cannot be built there).

    tracevene's own classes always build on the meta device; a user's class that cannot
    (it reads a tensor's values, say) is built for real instead.
    """
    cls = registry.lookup(entry.get("type"))
    try:
        return _build(key, entry, on_meta=True)
    except ProgramFormatError:
        if cls is not None and not _builtin(cls):
            return None
        raise


def _self_contained(module: torch.nn.Module) -> bool:
    """Whether each of ``module``'s tensors is in its state dict, under one name only.

    Not so for tied parameters (one tensor, two names) and non-persistent buffers,
    which ``load_state_dict(assign=True)`` would untie or leave unset.
    """
    named: list[tuple[str, torch.Tensor]] = [*module.named_parameters(remove_duplicate=False)]
    named += module.named_buffers(remove_duplicate=False)
    distinct = len({id(t) for _, t in named}) == len(named)
    return distinct and {n for n, _ in named} == set(module.state_dict())


def _read_graph(directory: Path) -> dict:
    path = directory / GRAPH_FILE
    if not path.is_file():
        raise ProgramFormatError(f"{directory} is not a saved program: {GRAPH_FILE} is missing")
    try:
        graph = json.loads(
            path.read_text(), parse_constant=_Bad, parse_float=_float, parse_int=_int
        )
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProgramFormatError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ProgramFormatError(
            f"{path} nests arrays or objects too deeply for a program (a saved program "
            f"nests at most {MAX_DEPTH} levels); the file is damaged. Save the program again."
        ) from None
    if not isinstance(graph, dict) or graph.get("format") != FORMAT:
        raise ProgramFormatError(f"{path} is not a tracevene program (format != {FORMAT!r})")
    _scan_graph(graph, path)
    version = graph.get("version")
    if type(version) is not int or version != VERSION:  # not True, not 1.0
        raise ProgramFormatError(
            f"{path} has version {graph.get('version')!r}; this tracevene reads version "
            f"{VERSION}. Upgrade tracevene, or re-save the program with this version."
        )
    n_sources = graph.get("n_sources")
    count = isinstance(n_sources, int) and not isinstance(n_sources, bool) and n_sources >= 0
    if not isinstance(graph.get("nodes"), list) or not count:
        raise ProgramFormatError(f"{path}: 'nodes' must be a list and 'n_sources' an integer >= 0")
    known = {"format", "version", "n_sources", "nodes", "modules", "tensors", "tensor_file"}
    unknown = set(graph) - known
    if unknown:
        raise ProgramFormatError(f"{path}: unknown fields {sorted(unknown)}")
    return graph


#: How deeply a program's JSON may nest (a node's arguments need about 8 levels).
MAX_DEPTH = 64
_INT64 = (-(2**63), 2**63 - 1)


class _Bad:
    """A JSON number a program cannot hold (NaN, Infinity, 1e400, a huge integer)."""

    def __init__(self, text: str):
        self.text = text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _float(text: str) -> float | _Bad:
    value = float(text)
    return value if math.isfinite(value) else _Bad(text)


def _int(text: str) -> int | _Bad:
    if len(text) > 20:  # past 64 bits (and, far past, Python's digit limit for int())
        return _Bad(text)
    value = int(text)
    return value if _INT64[0] <= value <= _INT64[1] else _Bad(text)


def _scan_graph(graph: dict, path: Path) -> None:
    """Refuse deep nesting and unrepresentable numbers, naming the node or module."""
    nodes = graph.get("nodes")
    for i, node in enumerate(nodes if isinstance(nodes, list) else []):
        _scan(node, f"{path}: node {i}")
    modules = graph.get("modules")
    for key, entry in (modules if isinstance(modules, dict) else {}).items():
        _scan(entry, f"{path}: module {key!r}")
    _scan({k: v for k, v in graph.items() if k not in ("nodes", "modules")}, str(path))


def _scan(obj: Any, where: str) -> None:
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, _Bad):
            raise ProgramFormatError(
                f"{where}: the number {x.text} cannot be stored in a program (numbers are "
                "finite, integers fit in 64 bits; non-finite floats are written "
                '{"float": "inf"}); the file is damaged. Save the program again.'
            )
        if isinstance(x, (list, dict)):
            if depth > MAX_DEPTH:
                raise ProgramFormatError(
                    f"{where}: nested deeper than {MAX_DEPTH} levels, which no saved program "
                    "is; the file is damaged. Save the program again."
                )
            items = x.values() if isinstance(x, dict) else x
            stack.extend((v, depth + 1) for v in items)


def _field(graph: dict, name: str) -> dict:
    value = graph.get(name, {})
    if not isinstance(value, dict):
        raise ProgramFormatError(f"{GRAPH_FILE}: {name!r} must be an object")
    return value


def _read_files(directory: Path) -> tuple[dict, dict[str, torch.Tensor], str | None]:
    """``program.json`` and the tensors it names, read as one save wrote them.

    A save replaces ``program.json`` last and removes the old tensor file after it,
    so a tensor file that is missing or does not match the recorded sha256 may mean
    a save ran meanwhile: ``program.json`` is read once more. Returns the graph, the
    tensors and, if the sha256 still does not match, the message to raise once the
    more specific checks have passed.
    """
    graph, name, data, ok = _read_once(directory)
    if not ok:  # once more: a save may have replaced the files meanwhile
        graph, name, data, ok = _read_once(directory)
    if data is None:
        raise ProgramFormatError(
            f"{directory}: {name} is missing ({GRAPH_FILE} names it as the tensor file). "
            "Copy or download the whole directory again, or save the program again."
        )
    mismatch = (
        f"{directory / name} does not have the sha256 {GRAPH_FILE} records for it: it was "
        f"changed or damaged after the save. {_FROM_ONE_SAVE}"
    )
    return graph, _parse_tensors(directory / name, data), None if ok else mismatch


def _read_once(directory: Path) -> tuple[dict, str, bytes | None, bool]:
    """The graph, its tensor file's name and bytes (``None``: missing), and a sha256 match."""
    graph = _read_graph(directory)
    name, digest = _tensor_entry(graph)
    try:
        data = (directory / name).read_bytes()
    except OSError:
        data = None
    ok = data is not None and (digest is None or hashlib.sha256(data).hexdigest() == digest)
    return graph, name, data, ok

def _tensor_entry(graph: dict) -> tuple[str, str | None]:
    """The tensor file's name and sha256 (the first layout: ``tensors.safetensors``, none)."""
    if "tensor_file" not in graph:
        return TENSOR_FILE, None
    entry = graph["tensor_file"]
    ok = isinstance(entry, dict) and set(entry) == {"name", "sha256"}
    if ok and isinstance(entry["name"], str) and isinstance(entry["sha256"], str):
        named = re.fullmatch(TENSOR_PATTERN, entry["name"]) is not None
        if named and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            return entry["name"], entry["sha256"]
    raise ProgramFormatError(
        f"{GRAPH_FILE}: 'tensor_file' must be {{'name': 'tensors.<16 hex digits>.safetensors', "
        f"'sha256': '<64 hex digits>'}}, got {entry!r}. Save the program again."
    )


def _parse_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors_load(data)
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


def _check_state(module: torch.nn.Module, state: dict, key: str, entry: dict) -> None:
    """Check that the saved tensors are those ``module`` (built from its spec) has."""
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

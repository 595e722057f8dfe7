"""``Program``: a validated, printable, runnable, saveable intervention program."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, MissingDependencyError, ProgramFormatError, SiteError
from ..sites.vocab import display, parse
from .nodes import OPS, Node, Ref, check_method, resolve_function

if TYPE_CHECKING:
    from ..bound import BoundProgram
    from ..model import Model
    from ..result import Result
    from ..runtime.cache import SourceCache


class Program:
    """An intervention program: nodes in program order, plus modules and constants.

    A program holds no activations; backends keep values in their own environment
    while running it. Build programs with ``iv.trace``.

    Args:
        nodes: Nodes in program order; node ``i`` has id ``i``.
        n_sources: Number of source runs (runs ``1..n_sources``; run 0 is the base).
        modules: Intervention modules called by ``call_module`` nodes, by key.
        tensors: Tensor constants used by ``const`` nodes, by key.
    """

    def __init__(
        self,
        nodes: Sequence[Node],
        n_sources: int = 0,
        modules: Mapping[str, nn.Module] | None = None,
        tensors: Mapping[str, Tensor] | None = None,
    ):
        self.nodes: tuple[Node, ...] = tuple(nodes)
        self.n_sources = n_sources
        self.modules: dict[str, nn.Module] = dict(modules or {})
        self.tensors: dict[str, Tensor] = dict(tensors or {})
        self.validate()

    # -- structure -----------------------------------------------------------
    @property
    def args(self) -> list[str]:
        """Names of the placeholders that ``run`` must be given."""
        return [str(n.target) for n in self.nodes if n.op == "arg"]

    @property
    def saves(self) -> list[str]:
        """Names of the named saves."""
        return [n.target for n in self.nodes if n.op == "save" and n.target is not None]

    def validate(self) -> None:
        """Check every node; raise ``iv.ProgramFormatError`` naming the first bad one."""
        for i, node in enumerate(self.nodes):
            try:
                self._check(i, node)
            except (ProgramFormatError, SiteError) as e:
                raise ProgramFormatError(f"node %{i} ({node.op}): {e}") from None

    def _check(self, i: int, node: Node) -> None:
        if node.id != i:
            raise ProgramFormatError(f"has id {node.id}, expected {i} (ids follow node order)")
        if node.op not in OPS:
            raise ProgramFormatError(
                f"unknown op {node.op!r}; the op vocabulary is {', '.join(OPS)}"
            )
        for ref in node.refs():
            if not 0 <= ref < i:
                raise ProgramFormatError(f"refers to %{ref}, which is not an earlier node")
        if node.op in ("read", "write"):
            if not isinstance(node.run, int) or not 0 <= node.run <= self.n_sources:
                raise ProgramFormatError(
                    f"run {node.run!r} is not 0 (base) or a source 1..{self.n_sources}"
                )
            if not isinstance(node.target, str):
                raise ProgramFormatError(f"needs a site name, got {node.target!r}")
            parse(node.target)
        elif node.op == "call_function":
            name = node.target
            resolve_function(name)
            assert isinstance(name, str)  # resolve_function refuses anything else
            kwargs = dict(node.kwargs)
            inplace = name.endswith("_") and not name.startswith("operator.")
            if inplace or kwargs.get("out") is not None or kwargs.get("inplace") is True:
                raise ProgramFormatError(
                    f"{node.target} would change a tensor in place (an in-place function, "
                    "out= or inplace=True); programs compute out of place"
                )
        elif node.op == "call_method":
            check_method(node.target, ProgramFormatError)
        elif node.op == "call_module" and node.target not in self.modules:
            raise ProgramFormatError(f"calls module {node.target!r}, which the program lacks")
        elif node.op == "const" and node.target not in self.tensors:
            raise ProgramFormatError(f"uses tensor {node.target!r}, which the program lacks")
        elif node.op == "arg" and not isinstance(node.target, str):
            raise ProgramFormatError("a placeholder needs a name")
        if node.op == "write" and len(node.args) != 2:
            raise ProgramFormatError("a write needs (index, value)")

    # -- running -------------------------------------------------------------
    def run(
        self,
        model: Model | nn.Module,
        base: Any,
        sources: Sequence[Any] = (),
        *,
        schedule: str = "auto",
        forward_kwargs: Mapping[str, Any] | None = None,
        source_cache: SourceCache | None = None,
        **args: Any,
    ) -> Result:
        """Run the program on ``model`` (the same as ``model.run(program, ...)``).

        Thread-safe: runs on one model are serialised by a re-entrant lock of
        ``model.module``, held for the whole run (hooks, the attention switch of
        ``attn.pattern`` reads), so concurrent runs from several threads each give
        their single-threaded numbers and leave the model as it was; a run nested in
        another on the same thread does not wait (see docs/backends.md, Threads).

        Args:
            model: An ``iv.Model`` (or a module, wrapped as by ``iv.wrap``).
            base: Inputs of the base run (token ids, a dict, text, or a module's input).
            sources: Inputs of each source run, in order.
            schedule: ``"auto"``, ``"batched"`` (base and sources in one forward pass
                where the program allows) or ``"sequential"`` (one pass per run).
            forward_kwargs: Extra keyword arguments for every forward call.
            source_cache: An ``iv.SourceCache`` shared by runs over recurring
                sources: a source pass that only reads clean activations is served from
                it when the same pass (same reads and computations, same model weights,
                same inputs and placeholders) was seen before, whatever program ran it.
            **args: Values of the placeholders (``t.arg(name)``).

        Returns:
            The saved values and the base run's output.
        """
        from ..model import as_model  # at call time: the IR imports no runtime

        return as_model(model).run(
            self,
            base,
            sources,
            schedule=schedule,
            forward_kwargs=forward_kwargs,
            source_cache=source_cache,
            **args,
        )

    def bind(
        self,
        model: Model | nn.Module,
        *,
        schedule: str = "auto",
        forward_kwargs: Mapping[str, Any] | None = None,
        **args: Any,
    ) -> BoundProgram:
        """This program bound to ``model``: an ``nn.Module`` to train and call like any other.

        ``bound(base, sources=())`` runs ``self.run(model, base, sources, **args)`` and
        returns the ``iv.Result``. ``bound.parameters()`` and ``bound.state_dict()``
        are exactly those of the program's intervention modules (the same objects,
        under ``interventions.<key>``), never the model's, so a plain
        ``torch.optim.Adam(bound.parameters())`` trains the program and leaves the
        model as it was.

        Args:
            model: An ``iv.Model`` (or a module, wrapped as by ``iv.wrap``).
            schedule: Passed to every ``run``.
            forward_kwargs: Passed to every ``run``.
            **args: Placeholder values for every call (a call may pass or override them).

        Returns:
            An ``iv.BoundProgram``.

        Raises:
            ArgumentError: ``args`` names something that is not a placeholder.
        """
        from ..bound import BoundProgram
        from ..model import as_model

        return BoundProgram(
            self, as_model(model), schedule=schedule, forward_kwargs=forward_kwargs, args=args
        )

    # -- files ---------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Save as ``program.json`` + a tensor file + ``README.md`` (atomic, no pickle).

        ``README.md`` is a model card: Hugging Face metadata and a description of the
        program (listing, runs, placeholders, modules, how to load it). Loading
        ignores it; notes below its last line (a marker comment) survive a re-save. An
        existing directory is replaced only if it holds a saved program: the path holds
        the old program or the new one at every instant, even if the save is killed.

        Args:
            directory: The directory to write.

        Raises:
            RegistryError: The program calls a module whose class is not registered.
            PathExistsError: ``directory`` exists and holds something else (also a
                ``FileExistsError``).
            DiskFullError: The disk is full (also an ``OSError``); an earlier program
                at ``directory`` is intact.
        """
        from .serialize import save_program

        save_program(self, Path(directory))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool = False,
        commit_message: str = "Upload tracevene program",
    ) -> str:
        """Upload the saved program to a Hugging Face hub model repository.

        Saves to a temporary directory (as ``save``, with a model card whose
        loading example downloads ``repo_id``), creates the repository if needed and
        uploads the files. Load it back with ``iv.Program.load(repo_id)``.

        Args:
            repo_id: ``"user/name"`` or ``"org/name"``.
            token: A hub token (default: the one ``huggingface-cli login`` stored).
            private: Create the repository as private (if it does not exist yet).
            commit_message: The message of the upload commit.

        Returns:
            The URL of the upload commit (or of the repository).

        Raises:
            MissingDependencyError: ``huggingface_hub`` is not installed (also an
                ``ImportError``).
            RegistryError: The program calls a module whose class is not registered.
        """
        import tempfile

        from .serialize import save_program

        hub = _huggingface_hub()
        with tempfile.TemporaryDirectory(prefix="tracevene-push-") as tmp:
            directory = Path(tmp) / "program"
            save_program(self, directory, repo_id=repo_id)
            api = hub.HfApi(token=token)
            repo = api.create_repo(repo_id, exist_ok=True, private=private)
            info = api.upload_folder(
                repo_id=getattr(repo, "repo_id", None) or repo_id,
                folder_path=directory,
                commit_message=commit_message,
                delete_patterns=["tensors*.safetensors"],  # an earlier push's tensor file
            )
        return str(getattr(info, "commit_url", None) or repo)

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | None = None,
    ) -> Program:
        """Load a program saved by ``save``, or pushed by ``push_to_hub``; never runs its code.

        An existing directory is loaded as it is. Otherwise a string ``"owner/name"``
        is a Hugging Face hub model repository: its ``program.json`` and
        tensor file are fetched with ``huggingface_hub.snapshot_download``
        (into the hub cache, ``HF_HUB_CACHE``), or only looked up there when
        ``HF_HUB_OFFLINE=1``.

        Args:
            name_or_path: A directory written by ``save``, or a hub repository id.
            revision: The hub branch, tag or commit (default: ``"main"``).
            cache_dir: The hub cache to use instead of the default one.
            token: A hub token for private repositories (default: the stored one).

        Returns:
            The program, with its modules' trained weights.

        Raises:
            ProgramFormatError: The directory is not a saved program, or is damaged.
            MissingDependencyError: A hub id was given but ``huggingface_hub`` is not
                installed (also an ``ImportError``).
            OSError: The hub repository could not be fetched (not found, offline and
                not in the cache); huggingface_hub's own error, with a note.
        """
        from .serialize import load_program

        directory = Path(name_or_path)
        if isinstance(name_or_path, str) and not directory.exists() and _is_repo_id(name_or_path):
            directory = _download(name_or_path, revision, cache_dir, token)
        elif revision is not None or cache_dir is not None or token is not None:
            raise ArgumentError(
                f"Program.load({str(name_or_path)!r}): revision, cache_dir and token apply "
                "to hub repositories ('owner/name'), not to a local directory; drop them."
            )
        return load_program(directory)

    # -- printing ------------------------------------------------------------
    def __str__(self) -> str:
        runs = f"{self.n_sources} source{'s' * (self.n_sources != 1)}"
        head = f"Program ({runs}; args: {', '.join(self.args) or 'none'})"
        lines = [head] + [_format_node(n, self) for n in self.nodes]
        width = max(len(line) for line in lines[1:]) if self.nodes else 0
        for i, node in enumerate(self.nodes, start=1):
            if node.loc:
                lines[i] = f"{lines[i]:<{width}}  # {node.loc}"
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Program: {len(self.nodes)} nodes, {self.n_sources} sources>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Program):
            return NotImplemented
        return (
            self.nodes == other.nodes
            and self.n_sources == other.n_sources
            and self.tensors.keys() == other.tensors.keys()
            and all(torch.equal(self.tensors[k], other.tensors[k]) for k in self.tensors)
        )

    __hash__ = None  # type: ignore[assignment]


def _huggingface_hub(
    what: str = "Program.push_to_hub",
    instead: str = "program.save(directory) writes the same files for any upload",
) -> Any:
    """The ``huggingface_hub`` package.

    Raises:
        MissingDependencyError: It is not installed (the message says how to install it).
    """
    try:
        import huggingface_hub
    except ImportError:
        raise MissingDependencyError(
            f"{what} needs the huggingface_hub package, which is not "
            "installed: pip install huggingface_hub (or pip install 'tracevene[hf]'). "
            f"Without it, {instead}."
        ) from None
    return huggingface_hub


#: A hub repository id as ``push_to_hub`` takes it: ``owner/name``.
REPO_ID = r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*"


def _is_repo_id(name: str) -> bool:
    return re.fullmatch(REPO_ID, name) is not None and ".." not in name and "--" not in name


def _download(repo_id: str, revision: str | None, cache_dir: Any, token: str | None) -> Path:
    """The local snapshot of a hub repository's program files (downloaded if needed)."""
    from .serialize import GRAPH_FILE, TENSOR_FILE

    hub = _huggingface_hub(
        f"Program.load({repo_id!r}) (not a local directory, so a hub repository)",
        "download the repository yourself and pass its directory",
    )
    try:
        path = hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=[GRAPH_FILE, TENSOR_FILE, "tensors.*.safetensors"],
            local_files_only=_offline(hub),
        )
    except OSError as e:
        e.add_note(
            f"Program.load({repo_id!r}): there is no such local directory (relative to "
            f"{os.getcwd()}), so it was looked up as a Hugging Face hub repository"
            + (" in the local hub cache only (HF_HUB_OFFLINE is set)" if _offline(hub) else "")
            + "."
        )
        raise
    return Path(path)


def _offline(hub: Any) -> bool:
    """``HF_HUB_OFFLINE`` as set now, or as huggingface_hub read it when imported."""
    now = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return now or bool(getattr(hub.constants, "HF_HUB_OFFLINE", False))


def run_name(run: int) -> str:
    """``base`` for run 0, ``src1``, ``src2``, ... for sources."""
    return "base" if run == 0 else f"src{run}"


def format_arg(x: Any) -> str:
    """An argument as it reads in a listing."""
    if isinstance(x, Ref):
        return repr(x)
    if x is Ellipsis:
        return "..."
    if isinstance(x, slice):
        parts = ["" if v is None else format_arg(v) for v in (x.start, x.stop, x.step)]
        return ":".join(parts[:2]) + (f":{parts[2]}" if x.step is not None else "")
    if isinstance(x, tuple):
        return "(" + ", ".join(format_arg(v) for v in x) + ("," if len(x) == 1 else "") + ")"
    if isinstance(x, list):
        return "[" + ", ".join(format_arg(v) for v in x) + "]"
    return repr(x)


def format_index(index: Any) -> str:
    """An index as it reads inside brackets."""
    if index == ():
        return ""
    items = index if isinstance(index, tuple) else (index,)
    return "[" + ", ".join(format_arg(v) for v in items) + "]"


def _format_node(node: Node, program: Program) -> str:
    args = ", ".join(format_arg(a) for a in node.args)
    kwargs = "".join(f", {k}={format_arg(v)}" for k, v in node.kwargs)
    key = node.target or ""  # a site, tensor or module key where the op has one
    where = f"{run_name(node.run)}.{display(key)}" if node.run is not None else ""
    body = {
        "arg": lambda: f"arg {node.target!r}",
        "const": lambda: f"const {node.target} {_tensor_summary(program.tensors[key])}",
        "read": lambda: f"read {where}",
        "write": lambda: f"write {where}{format_index(node.args[0])} = {format_arg(node.args[1])}",
        "getitem": lambda: f"{format_arg(node.args[0])}{format_index(node.args[1])}",
        "setitem": lambda: (
            f"copy of {format_arg(node.args[0])} with {format_index(node.args[1])} "
            f"= {format_arg(node.args[2])}"
        ),
        "call_function": lambda: f"{node.target}({args}{kwargs})",
        "call_method": lambda: (
            f"{format_arg(node.args[0])}.{node.target}("
            f"{', '.join(format_arg(a) for a in node.args[1:])}{kwargs})"
        ).replace("(, ", "("),
        "call_module": lambda: f"{node.target}[{_module_name(program, node)}]({args}{kwargs})",
        "save": lambda: (
            f"save {format_arg(node.args[0])}" + (f" as {node.target!r}" if node.target else "")
        ),
    }[node.op]()
    return f"  %{node.id} = {body}"


def _tensor_summary(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def _module_name(program: Program, node: Node) -> str:
    return type(program.modules[node.target or ""]).__name__

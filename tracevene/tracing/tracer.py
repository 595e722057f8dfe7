"""The with-block front-end: ``iv.trace``, runs, site proxies and recording."""

from __future__ import annotations

import difflib
import inspect
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..errors import SiteError, TraceError, closest
from ..ir.nodes import Node, Op, Ref
from ..ir.program import Program
from ..sites.vocab import ATTN_SITES, LAYER_SITES, MLP_SITES, TOP_SITES, check_child
from .values import Alias, Saved, Value, _find_tracer

if TYPE_CHECKING:
    from ..model import Model
    from ..result import Result

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_state = threading.local()
_patch_lock = threading.Lock()
_patch_users = 0  # with-blocks recording in any thread: nn.Module.__call__ is patched while > 0


def _user_location() -> str:
    """``file:line`` of the innermost frame outside tracevene and torch."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith((_PACKAGE_DIR, _TORCH_DIR)):
            return f"{os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return ""


class Tracer:
    """Records the nodes of one with-block."""

    def __init__(self, model: Model):
        self.model = model
        self.nodes: list[Node] = []
        self.n_sources = 0
        self.modules: dict[str, nn.Module] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self._module_keys: dict[int, str] = {}
        self._tensor_refs: dict[int, Ref] = {}
        self.source_inputs: list[Any] = []
        self.save_names: dict[str, str] = {}  # save name -> file:line of its first use
        self.program: Program | None = None
        self.result: Result | None = None
        self.node_map: dict[int, int] = {}  # recorded node id -> id in the built program
        self.rebinds: dict[int, str] = {}  # in-place operator on a computed value -> "+=", ...
        self.rereads: set[int] = set()  # getitems that re-read an alias after a write
        self.closed = False

    # -- recording -------------------------------------------------------------
    def add(self, op: Op, target: str | None, run: int | None, args: tuple = (),
            kwargs: dict | None = None) -> int:  # fmt: skip
        """Record a node and return its id."""
        if self.closed:
            raise TraceError(
                "this with-block has ended; traced values cannot be used after it. Use "
                "saved.value for results, or record a new block."
            )
        args = tuple(self._lift(a) for a in args)
        kw = tuple((k, self._lift(v)) for k, v in (kwargs or {}).items())
        node = Node(len(self.nodes), op, target, run, args, kw, _user_location())
        self.nodes.append(node)
        return node.id

    def value(self, op: Op, target: str | None, args: tuple = (), kwargs: dict | None = None):
        """Record a node and return a ``Value`` for its result."""
        return Value(self, self.add(op, target, None, args, kwargs))

    def save(self, value: Value, name: str | None) -> Saved:
        """Record a save of ``value``."""
        if name is not None and not isinstance(name, str):
            raise TraceError(
                f"save names are strings, got {type(name).__name__} {name!r}: use "
                ".save('name'), or .save() and index the result with the returned handle."
            )
        if name is not None and name in self.save_names:
            first = self.save_names[name]
            raise TraceError(
                f"save name {name!r} is already used by the save at {first or 'an earlier line'}"
                "; names must be unique within a with-block: pick another name, or .save() "
                "without a name and keep the returned handle."
            )
        save = self.add("save", name, None, (value,))
        if name is not None:
            self.save_names[name] = self.nodes[save].loc
        return Saved(self, value._node, save, name)

    def _lift(self, x: Any) -> Any:
        """Turn a Python argument into a node argument (values -> refs, tensors -> consts)."""
        if isinstance(x, Value):
            if x._tracer is not self:
                raise TraceError("a traced value from another with-block cannot be used here.")
            return Ref(x._node)
        if isinstance(x, torch.Tensor):
            return self._const(x)
        if isinstance(x, (tuple, list)):
            items = [self._lift(v) for v in x]
            return tuple(items) if isinstance(x, tuple) else items
        if isinstance(x, slice):
            return slice(self._lift(x.start), self._lift(x.stop), self._lift(x.step))
        if x is None or x is Ellipsis or isinstance(x, (bool, int, float, str, torch.dtype)):
            return x
        if isinstance(x, torch.Size):
            return tuple(x)
        raise TraceError(
            f"cannot record an argument of type {type(x).__name__} ({x!r}); programs hold "
            "tensors, numbers, strings, slices and tuples/lists of those."
        )

    def _const(self, t: torch.Tensor) -> Ref:
        if id(t) not in self._tensor_refs:
            key = f"c{len(self.tensors)}"
            self.tensors[key] = t
            node = Node(len(self.nodes), "const", key, loc=_user_location())
            self.nodes.append(node)
            self._tensor_refs[id(t)] = Ref(node.id)
        return self._tensor_refs[id(t)]

    def call_module(self, module: nn.Module, args: tuple, kwargs: dict) -> Value:
        """Record one call of an intervention module on traced values."""
        if id(module) not in self._module_keys:
            key = f"m{len(self.modules)}"
            self.modules[key] = module
            self._module_keys[id(module)] = key
        return self.value("call_module", self._module_keys[id(module)], args, kwargs)

    def read(self, run: int, site: str) -> int:
        """Record a read of ``site`` in ``run``."""
        self.model.check_site(site)
        return self.add("read", site, run)

    def write(self, run: int, site: str, index: Any, value: Any) -> None:
        """Record ``run.site[index] = value``."""
        self.model.check_site(site)
        if not isinstance(value, (Value, torch.Tensor, int, float, bool)):
            raise TraceError(
                f"cannot write a {type(value).__name__} to a site: write a traced value, a "
                "tensor or a number."
            )
        self.add("write", site, run, (index, value))

    def write_site(self, run: int, site: str, value: Any) -> None:
        """Record ``run.site = value``; nothing when ``value`` is the site's current value.

        ``run.site op= v`` ends with that assignment, after the in-place operator has
        written the site already (``Alias._inplace``).
        """
        if not (
            isinstance(value, SiteValue)
            and (value._tracer, value._run, value._site) == (self, run, site)
            and self.unwritten_since(value._read)
        ):
            self.write(run, site, (), value)

    def unwritten_since(self, node: int) -> bool:
        """Whether no write was recorded after node ``node``."""
        return all(n.op != "write" for n in self.nodes[node + 1 :])

    # -- finishing ---------------------------------------------------------------
    def _check_no_dead_changes(self) -> None:
        """Refuse an item assignment or in-place operator whose result nothing uses."""
        used = {r for n in self.nodes for r in n.refs()}
        changes = (n for n in self.nodes if n.op == "setitem" or n.id in self.rebinds)
        dead = next((n for n in changes if n.id not in used), None)
        if dead is None:
            return
        what = f"`{self.rebinds[dead.id]}`" if dead.id in self.rebinds else "assignment"
        raise TraceError(
            f"line {dead.loc}: this {what} changes a copy of a computed value that nothing "
            "uses afterwards, so it would have no effect. Only a site and its views "
            "(x = t.<site>, x = t.<site>[:, 0], x[1] of those: ints, slices, None, ...) "
            "write the site when changed in place; the result of a computation (x * 2, "
            "x.save(), x[:, [0, 2]], a torch function) is a new value. To write the site, "
            "apply the change to the site (t.<site>[:, 0] += v); to change the computed "
            "value, use it afterwards."
        )

    def _live(self) -> set[int]:
        """Ids of the nodes to keep: all but reads, constants and re-reads nothing uses."""
        prunable = {n.id for n in self.nodes if n.op in ("read", "const")} | self.rereads
        used: set[int] = set()
        live: set[int] = set()
        for n in reversed(self.nodes):  # a node refers to earlier nodes only
            if n.id in used or n.id not in prunable:
                live.add(n.id)
                used.update(n.refs())
        return live

    def build(self) -> Program:
        """The recorded program, without reads and constants that nothing uses."""
        self._check_no_dead_changes()
        live = self._live()
        keep = [n for n in self.nodes if n.id in live]
        new_id = {n.id: i for i, n in enumerate(keep)}

        def remap(x: Any) -> Any:
            if isinstance(x, Ref):
                return Ref(new_id[x.id])
            if isinstance(x, (tuple, list)):
                return type(x)(remap(v) for v in x)
            if isinstance(x, slice):
                return slice(remap(x.start), remap(x.stop), remap(x.step))
            return x

        nodes = [
            Node(new_id[n.id], n.op, n.target, n.run, remap(n.args),
                 tuple((k, remap(v)) for k, v in n.kwargs), n.loc)
            for n in keep
        ]  # fmt: skip
        consts = {n.target for n in nodes if n.op == "const"}
        tensors = {k: v for k, v in self.tensors.items() if k in consts}
        self.node_map = new_id
        return Program(nodes, self.n_sources, self.modules, tensors)


# -- proxies for runs and sites ----------------------------------------------------
class SiteValue(Alias):
    """The value at a site of one run; item assignment and in-place operators write it."""

    __slots__ = ()

    def __init__(self, tracer: Tracer, run: int, site: str):
        read = tracer.read(run, site)
        super().__init__(tracer, read)
        for name, v in (("_run", run), ("_site", site), ("_read", read)):
            object.__setattr__(self, name, v)

    def _fresh(self) -> tuple[int, int]:
        read = self._tracer.read(self._run, self._site)
        return read, read

    def _assign(self, value: Any) -> None:
        self._tracer.write(self._run, self._site, (), value)

    def _assign_at(self, index: Any, value: Any) -> None:
        self._tracer.write(self._run, self._site, index, value)


class _Scope:
    """An attribute path inside a run (``t.layer[3].attn``): children are sites or scopes."""

    __slots__ = ("_tracer", "_run", "_prefix", "_level", "_where", "_head")

    def __init__(self, tracer: Tracer, run: int, prefix: str, level: str, where: str,
                 head: int | None = None):  # fmt: skip
        values = (tracer, run, prefix, level, where, head)
        for k, v in zip(_Scope.__slots__, values, strict=True):
            object.__setattr__(self, k, v)

    def _name(self, attr: str) -> str:
        check_child(self._level, attr, self._where)
        if self._head is None:
            return f"{self._prefix}{attr}"
        # a negative head counts from the end of the heads this site has (GQA: k, v)
        resolver = self._tracer.model.resolver
        n = resolver.n_kv_heads if attr in ("k", "v") else resolver.n_heads
        if not -n <= self._head < n:
            what = "key/value heads" if n != resolver.n_heads else "heads"
            raise SiteError(
                f"head {self._head} is out of range for {self._where}.{attr}: this model has "
                f"{what} 0..{n - 1} (negative indices count from the end)."
            )
        return f"{self._prefix}{self._head % n}.{attr}"

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # the attribute protocol (hasattr, copy, pickle)
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {attr!r}", name=attr
            )
        name = self._name(attr)
        if attr in ("attn", "mlp"):
            return _Scope(self._tracer, self._run, name + ".", attr, f"{self._where}.{attr}")
        if attr in ("layer", "head"):
            return _Indexed(self, attr)
        return SiteValue(self._tracer, self._run, name)

    def __setattr__(self, attr: str, value: Any) -> None:
        self._tracer.write_site(self._run, self._name(attr), value)


class _Indexed:
    """``t.layer`` / ``attn.head``: indexable by int (negative counts from the end)."""

    __slots__ = ("_scope", "_kind")

    def __init__(self, scope: _Scope, kind: str):
        self._scope, self._kind = scope, kind

    def __len__(self) -> int:
        return self._count()

    def _count(self) -> int:
        model = self._scope._tracer.model
        return model.n_layers if self._kind == "layer" else model.n_heads

    def __getitem__(self, i: int) -> _Scope:
        if not isinstance(i, int) or isinstance(i, bool):
            raise SiteError(
                f"{self._kind}[{i!r}]: index {self._kind}s with a plain int "
                f"(loop with for i in range(...) to cover several)."
            )
        s = self._scope
        where = f"{s._where}.{self._kind}[{i}]".lstrip(".")
        if self._kind == "head":  # checked per site: k and v may have fewer heads
            return _Scope(s._tracer, s._run, f"{s._prefix}head.", "head", where, head=i)
        n = self._count()
        if n is not None and not -n <= i < n:
            raise SiteError(
                f"layer {i} is out of range: this model has layers 0..{n - 1} (negative "
                "indices count from the end)."
            )
        i = i % n if n is not None else i
        return _Scope(s._tracer, s._run, f"{s._prefix}layer.{i}.", "layer", where)

    def __iter__(self):
        return (self[i] for i in range(self._count()))


class _ModuleSites:
    """``t.module(path)``: ``.input`` and ``.output`` sites of any submodule."""

    def __init__(self, tracer: Tracer, run: int, path: str):
        self._tracer, self._run, self._path = tracer, run, path
        tracer.model.check_site(f"module:{path}:output")

    @property
    def input(self) -> SiteValue:
        """The module's first positional argument."""
        return SiteValue(self._tracer, self._run, f"module:{self._path}:input")

    @input.setter
    def input(self, value: Any) -> None:
        self._tracer.write_site(self._run, f"module:{self._path}:input", value)

    @property
    def output(self) -> SiteValue:
        """The module's output (its first element when it returns a tuple)."""
        return SiteValue(self._tracer, self._run, f"module:{self._path}:output")

    @output.setter
    def output(self, value: Any) -> None:
        self._tracer.write_site(self._run, f"module:{self._path}:output", value)


class Run(_Scope):
    """One run of the model inside a trace: the base run (``t``) or a source.

    Sites are attributes: ``t.layer[3].mlp.out``, ``t.embed``, ``t.logits``.
    """

    __slots__ = ()

    def __init__(self, tracer: Tracer, run: int):
        super().__init__(tracer, run, "", "run", "t" if run == 0 else f"src{run}")

    def site(self, name: str, layer: int | None = None, head: int | None = None) -> SiteValue:
        """A site of this run by its name: ``t.site("attn.z", layer=3, head=2)``.

        The same value (and the same program) as the attribute path:
        ``t.site("attn.z", layer=3, head=2)`` is ``t.layer[3].attn.head[2].z``,
        ``t.site("resid_pre", layer=0)`` is ``t.layer[0].resid_pre`` and
        ``t.site("logits")`` is ``t.logits``; writes through it (``site[:, 4] = v``,
        ``site += v``) write the site.

        Args:
            name: A site without its layer and head: ``"embed"``, ``"final"``,
                ``"logits"``, ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``,
                ``"attn.q"`` / ``k`` / ``v`` / ``pattern`` / ``z`` / ``out``,
                ``"mlp.hidden"``, ``"mlp.out"``.
            layer: The layer, for every site but ``embed``, ``final`` and ``logits``
                (negative counts from the end).
            head: One head of an ``attn.*`` site, or ``None`` for all heads.

        Returns:
            The site's value in this run.

        Raises:
            SiteError: An unknown name, a missing or unwanted layer, a head on a site
                that has no heads, or a layer or head out of range.
        """
        _check_site_name(name, layer, head)
        scope: Any = self if layer is None else self.layer[layer]
        parts = name.split(".")
        if head is not None:
            scope, parts = scope.attn.head[head], parts[1:]
        for part in parts:
            scope = getattr(scope, part)
        return scope

    def module(self, path: str) -> _ModuleSites:
        """Sites of any submodule: ``t.module("transformer.h.3.mlp").output``."""
        return _ModuleSites(self._tracer, self._run, path)

    def hook(self, name: str) -> SiteValue:
        """A TransformerLens hook point (``blocks.3.hook_mlp_out``)."""
        return SiteValue(self._tracer, self._run, f"hook:{name}")

    def source(self, inputs: Any = None) -> Run:
        """Another run of the same model (a source for interchange interventions)."""
        self._base_only("source")
        tracer = self._tracer
        tracer.n_sources += 1
        tracer.source_inputs.append(inputs)
        return Run(tracer, tracer.n_sources)

    def arg(self, name: str) -> Value:
        """A placeholder bound when the program runs: ``program.run(..., name=value)``."""
        self._base_only("arg")
        if any(n.op == "arg" and n.target == name for n in self._tracer.nodes):
            raise TraceError(f"placeholder {name!r} is already defined; reuse its value.")
        return self._tracer.value("arg", name)

    @property
    def program(self) -> Program:
        """The recorded program (after the block)."""
        if self._tracer.program is None:
            raise TraceError(
                "t.program is available after the with-block ends, and only if the block "
                "finished without an exception."
            )
        return self._tracer.program

    @property
    def output(self) -> Any:
        """The base run's model output (after a block that ran)."""
        self._base_only("output")
        if self._tracer.result is None:
            from ..errors import NotRunError

            raise NotRunError(
                "t.output exists after a with-block that was given inputs has ended."
            )
        return self._tracer.result.output

    def _base_only(self, what: str) -> None:
        if self._run != 0:
            raise TraceError(f"{what} belongs to the base run t, not to source {self._run}.")

    def __repr__(self) -> str:
        return f"<run {self._where}>"


_LAYER_KEYS = (*LAYER_SITES, *(f"attn.{s}" for s in ATTN_SITES), *(f"mlp.{s}" for s in MLP_SITES))


def _check_site_name(name: Any, layer: Any, head: Any) -> None:
    """Refuse a name ``Run.site`` does not know, or a layer or head it cannot take."""
    valid = (*TOP_SITES, *_LAYER_KEYS)
    if name not in valid:
        near = ", ".join(closest(str(name), valid))
        raise SiteError(
            f"run.site({name!r}): not a site name; closest: {near} (all: {', '.join(valid)}). "
            "Give the layer and head as arguments: run.site('attn.z', layer=3, head=2)."
        )
    where = f"run.site({name!r}, layer={layer!r}, head={head!r})"
    if name in TOP_SITES and (layer is not None or head is not None):
        raise SiteError(
            f"{where}: {name} has no layers or heads; call run.site({name!r}) alone."
        )
    if name in _LAYER_KEYS and layer is None:
        raise SiteError(f"{where}: {name} is a per-layer site; give layer=i (0 .. n_layers - 1).")
    if head is not None and not name.startswith("attn."):
        heads = ", ".join(f"attn.{s}" for s in ATTN_SITES)
        raise SiteError(f"{where}: {name} has no heads; head= goes with {heads}.")


# -- module calls on traced values ------------------------------------------------------
_original_call = nn.Module.__call__


def _patched_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    tracer = _find_tracer((args, kwargs))
    if tracer is not None and tracer in getattr(_state, "active", ()):
        return tracer.call_module(module, args, kwargs)
    return _original_call(module, *args, **kwargs)


class trace:  # noqa: N801 - used as a function: iv.trace(model, ...)
    """Record an intervention program, and run it when the block ends if given inputs.

    Batches of prompts of different lengths (``list[str]``, or a dict with an
    ``attention_mask``) give at every real token the values of each prompt run alone,
    padded on the left or on the right: position ids come from the attention mask.
    Position ``-1`` is each prompt's last token only under left padding. Under right
    padding, index each prompt's last real token with per-example positions,
    ``t.logits[torch.arange(batch), iv.last_token_positions(inputs)]``; a read or
    write at a negative position of a right-padded run raises ``ExecutionError``.

    Runs on one model are serialised across threads (a re-entrant lock per module,
    see the Threads section of the backends page): several threads may trace one
    model, each gets its own numbers, and the model is left as it was.

    Args:
        model: An ``iv.Model``, or any ``nn.Module`` (wrapped on the torch
            backend).
        base: Inputs of the base run: token ids ``[batch, pos]``, a dict or
            ``BatchEncoding``, or text (``str`` / ``list[str]``, tokenised with the
            model's tokenizer, padded on its ``padding_side``); ``None`` only records a
            reusable program.
        schedule: ``"auto"``, ``"batched"`` or ``"sequential"`` (see ``Program.run``).
        **kwargs: Values of placeholders (``t.arg(name)``) by name; the rest are keyword
            arguments of the model's forward. A keyword that forward does not take
            raises ``TraceError`` naming the closest valid one; where forward takes
            ``**kwargs``, only a near miss of a known name (``schedul=``) is refused.

    Example:
        ```python
        import torch, transformers
        import tracevene as iv

        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100)
        model = iv.wrap(transformers.GPT2LMHeadModel(cfg), backend="torch")
        base, source = torch.randint(0, 100, (2, 2, 6))
        with iv.trace(model, base) as t:
            src = t.source(source)
            t.layer[1].mlp.out[:, 4] = src.layer[1].mlp.out[:, 4]
            logits = t.logits.save()
        print(logits.value.shape)  # torch.Size([2, 6, 100])
        ```
    """

    def __init__(self, model: Any, base: Any = None, *, schedule: str = "auto", **kwargs: Any):
        from ..model import as_model

        self.model = as_model(model)
        self.base, self.schedule, self.kwargs = base, schedule, kwargs
        self.tracer = Tracer(self.model)

    def __enter__(self) -> Run:
        global _patch_users
        _state.active = (*getattr(_state, "active", ()), self.tracer)
        with _patch_lock:
            _patch_users += 1
            nn.Module.__call__ = _patched_call
        return Run(self.tracer, 0)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        global _patch_users
        _state.active = tuple(t for t in _state.active if t is not self.tracer)
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                nn.Module.__call__ = _original_call
        self.tracer.closed = True
        if exc_type is not None:
            return False
        tracer = self.tracer
        tracer.program = tracer.build()
        if self.base is not None:
            self._run(tracer.program)
        return False

    def _run(self, program: Program) -> None:
        tracer = self.tracer
        missing = [i + 1 for i, s in enumerate(tracer.source_inputs) if s is None]
        if missing:
            raise TraceError(
                f"source(s) {missing} have no inputs, but the block runs (it was given base "
                "inputs): pass t.source(inputs) for each source."
            )
        args = {k: v for k, v in self.kwargs.items() if k in program.args}
        forward = {k: v for k, v in self.kwargs.items() if k not in program.args}
        _check_forward_keywords(self.model.module, forward, program.args)
        text = next((k for k, v in args.items() if isinstance(v, (str, bytes))), None)
        if text is not None:
            line = next((n.loc for n in tracer.nodes if n.op == "arg" and n.target == text), "")
            raise TraceError(
                f"line {line}: placeholder {text!r} is bound to the string "
                f"{args[text]!r}; placeholders take tensors and numbers (e.g. a position "
                "index or a scale), so bind it to one of those."
            )
        result = program.run(
            self.model, self.base, tracer.source_inputs, schedule=self.schedule,
            forward_kwargs=forward, **args,
        )  # fmt: skip
        tracer.result = result


def _check_forward_keywords(module: nn.Module, forward: dict[str, Any], args: Any) -> None:
    """Refuse a keyword of ``iv.trace`` that is no placeholder and that forward cannot take.

    A forward that takes ``**kwargs`` accepts any name, so there only a near miss of a
    name tracevene or forward knows (``schedul=``) is refused; the rest pass through.
    """
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return  # no signature to check against
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    known = ["schedule", *args, *named]
    for name in forward:
        if name in named:
            continue
        if open_ended and not difflib.get_close_matches(name, known, n=1, cutoff=0.8):
            continue
        placeholders = ", ".join(repr(a) for a in args) or "none"
        raise TraceError(
            f"iv.trace got the keyword {name!r}, which is not a keyword of iv.trace "
            f"(schedule), not a placeholder of the program ({placeholders}) and not a "
            f"parameter of {type(module).__name__}.forward; closest: "
            f"{', '.join(closest(name, known))}."
        )


__all__ = ["trace", "Run", "Value", "Saved"]

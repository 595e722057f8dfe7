"""The TransformerLens backend: programs run through TransformerLens hook points.

Every forward pass of the plan (``plan.make_plan``, shared with every backend) is one
call of the engine inside its own ``hooks(fwd_hooks=...)`` context manager, the API
that ``TransformerBridge`` (TransformerLens 3.9 and 4.x) and ``HookedTransformer``
(3.x) share; ``run_with_hooks`` is the same thing in one call. The events at each
hook point are executed by the shared ``tracevene.runtime.events.PassRun``,
exactly as on the torch backend. TransformerLens removes its hooks when the context
exits, whatever was raised inside it.

Engines:

- ``iv.wrap(hf_model, backend="transformer_lens")`` builds a ``TransformerBridge``
  with ``build_bridge_from_module`` on a private deep copy (the bridge rewires the
  module it is given); the caller's model is never touched. Bare base models
  (``GPT2Model``, ``LlamaModel``, ``BertModel``) are bridged with the adapter of their
  language-model class, minus the head.
- ``iv.wrap(tl_model)`` runs a ``TransformerBridge`` or ``HookedTransformer`` as is.

Sites come from the architecture tables (``tracevene/sites/arch.py``): the ``tl``
column of the model's Hugging Face family on a bridge (``TL_BRIDGE``, ``TL_POST_LN``
for BERT), ``TL_HOOKED`` on a ``HookedTransformer``; views come from
``tracevene/sites/views.py``. Head sites (``attn.head[h].q`` ...) are slices of the
per-layer hook points on the head axis; ``head[h].out`` is ``z_h @ W_O[h]`` (no bias)
computed from ``hook_z`` and written as a delta, as on the torch backend, so no model
setting (``use_attn_result``) is ever changed. Where an engine computes attention
probabilities after the fact (BERT bridges fire ``hook_pattern`` after the attention
output), ``attn.pattern`` goes through the eager-attention route instead.

Forward order comes from one probe forward pass (two tokens, no grad) that records
when each hook point and module runs; a hook point that never runs, or runs more
than once, is refused with a ``SiteError`` before any run.
``t.hook(name)`` reaches any hook point (aliases resolve to TransformerLens's own
names); ``t.module(path)`` reaches modules with plain torch hooks (Hugging Face paths
inside a bridge, TransformerLens paths on a ``HookedTransformer``).
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor, nn

from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    BackendError,
    ExecutionError,
    SiteError,
    closest,
)
from ..ir.program import Program
from ..runtime.attention import pattern_attention
from ..runtime.engine import Backend, module_lock
from ..runtime.events import PassRun, Stop
from ..runtime.hooks import install
from ..runtime.inputs import Call, batch_size, can_batch, concat, slice_output, with_position_ids
from ..runtime.interpret import Env
from ..runtime.plan import Pass
from ..sites import views
from ..sites.arch import HOOKED_TRANSFORMER, NO_HEAD, Arch, Point, PointIO, find_arch
from ..sites.bind import Binding, available_key, head_of, offered, table_key
from ..sites.views import View
from ..sites.vocab import Site, display, parse

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookPoint

    from ..model import Model

ON_TL = " on the transformer_lens backend"

try:
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources import build_bridge_from_module
except ImportError as e:  # pragma: no cover - get_backend checks the package first
    raise BackendError(
        "the 'transformer_lens' backend needs TransformerLens (3.9+ or 4.x): pip install "
        f"'tracevene[transformer-lens]' ({e})"
    ) from e

#: TransformerLens config flags that switch hook points off, by hook-name suffix.
GATES = (
    ("attn.hook_result", "use_attn_result"),
    ("hook_q_input", "use_split_qkv_input"),
    ("hook_k_input", "use_split_qkv_input"),
    ("hook_v_input", "use_split_qkv_input"),
    ("mlp_in", "use_hook_mlp_in"),
    ("attn_in", "use_attn_in"),
)

_PRIVATE: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # bridges built by this backend


class LensConfig(Protocol):
    """What this backend reads of a TransformerLens config (bridge or HookedTransformer)."""

    @property
    def n_layers(self) -> int:
        """Blocks."""
        ...

    @property
    def n_heads(self) -> int:
        """Query heads per block."""
        ...

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        ...

    @property
    def d_head(self) -> int:
        """Width of one head."""
        ...


class LensEngine(Protocol):
    """What this backend uses of a TransformerLens engine besides its ``nn.Module`` side.

    A ``TransformerBridge`` (TransformerLens 3.9 and 4.x) or a ``HookedTransformer``
    (3.x); ``blocks`` is typed loosely, as in TransformerLens's own ``model_protocol``.
    """

    @property
    def cfg(self) -> LensConfig:
        """The engine's config."""
        ...

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Hook name (TransformerLens's own or an alias) -> ``HookPoint``."""
        ...

    @property
    def blocks(self) -> Any:
        """The blocks (``blocks[i].attn``)."""
        ...

    def hooks(self, fwd_hooks: list[tuple[str, Callable[..., Any]]]) -> AbstractContextManager:
        """A context in which ``fwd_hooks`` are attached to their hook points."""
        ...

    def to_tokens(self, text: str | list[str]) -> Tensor:
        """Token ids of text, with the engine's own tokenizer."""
        ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The forward pass."""
        ...


class LensBackend(Backend):
    """Runs programs through TransformerLens hook points (``hooks()`` / ``run_with_hooks``)."""

    name = "transformer_lens"

    def prepare(self, module: nn.Module) -> nn.Module:
        """The caller's TransformerLens model, or a bridge over a private copy of an HF one."""
        if is_lens(module):
            return module
        return build_bridge(module)

    def make_resolver(self, module: nn.Module) -> LensResolver:
        """Binds site names to the engine's hook points."""
        return LensResolver(module)

    def check_program(self, model: Model, program: Program) -> None:
        """Refuse writes to hook points this engine only lets us read."""
        lens_resolver(model).check_writes(program)

    def to_call(
        self,
        model: Model,
        inputs: Any,
        forward_kwargs: dict[str, Any],
        device: torch.device | None = None,
    ) -> Call:
        """Forward arguments of the engine (text goes through its tokenizer)."""
        return lens_resolver(model).to_call(model, inputs, forward_kwargs, device)

    def can_batch(self, model: Model, calls: list[Call]) -> bool:
        """Runs with inputs of one shape share a pass."""
        return can_batch(calls)

    def run_pass(self, model: Model, p: Pass, calls: list, env: Env) -> Any:
        """One forward call inside the engine's ``hooks()`` context."""
        return _run_pass(model, p, calls, env)


def lens_resolver(model: Model) -> LensResolver:
    """``model``'s resolver, which this backend made.

    Raises:
        BackendError: ``model`` was wrapped for another backend.
    """
    resolver = model.resolver
    if not isinstance(resolver, LensResolver):
        raise BackendError(
            f"this model was wrapped for the {model.backend.name!r} backend, so the "
            "transformer_lens backend cannot run it: use model.to_backend('transformer_lens')."
        )
    return resolver


# -- engines ---------------------------------------------------------------------------
def is_lens(module: Any) -> bool:
    """Whether ``module`` is a TransformerLens model (bridge or ``HookedRootModule``)."""
    return any(c.__module__.startswith("transformer_lens.") for c in type(module).__mro__)


class _BaseModel(nn.Module):
    """Holds a bare base model under the attribute its LM class uses (for the adapter)."""

    def __init__(self, attr: str, base: nn.Module):
        super().__init__()
        self.attr = attr
        self.add_module(attr, base)
        self.config = base.config
        self.train(base.training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.attr)(*args, **kwargs)


def build_bridge(module: nn.Module) -> nn.Module:
    """A ``TransformerBridge`` over a private deep copy of a Hugging Face model.

    Raises:
        BackendError: The module is not a Hugging Face model TransformerLens can bridge.
    """
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise BackendError(
            f"the transformer_lens backend bridges Hugging Face models and runs "
            f"TransformerLens models; a plain {type(module).__name__} has neither: use "
            "backend='torch' (or 'nnsight') with t.module(path) sites."
        )
    found = find_arch(module)
    copied = copy.deepcopy(module)
    architecture, drop = type(module).__name__, None
    if found is not None and found[1] == "" and found[0].lm_class:
        copied = _BaseModel(found[0].base, copied)  # a bare base model: no head
        architecture, drop = found[0].lm_class, copied
    try:
        bridge = build_bridge_from_module(
            copied,
            architecture,
            hf_config=copied.config,
            post_adapter_hook=None if drop is None else lambda a: _drop_missing(a, drop),
        )
    except (ValueError, NotImplementedError, AttributeError, KeyError) as e:
        raise BackendError(
            f"TransformerLens cannot build a bridge for {architecture} "
            f"(model_type {config.model_type!r}): {e}. Use backend='torch' or 'nnsight'."
        ) from e
    _PRIVATE.add(bridge)
    return bridge


def _drop_missing(adapter: Any, holder: nn.Module) -> None:
    """Remove adapter components whose module the (headless) model does not have."""
    for key, component in list(adapter.component_mapping.items()):
        path = getattr(component, "name", None)
        if path:
            try:
                holder.get_submodule(path)
            except AttributeError:
                del adapter.component_mapping[key]


# -- the resolver ------------------------------------------------------------------------
class LensResolver:
    """Binds site names to the hook points (and modules) of one TransformerLens engine.

    Every architecture fact comes from the site table (``sites/arch.py``), every view
    from ``sites/views.py``; this class binds them to the engine's hook points.

    Attributes:
        engine: The ``TransformerBridge`` / ``HookedTransformer`` that runs.
        lens: ``engine`` as a ``LensEngine`` (what this backend uses of it).
        plain: The Hugging Face model inside a bridge this backend built (its
            output is the run's output, and it runs without hooks), else ``None``
            (the output is the engine's logits).
        blocks: ``None``: the engine calls its own block components, so a pass
            cannot start at a later block.
        points: Hook name (TransformerLens's own or an alias) -> ``HookPoint``.
        modules: Module path -> module, for ``t.module(path)`` sites.
        table: The family's site table (``HOOKED_TRANSFORMER`` on a HookedTransformer).
        arch: ``table`` under the engine's name, as messages and ``repr`` show it.
    """

    def __init__(self, engine: nn.Module):
        if not is_lens(engine):
            raise BackendError(f"expected a TransformerLens model, got {type(engine).__name__}")
        self.engine = engine
        self.lens = cast(LensEngine, engine)  # is_lens: a TransformerLens engine
        self.bridge = isinstance(engine, TransformerBridge)
        hf = engine.original_model if isinstance(engine, TransformerBridge) else None
        self.hf_root = hf
        self.plain = hf if engine in _PRIVATE else None
        self.blocks = None
        self.points = dict(self.lens.hook_dict)
        self.modules = _module_paths(hf if hf is not None else engine)
        cfg = self.lens.cfg
        self.config = getattr(hf, "config", None) if self.bridge else cfg
        self.table, self.prefix = _table(engine, hf)
        self.vocab = bool(self.table.tl)
        self.n_layers = cfg.n_layers if self.vocab else None
        self.n_heads = cfg.n_heads if self.vocab else None
        kv = getattr(cfg, "n_key_value_heads", None) if self.vocab else None
        self.n_kv_heads = kv or self.n_heads
        self.d_model = cfg.d_model if self.vocab else None
        self.d_head = cfg.d_head if self.vocab else None
        model_type = getattr(self.config, "model_type", None) if self.bridge else None
        name = f"{type(engine).__name__}" + (f" ({model_type})" if model_type else "")
        self.arch = replace(self.table, name=name)
        self._probed: tuple | None = None
        self._order: dict[Point, int] = {}
        self._counts: Counter = Counter()
        self._cache: dict[str, Binding] = {}
        self._read_only: dict[str, str] = {}

    # -- names ---------------------------------------------------------------------
    def sites(self) -> list[str]:
        """Vocabulary sites this model offers, in forward order (``{h}``: any head)."""
        return offered(self.check, self.n_layers) if self.n_layers is not None else []

    def check(self, name: str) -> Site:
        """Parse and validate a site name for this model.

        Raises:
            SiteError: Unknown name, layer or head out of range, or a site this engine
                cannot offer (with the reason).
        """
        site = parse(name)
        if site.kind == "hook":
            self._hook(site.key)
        elif site.kind == "module":
            self._module(site.key, site.module_io)
        else:
            try:
                self._hook_of(site)
            except SiteError:
                if site.key != "attn.pattern" or self._eager_pattern(_layer(site)) is None:
                    raise
        return site

    def bind(self, name: str) -> Binding:
        """The ``Binding`` of a site name (validated, cached)."""
        self._refresh()
        if name not in self._cache:
            self._cache[name] = self._bind(self.check(name))
        return self._cache[name]

    def check_writes(self, program: Program) -> None:
        """Refuse, before anything runs, writes to sites this engine only lets us read."""
        for node in program.nodes:
            if node.op == "write":
                self.bind(node.key)
                reason = self._read_only.get(node.key)
                if reason:
                    raise SiteError(f"line {node.loc}: cannot write {display(node.key)}: {reason}.")

    # -- hook points and modules ---------------------------------------------------
    def _hook(self, name: str) -> str:
        """TransformerLens's own name of a hook point that runs once per forward."""
        self._refresh()
        if name not in self.points:
            near = ", ".join(repr(n) for n in closest(name, self.points))
            raise SiteError(f"no hook point {name!r} on this model; closest: {near}.")
        canonical = self.points[name].name or name
        for suffix, flag in GATES:
            if canonical.endswith(suffix) and not getattr(self.lens.cfg, flag, True):
                hint = ", or read attn.head[h].out" if flag == "use_attn_result" else ""
                raise SiteError(
                    f"hook({name!r}) is switched off on this model ({flag}=False). tracevene "
                    f"does not change model settings: call model.module.set_{flag}(True) "
                    f"first{hint}."
                )
        self._runs_once(Point(canonical, "hook"), f"hook({name!r})")
        return canonical

    def _module(self, path: str, io: PointIO) -> nn.Module:
        if path not in self.modules:
            near = ", ".join(repr(p) for p in closest(path, [n for n in self.modules if n]))
            raise SiteError(f"no module {path!r} in this model; closest paths: {near}.")
        self._runs_once(Point(path, io), f"module({path!r}).{io}")
        return self.modules[path]

    def _runs_once(self, point: Point, what: str) -> None:
        n = self._counts[point]
        if n == 0:
            raise SiteError(
                f"{what} never runs in this model's forward pass (TransformerLens computes "
                "it elsewhere or not at all), so it cannot be read or written on the "
                "transformer_lens backend."
            )
        if n > 1:
            raise SiteError(
                f"{what} runs {n} times in one forward pass, so it is ambiguous; "
                "tracevene does not guess which call you meant."
            )

    def _hook_of(self, site: Site) -> str:
        """The hook point of a vocabulary site (validated)."""
        where = display(site.name)
        if not self.vocab:
            raise SiteError(
                f"{where}: this {type(self.engine).__name__} has no site table on the "
                "transformer_lens backend; use t.hook(name) (hook names: "
                f"{', '.join(list(self.points)[:6])}, ...)."
            )
        key = available_key(self, site, where, self.table, self.table.tl, self.config, ON_TL)
        names = [n.format(i=site.layer) for n in self.table.tl[key].names]
        self._refresh()
        for n in names:
            if n in self.points and self._counts[Point(self.points[n].name or n, "hook")]:
                return self._hook(n)
        reason = NO_HEAD if key == "logits" else f"none of its hook points ({', '.join(names)}) run"
        raise SiteError(f"{where} is not available on this {self.arch.name}: {reason}.")

    # -- binding ---------------------------------------------------------------------
    def _bind(self, site: Site) -> Binding:
        if site.kind == "module":
            point = Point(site.key, site.module_io)
            return Binding(site, site.key, point.io, (self._order[point], 0), *views.IDENT)
        if site.kind == "hook":
            name = self._hook(site.key)
            order = (self._order[Point(name, "hook")], 0)
            return Binding(site, name, "hook", order, *views.IDENT)
        try:
            name = self._hook_of(site)
        except SiteError:  # hook_pattern does not run (an SDPA kernel): the eager route
            binding = self._eager_pattern_binding(site) if site.key == "attn.pattern" else None
            if binding is None:
                raise
            return binding
        order = (self._order[Point(name, "hook")], 0)
        view = self.table.tl[table_key(site)].view
        if view == "head_out":
            assert site.head is not None, "only attn.head[h].out has the head_out view"
            z = Point(self._hook(f"blocks.{site.layer}.attn.hook_z"), "hook")
            get, put = _head_out(site.head, z, self._w_o(_layer(site)))
            return Binding(site, name, "hook", order, get, put, (z,))
        if view == "resid_mid":
            pre = Point(self._hook(f"blocks.{site.layer}.hook_resid_pre"), "hook")
            return Binding(site, name, "hook", order, *views.resid_mid(pre), (pre,))
        get, put = head_of(views.IDENT, site)
        if site.key == "attn.pattern" and not self._pattern_live(_layer(site), name):
            binding = self._eager_pattern_binding(site)
            if binding is not None:
                return binding
            self._read_only[site.name] = (
                f"this {self.arch.name} computes attention probabilities after the attention "
                f"output ({name} fires after the weighted values), so writing them would "
                "change nothing; write attn.z or attn.v instead"
            )
        return Binding(site, name, "hook", order, get, put)

    def _eager_pattern_binding(self, site: Site) -> Binding | None:
        """Attention probabilities inside the HF attention, just before the weighted values."""
        path = self._eager_pattern(_layer(site))
        if path is None:
            return None
        get, put = head_of(views.IDENT, site)
        z = self._hook(f"blocks.{site.layer}.attn.hook_z")
        return Binding(site, path, "pattern", (self._order[Point(z, "hook")], -1), get, put)

    def _pattern_live(self, layer: int, name: str) -> bool:
        """Whether ``hook_pattern`` fires before the weighted values (so writes count)."""
        z = self.points.get(f"blocks.{layer}.attn.hook_z")
        z_at = self._order.get(Point(z.name, "hook")) if z is not None and z.name else None
        return z_at is not None and self._order[Point(name, "hook")] < z_at

    def _eager_pattern(self, layer: int) -> str | None:
        """The HF module whose attention probabilities the eager route exposes.

        For bridges that only report probabilities after the fact (BERT); ``None``
        where there is no such module.
        """
        hook = self.table.sites.get("attn.pattern")
        if hook is None or hook.io != "pattern":
            return None
        path = hook.path.format(layer=f"{self.prefix}{self.table.layers}.{layer}")
        if path not in self.modules or not self._counts[Point(path, "input")]:
            return None
        return path

    def _w_o(self, layer: int) -> Callable[[], Tensor]:
        """``() -> W_O`` of a layer as ``[H, Dh, D]`` (read when the view runs).

        TransformerLens's own ``attn.W_O`` where the engine has it (both engines in
        3.9 and 4.x), else the output projection's weight.
        """
        attn = self.lens.blocks[layer].attn
        cfg = self.lens.cfg
        h, dh = cfg.n_heads, cfg.d_head
        with contextlib.suppress(Exception):
            if tuple(attn.W_O.shape) == (h, dh, cfg.d_model):
                return lambda: attn.W_O
        o = getattr(attn, "o", None)
        o = getattr(o, "original_component", None) or o
        if isinstance(o, nn.Linear):
            linear = o
            return lambda: linear.weight.T.reshape(h, dh, -1)
        if o is not None and type(o).__name__ == "Conv1D":  # stores [d_in, d_out]
            conv = o
            return lambda: conv.weight.reshape(h, dh, -1)
        raise SiteError(
            f"layer[{layer}].attn.head[h].out is not available on this {self.arch.name}: "
            "TransformerLens gives no W_O for its attention."
        )

    # -- the probe ---------------------------------------------------------------------
    def _refresh(self) -> None:
        """Probe forward order once, and again whenever a hook-gating flag changes."""
        key = tuple(getattr(self.lens.cfg, flag, None) for _, flag in GATES)
        if self._probed == key:
            return
        # the engine's run lock: no other thread's run sees (or fires) the probe's hooks
        with module_lock(self.engine):
            if self._probed == key:
                return
            self._order, self._counts = self._probe()
            self._probed = key
            self._cache.clear()
            self._read_only.clear()

    def _probe(self) -> tuple[dict[Point, int], Counter[Point]]:
        """Run two tokens through the engine, noting when every hook point and module runs."""
        order: dict[Point, int] = {}
        counts: Counter[Point] = Counter()

        def note(point: Point) -> Callable[..., None]:
            def hook(*_: Any) -> None:
                counts[point] += 1
                order.setdefault(point, len(order))

            return hook

        handles = []
        try:
            for name, hp in {hp.name or n: hp for n, hp in self.points.items()}.items():
                handles.append(hp.register_forward_hook(note(Point(name, "hook"))))
            for path, mod in self.modules.items():
                handles.append(mod.register_forward_pre_hook(note(Point(path, "input"))))
                handles.append(mod.register_forward_hook(note(Point(path, "output"))))
            ids = torch.zeros((1, 2), dtype=torch.long, device=_device(self.engine))
            kwargs = {"use_cache": False} if self.bridge else {}
            with torch.no_grad():
                self.lens(ids, **kwargs)
        except Exception as e:
            raise BackendError(
                f"could not run a probe forward pass (two tokens) on this "
                f"{type(self.engine).__name__} to learn its hook order: {type(e).__name__}: {e}"
            ) from e
        finally:
            for h in handles:
                h.remove()
        return order, counts

    # -- inputs ------------------------------------------------------------------------
    def to_call(
        self,
        model: Model,
        inputs: Any,
        forward_kwargs: Mapping[str, Any],
        device: torch.device | None = None,
    ) -> Call:
        """``(args, kwargs)`` for ``engine(...)`` from one run's inputs.

        ``device``: where the inputs go (default ``model.device``).
        """
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and all(isinstance(s, str) for s in inputs)
        ):
            inputs = self._tokenize(model, inputs)
        if isinstance(inputs, Mapping):
            kwargs = dict(inputs)
            if "input_ids" not in kwargs:
                raise ArgumentTypeError(
                    f"a dict of inputs needs 'input_ids' on the transformer_lens backend; got "
                    f"{sorted(kwargs)}."
                )
            args = (kwargs.pop("input_ids"),)
        elif isinstance(inputs, Tensor):
            args, kwargs = (inputs,), {}
        else:
            raise ArgumentTypeError(
                f"cannot use a {type(inputs).__name__} as inputs on the transformer_lens "
                "backend: pass token ids (a LongTensor [batch, pos]), a dict with "
                "'input_ids', or text (with a tokenizer)."
            )
        kwargs = {**forward_kwargs, **kwargs}
        if self.bridge:
            kwargs.setdefault("use_cache", False)
        device = model.device if device is None else device
        to = lambda v: v.to(device) if isinstance(v, Tensor) else v  # noqa: E731
        args, kwargs = tuple(to(a) for a in args), {k: to(v) for k, v in kwargs.items()}
        hf = self.hf_root  # a bridge's (None on a HookedTransformer)
        if hf is not None and isinstance(args[0], Tensor) and args[0].dim() == 2:
            # the bridge hands keyword arguments on to the Hugging Face model
            hf = getattr(hf, hf.attr) if isinstance(hf, _BaseModel) else hf
            kwargs = with_position_ids(hf, kwargs, args[0].shape[1])
        return args, kwargs

    def _tokenize(self, model: Model, text: str | list[str]) -> Any:
        if model.tokenizer is not None:
            return dict(model.tokenizer(text, return_tensors="pt", padding=True))
        if getattr(self.engine, "tokenizer", None) is not None:
            return self.lens.to_tokens(text)
        raise ArgumentError(
            "text inputs need a tokenizer: iv.wrap(model, tokenizer=tok), or pass token ids "
            "(a LongTensor [batch, pos])."
        )


def _module_paths(root: nn.Module) -> dict[str, nn.Module]:
    """Module path -> module, with a bridge's wrapper layers folded into HF paths.

    A bridge replaces ``transformer.h.0`` by a component that holds the original as
    ``_original_component``; both answer to the Hugging Face path, and the outer one
    (which runs the original inside it) is hooked. Hook points are left to ``t.hook``.
    """
    from transformer_lens.hook_points import HookPoint

    out: dict[str, nn.Module] = {}
    for name, mod in root.named_modules(remove_duplicate=False):
        if isinstance(mod, HookPoint):
            continue
        path = ".".join(p for p in name.split(".") if p != "_original_component")
        out.setdefault(path, mod)
    return out


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _table(engine: nn.Module, hf: nn.Module | None) -> tuple[Arch, str]:
    """The engine's site table and the path prefix of its Hugging Face base model.

    A bridge's is its Hugging Face family's, a ``HookedTransformer``'s is
    ``HOOKED_TRANSFORMER``; any other engine gets an empty table (hook sites only).
    """
    found = find_arch(hf) if hf is not None else None
    if found is not None:
        return found
    if hf is None and type(engine).__name__ == "HookedTransformer":
        return HOOKED_TRANSFORMER, ""
    return Arch(type(engine).__name__, (), "", "", {}), ""


def _layer(site: Site) -> int:
    """The layer of a per-layer vocabulary site."""
    assert site.layer is not None, "a per-layer site names its layer"
    return site.layer


def _head_out(h: int, z: Point, w_o: Callable[[], Tensor]) -> View:
    """Head ``h``'s share of the attention output, from ``hook_z`` (captured) and ``W_O``."""
    return views.head_out(h, lambda ctx: ctx.captured[z][ctx.rows][..., h, :], lambda ctx: w_o()[h])


# -- running one pass --------------------------------------------------------------------
def _run_pass(model: Model, p: Pass, calls: list[Call], env: Env) -> Any:
    resolver = lens_resolver(model)
    state = PassRun(model, p, env, [batch_size(c) for c in calls])
    args, kwargs = concat(calls)
    fwd_hooks, handles, raw = [], [], {}
    try:
        for point in state.points:
            path, io = point
            if io == "hook":
                fwd_hooks.append((path, _lens_hook(state, point)))
            else:
                handles.append(install(state, point, resolver.modules[path]))
        plain = resolver.plain
        if plain is not None:
            capture = lambda m, a, out: raw.__setitem__("out", out)  # noqa: E731
            handles.append(plain.register_forward_hook(capture))
        eager = any(io == "pattern" for _, io in state.points)
        try:
            with pattern_attention(resolver.hf_root, eager):
                with resolver.lens.hooks(fwd_hooks=fwd_hooks):
                    logits = resolver.lens(*args, **kwargs)
        except Stop:
            logits = None
    finally:
        for h in handles:
            h.remove()
    if state.fired < state.points:
        raise ExecutionError(state.unfired_message())
    output = raw.get("out") if resolver.plain is not None else logits
    if 0 in p.runs and len(p.runs) > 1:
        output = slice_output(output, state.rows[0])
    return output


def _lens_hook(state: PassRun, point: Point) -> Callable:
    def hook(x: Tensor, hook: Any) -> Tensor | None:
        return state.fire(point, x, hook, None)

    return hook

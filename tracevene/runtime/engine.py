"""The backend interface, and the registry of backends (imported lazily)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import cached

from ..errors import ArgumentError, BackendError, closest
from ..ir.program import Program
from ..result import Result
from ..sites.bind import Resolver, SiteResolver
from .cache import SourceCache, cacheable, compact, handed_on, pass_key
from .inputs import Call, can_batch, check_padding, to_call
from .interpret import Env
from .plan import Pass, PlanCache

if TYPE_CHECKING:
    from ..model import Model

#: backend name -> (module, class, pip extra, package it needs)
BACKENDS: dict[str, tuple[str, str, str | None, str | None]] = {
    "torch": ("tracevene.backends.torch_hooks", "TorchBackend", None, None),
    "nnsight": ("tracevene.backends.nnsight", "NNsightBackend", "nnsight", "nnsight"),
    "transformer_lens": (
        "tracevene.backends.transformer_lens",
        "LensBackend",
        "transformer-lens",
        "transformer_lens",
    ),
}
PLANNED: dict[str, str] = {}


class Backend(ABC):
    """Executes programs on models.

    One small interface; ``torch_hooks.TorchBackend`` is the reference implementation.
    """

    name: str = ""

    @functools.cached_property
    def plans(self) -> PlanCache:
        """The plans of the programs this backend ran, reused by their later runs."""
        return PlanCache()

    def prepare(self, module: nn.Module) -> nn.Module:
        """The module this backend runs (the caller's, or a private copy)."""
        return module

    def make_resolver(self, module: nn.Module) -> SiteResolver:
        """The object that binds site names to this backend's hook points."""
        return Resolver(module)

    def check_site(self, model: Model, site: str) -> None:
        """Raise ``iv.SiteError`` if ``site`` is not valid on ``model``."""
        model.resolver.bind(site)  # binding validates, and caches the hook point

    def to_call(
        self,
        model: Model,
        inputs: Any,
        forward_kwargs: dict[str, Any],
        device: torch.device | None = None,
    ) -> Call:
        """``(args, kwargs)`` of the forward call for one run's inputs.

        ``device``: where the inputs go (``model.device``, read by the caller once
        per run; default: read here).
        """
        return to_call(model, inputs, forward_kwargs, device)

    def can_batch(self, model: Model, calls: list[Call]) -> bool:
        """Whether these runs may share one forward pass."""
        return model.resolver.arch is not None and can_batch(calls)

    def check_program(self, model: Model, program: Program) -> None:  # noqa: B027
        """Refuse, before anything runs, what this engine cannot do (default: nothing)."""

    @abstractmethod
    def run_pass(self, model: Model, p: Pass, calls: list[Call], env: Env) -> Any:
        """Run one forward pass of the plan; return the model output (``None`` if stopped)."""

    def run(
        self,
        model: Model,
        program: Program,
        inputs: Sequence[Any],
        args: Mapping[str, Any],
        forward_kwargs: dict[str, Any],
        schedule: str,
        source_cache: SourceCache | None = None,
    ) -> Result:
        """Run ``program`` with ``inputs[0]`` as the base and the rest as sources.

        Runs on one module are serialised: the whole run (hooks installed and removed,
        the attention-implementation switch, parameters frozen for autograd) holds
        ``module_lock(model.module)``, so concurrent runs from several threads wait for
        each other, and a run nested in another on the same thread does not deadlock.
        """
        with module_lock(model.module):
            return self._run(model, program, inputs, args, forward_kwargs, schedule, source_cache)

    def _run(
        self,
        model: Model,
        program: Program,
        inputs: Sequence[Any],
        args: Mapping[str, Any],
        forward_kwargs: dict[str, Any],
        schedule: str,
        source_cache: SourceCache | None,
    ) -> Result:
        self.check_program(model, program)
        device = model.device  # read once per run (it follows .to() at once)
        calls = [self.to_call(model, x, forward_kwargs, device) for x in inputs]
        check_padding(program, calls)

        mode = run_mode(schedule, device)
        plan = self.plans.plan(program, model.resolver.bind, mode, self.can_batch(model, calls))
        env = Env(program, dict(args), device)
        grad = torch.is_grad_enabled() and needs_grad(program, args)
        output = None
        # cached(): a rotation shared by many sites is materialised once per run
        once = cached() if program.modules else contextlib.nullcontext()
        with torch.set_grad_enabled(grad), frozen(model.module, grad, program), once:
            env.run_nodes(plan.prelude)
            for p in plan.passes:
                run_calls = [calls[r] for r in p.runs]
                if source_cache is not None and cacheable(p):
                    self._cached_pass(model, p, run_calls, env, source_cache)
                    continue
                out = self.run_pass(model, p, run_calls, env)
                if 0 in p.runs:
                    output = out
        values = {n.id: env.values[n.id] for n in plan.saves}
        saves = {n.target: values[n.id] for n in plan.saves if n.target}
        return Result(saves, output, values, plan, program)

    def _cached_pass(
        self, model: Model, p: Pass, calls: list[Call], env: Env, cache: SourceCache
    ) -> None:
        """Serve a clean source pass from ``cache``, or run it and keep what it hands on."""
        key = pass_key(model, p, calls, env.values, env.program.nodes)
        if key in cache.entries:
            cache.hits += 1
            env.values.update(cache.entries[key])
            return
        cache.misses += 1
        self.run_pass(model, p, calls, env)
        cache.entries[key] = {i: compact(env.values[i]) for i in handed_on(p, env.program.nodes)}


_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def module_lock(module: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises tracevene's runs on ``module``.

    Every program run holds it from before its first hook is installed until after
    the last is removed; hold it around anything else that runs ``module`` and must
    not see another thread's hooks (``with module_lock(model.module): ...``).
    """
    with _locks_guard:
        lock = _locks.get(module)
        if lock is None:
            lock = _locks[module] = threading.RLock()
        return lock


def run_mode(schedule: str, device: torch.device) -> str:
    """The schedule a run uses: ``"auto"`` resolved by device, others checked."""
    if schedule not in ("auto", "batched", "sequential"):
        raise ArgumentError(
            f"schedule={schedule!r}: choose 'auto', 'batched' (base and sources in one "
            "forward pass where possible) or 'sequential' (one pass per run)."
        )
    if schedule == "auto":  # batching is free on accelerators; on CPU, early stops win
        return "sequential" if device.type == "cpu" else "batched"
    return schedule


def needs_grad(program: Program, args: Mapping[str, Any]) -> bool:
    """Whether anything the program holds or is given requires grad."""
    if not (program.tensors or program.modules or args):
        return False
    tensors = [*program.tensors.values(), *(a for a in args.values() if isinstance(a, Tensor))]
    params = (p for m in program.modules.values() for p in m.parameters())
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in params)


def frozen(
    module: nn.Module, active: bool, program: Program
) -> contextlib.AbstractContextManager[None]:
    """Keep the model's own parameters out of the autograd graph while a program runs.

    Parameters that an intervention module of the program shares with the model stay
    trainable. Does nothing when ``active`` is false.
    """
    return _frozen(module, program) if active else contextlib.nullcontext()


@contextlib.contextmanager
def _frozen(module: nn.Module, program: Program) -> Iterator[None]:
    shared = {id(p) for m in program.modules.values() for p in m.parameters()}
    params = [p for p in module.parameters() if p.requires_grad and id(p) not in shared]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def get_backend(name: str) -> Backend:
    """The backend called ``name``.

    Raises:
        BackendError: Unknown name, or its package is not installed.
    """
    require_installed(name)
    module, cls = BACKENDS[name][:2]
    return getattr(importlib.import_module(module), cls)()


def require_installed(name: str) -> None:
    """Check that backend ``name`` exists and its package is installed, importing nothing.

    Raises:
        BackendError: Unknown name, or its package is not installed (the message names
            the pip extra).
    """
    if name not in BACKENDS:
        if name in PLANNED:
            raise BackendError(
                f"the {name!r} backend is not available in this version of tracevene; "
                "use backend='torch'."
            )
        near = ", ".join(closest(name, BACKENDS))
        raise BackendError(f"unknown backend {name!r}; closest: {near}.")
    _, _, extra, package = BACKENDS[name]
    if package is not None and importlib.util.find_spec(package) is None:
        raise BackendError(
            f"the {name!r} backend needs the {package!r} package: pip install 'tracevene[{extra}]'"
        )

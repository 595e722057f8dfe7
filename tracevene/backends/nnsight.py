"""The nnsight backend: programs run inside nnsight 0.8 traces.

Each forward pass of the plan (``plan.make_plan``, shared with every backend) is one
``with envoy.trace(...)`` block over a private ``nnsight.NNsight`` envoy of the
caller's module. The block's body is a single worker (``_Lowering.run``) that
visits the pass's hook points in forward order, reading ``envoy.inputs`` /
``envoy.output`` and assigning them back when the program writes; the events at each
point are executed by the shared ``tracevene.backends.events.PassRun``, exactly
as on the torch backend. Runs batched into one pass share one trace over the
concatenated inputs (rows are sliced by ``PassRun``), so a batched pass is one
worker and one forward.

The envoy is built once per model. nnsight instruments a module by putting a
controller into the module's ``__dict__`` (``forward`` and ``__nnsight__``); this
backend puts controllers only on the modules a pass visits, only while that pass
runs, and takes them off again in ``finally``: between runs -- and after any
exception -- the caller's model is exactly as it was, and during a run every other
module stays on PyTorch's plain call path. A source-only pass that has done all it
was needed for ends with nnsight's own early stop (``tracer.stop()``).

Attention probabilities (``attn.pattern``) have no module in nnsight: they go
through the torch backend's eager attention function and its per-module callback,
which runs on the model side of the trace while the worker waits.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..errors import ExecutionError, ScheduleError
from ..sites.bind import first_tensor
from .base import Backend
from .events import PassRun, Stop
from .inputs import batch_size, concat, slice_output
from .interpret import Env
from .plan import Pass
from .torch_hooks import (
    _PATTERN_HOOKS,
    _replace_first,
    _tensor_kwarg,
    pattern_attention,
)


def _define_anyio_classes_first() -> None:
    """Import anyio's ``TypedAttributeSet`` subclasses before nnsight.

    Importing nnsight 0.8.1 mounts ``.save`` on every object; anyio then rejects any
    ``TypedAttributeSet`` subclass defined afterwards ("Attribute 'save' is missing
    its type annotation"). nnsight pre-imports ``anyio``, but anyio 4.x loads those
    modules lazily, so a later ``httpx`` / ``anyio`` user would crash.
    """
    if "nnsight" in sys.modules:
        return
    for name in ("anyio.abc._sockets", "anyio.streams.file", "anyio.streams.tls"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


_define_anyio_classes_first()

import nnsight  # noqa: E402
from nnsight.intervention.interleaver import EarlyStopException, OutOfOrderError  # noqa: E402
from nnsight.intervention.source import STATE, Controller, State, module_body  # noqa: E402

_MISSING = object()


class NNsightBackend(Backend):
    """Runs programs inside ``nnsight`` traces (``NNsight`` envoys, any module)."""

    name = "nnsight"

    def __init__(self) -> None:
        self._wrapper: _Wrapper | None = None

    def run_pass(self, model: Any, p: Pass, calls: list, env: Env) -> Any:
        """One nnsight trace over the pass's runs, visiting hook points in forward order."""
        return _run_pass(model, self.wrapper(model.module), p, calls, env)

    def wrapper(self, module: nn.Module) -> _Wrapper:
        """The private nnsight envoy of ``module`` (built on first use, then cached)."""
        if self._wrapper is None or self._wrapper.module is not module:
            self._wrapper = _Wrapper(module)
        return self._wrapper


# -- the private envoy ------------------------------------------------------------------
class _Wrapper:
    """A private ``nnsight.NNsight`` envoy whose controllers are on the module only in use.

    nnsight routes a module through an envoy by a controller in the module's
    ``__dict__`` (``forward`` plus ``__nnsight__`` state). A pass attaches controllers
    to the modules it visits and takes them off afterwards; every other module runs on
    PyTorch's plain path. A module that already carries another nnsight envoy's
    controller (the caller wrapped the model with nnsight too) gets our route added to
    its state instead, and removed again after.

    Attributes:
        module: The caller's module.
        envoy: The root envoy.
        interleaver: The envoy tree's interleaver.
        envoys: Module path (as in ``named_modules``) -> its envoy.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.modules = dict(module.named_modules())
        before = {path: dict(vars(m)) for path, m in self.modules.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BERT's `output` submodules are renamed E_output
            self.envoy = nnsight.NNsight(module)
        self.interleaver = self.envoy.interleaver
        self.envoys = {path: self.interleaver.envoys[id(m)] for path, m in self.modules.items()}
        # id(module) -> (the instance forward it wraps, controller, state)
        self._controllers: dict[int, tuple[Any, Any, Any]] = {}
        for path, m in self.modules.items():  # take off what NNsight() put on
            d, old = vars(m), before[path]
            for key in ("forward", STATE):
                if key in old:
                    d[key] = old[key]
                else:
                    d.pop(key, None)
            if STATE in old:
                self._unroute(old[STATE])

    @contextlib.contextmanager
    def attached(self, paths: set[str]) -> Iterator[None]:
        """Route the modules at ``paths`` through our interleaver for the block."""
        undo = []
        try:
            for path in paths:
                undo.append(self._attach(path, self.modules[path]))
            yield
        finally:
            for m, state, forward in reversed(undo):
                if m is None:
                    continue
                if state is not None:
                    self._unroute(state)
                    continue
                d = vars(m)
                d.pop(STATE, None)
                d.pop("forward", None)
                if forward is not _MISSING:
                    d["forward"] = forward

    def _attach(self, path: str, m: nn.Module) -> tuple[Any, Any, Any]:
        d = vars(m)
        state = d.get(STATE)
        cached = self._controllers.get(id(m))
        if state is not None:
            if cached is not None and state is cached[2]:
                return None, None, None  # attached already (a nested run)
            state.register(self.interleaver, self.envoys[path].path)
            return m, state, None
        forward = d.get("forward", _MISSING)
        if cached is None or cached[0] is not forward:
            state = State(module_body(m))
            state.register(self.interleaver, self.envoys[path].path)
            cached = self._controllers[id(m)] = (forward, Controller(m, state), state)
        d["forward"], d[STATE] = cached[1], cached[2]
        return m, None, forward

    def _unroute(self, state: Any) -> None:
        state.routes[:] = [r for r in state.routes if r[0]() is not self.interleaver]

    def location(self, path: str, io: str) -> str:
        """The nnsight location of a module's input or output (``model.h.0.output``)."""
        return f"{self.envoys[path].path}.{io}"


# -- one pass ---------------------------------------------------------------------------
@dataclass
class _Step:
    """One place in forward order where the worker parks.

    Attributes:
        key: Forward-order sort key.
        path: Module path.
        io: ``"input"`` or ``"output"``.
        point: The pass's hook point here, or ``None`` (an input read for a later output).
        keep: Keep the module's first input for the output point of the same module.
    """

    key: tuple
    path: str
    io: str
    point: tuple[str, str] | None = None
    keep: bool = False


def _steps(model: Any, p: Pass, state: PassRun) -> list[_Step]:
    """The worker's stops: the pass's module points, plus the inputs their outputs need."""
    resolver = model.resolver

    def key(path: str, io: str) -> tuple:
        return p.order.get((path, io)) or resolver.bind(f"module:{path}:{io}").order

    steps: dict[tuple[str, str], _Step] = {}
    for path, io in state.points:
        if io == "pattern":
            continue
        step = steps.setdefault((path, io), _Step(key(path, io), path, io))
        step.point = (path, io)
        if io == "output":
            inp = steps.setdefault((path, "input"), _Step(key(path, "input"), path, "input"))
            inp.keep = True
    return sorted(steps.values(), key=lambda s: s.key)


class _Call:
    """The forward call of one pass, handed to ``envoy.trace`` as its single input."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict):
        self.module, self.args, self.kwargs = module, args, kwargs


def _forward(call: _Call) -> Any:
    return call.module(*call.args, **call.kwargs)


class _Lowering:
    """The trace body of one pass: visits its steps in forward order."""

    def __init__(self, wrapper: _Wrapper, state: PassRun, steps: list[_Step], result: bool):
        self.wrapper, self.state, self.steps, self.result = wrapper, state, steps, result
        self.modules: dict[str, nn.Module] = state.model.resolver.modules
        self.interleaver = wrapper.interleaver
        self.inputs: dict[str, Tensor | None] = {}
        self.at = 0
        self.output: Any = None

    def run(self, tracer: Any) -> None:
        """The worker (runs in nnsight's worker greenlet)."""
        try:
            for i, step in enumerate(self.steps):
                self.at = i
                if step.io == "input":
                    self._input(step)
                else:
                    self._output(step)
        except Stop:
            tracer.stop()  # nnsight unwinds the forward and ends the run quietly
        self.at = len(self.steps)
        if self.result:
            self.output = tracer.result

    def _input(self, step: _Step) -> None:
        envoy = self.wrapper.envoys[step.path]
        args, kwargs = envoy.inputs
        if args:
            key, x = None, args[0]
        elif kwargs or step.point is not None:  # as the torch backend's hooks do
            key = _tensor_kwarg(kwargs, step.path)
            x = kwargs[key]
        else:
            key, x = None, None
        if step.point is not None:
            new = self.fire(step.point, x, self.modules[step.path], None)
            if new is not None:
                envoy.inputs = (
                    ((new, *args[1:]), kwargs) if key is None else (args, {**kwargs, key: new})
                )
                x = new
        if step.keep:
            self.inputs[step.path] = x

    def _output(self, step: _Step) -> None:
        envoy = self.wrapper.envoys[step.path]
        output = envoy.output
        module = self.modules[step.path]
        new = self.fire(step.point, first_tensor(output), module, self.inputs.get(step.path))
        if new is not None:
            envoy.output = _replace_first(output, new)

    def fire(self, point: tuple[str, str], x: Tensor, module: nn.Module, inp: Any) -> Any:
        """``PassRun.fire`` with the trace stood down.

        Program nodes that call the model's own submodules (a logit lens) then run
        them plainly, as ``Envoy.__call__`` does, instead of feeding the trace.
        """
        interleaver = self.interleaver
        interleaver.interleaving = False
        try:
            return self.state.fire(point, x, module, inp)
        finally:
            interleaver.interleaving = True

    def pattern_hook(self, point: tuple[str, str], module: nn.Module) -> Any:
        """The attention-probability callback for ``point`` (runs on the model side)."""

        def hook(weights: Tensor) -> Tensor:
            try:
                new = self.fire(point, weights, module, None)
            except Stop:
                raise EarlyStopException() from None
            return weights if new is None else new

        return hook


def _trace(envoy: Any, call: _Call, lowering: _Lowering) -> None:
    # nnsight reads this block's body from this file and runs it in a worker greenlet.
    with envoy.trace(call, fn=_forward) as tracer:
        lowering.run(tracer)


def _run_pass(model: Any, wrapper: _Wrapper, p: Pass, calls: list, env: Env) -> Any:
    state = PassRun(model, p, env, [batch_size(c) for c in calls])
    args, kwargs = concat(calls)
    steps = _steps(model, p, state)
    lowering = _Lowering(wrapper, state, steps, 0 in p.runs)
    patterns = [point for point in state.points if point[1] == "pattern"]
    modules = model.resolver.modules
    counts = wrapper.interleaver.counts
    locations = [wrapper.location(s.path, s.io) for s in steps]
    before = [counts.get(loc, 0) for loc in locations]
    try:
        with pattern_attention(model.module, bool(patterns)):
            for point in patterns:
                _PATTERN_HOOKS[id(modules[point[0]])] = lowering.pattern_hook(
                    point, modules[point[0]]
                )
            with wrapper.attached({s.path for s in steps}):
                _trace(wrapper.envoy, _Call(model.module, args, kwargs), lowering)
    except OutOfOrderError:
        raise _never_reached(lowering, locations, before, counts) from None
    finally:
        for point in patterns:
            _PATTERN_HOOKS.pop(id(modules[point[0]]), None)
    for step, loc, n in zip(steps, locations, before, strict=True):
        if step.point is not None and counts.get(loc, 0) - n > 1:
            raise ExecutionError(
                f"module {step.path!r} ran more than once in one forward pass, so its sites "
                "are ambiguous; tracevene does not guess which call you meant."
            )
    if state.fired < state.points:
        raise ExecutionError(state.unfired_message())
    output = lowering.output
    if 0 in p.runs and len(p.runs) > 1:
        output = slice_output(output, state.rows[0])
    return output


def _never_reached(lowering: _Lowering, locations: list, before: list, counts: dict) -> Exception:
    """The error for a worker left waiting when the forward pass ended."""
    i = lowering.at
    if i < len(lowering.steps) and counts.get(locations[i], 0) > before[i]:
        late, early = lowering.steps[i].path, lowering.steps[i - 1].path if i else ""
        return ScheduleError(
            f"module {late or 'the model'!r} ran before {early or 'the model'!r}, although "
            "the model's module tree registers it after: the nnsight backend visits hook "
            "points in module-tree order, so it missed it. Read these sites in separate "
            "programs, or use backend='torch' for this model."
        )
    return ExecutionError(lowering.state.unfired_message())

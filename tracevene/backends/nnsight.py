"""The nnsight backend: programs run inside nnsight 0.8 traces.

Each forward pass of the plan (``plan.make_plan``, shared with every backend) is one
``with envoy.trace(...)`` block over a private ``nnsight.NNsight`` envoy of the
caller's module. The block's body is a single worker (``_Lowering.run``) that
visits the pass's hook points in forward order, reading ``envoy.inputs`` /
``envoy.output`` and assigning them back when the program writes; the events at each
point are executed by the shared ``tracevene.runtime.events.PassRun``, exactly
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
through the runtime's eager-attention route (``runtime/attention.py``) and its
per-module callback, which runs on the model side of the trace while the worker waits.
nnsight's private internals are reached only through ``tracevene.compat.nnsight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..compat.nnsight import EarlyStopException, OutOfOrderError, PrivateEnvoy
from ..errors import ExecutionError, ScheduleError
from ..runtime.attention import PATTERN_HOOKS, pattern_attention
from ..runtime.engine import Backend
from ..runtime.events import PassRun, Stop
from ..runtime.hooks import replace_first, tensor_kwarg
from ..runtime.inputs import batch_size, concat, slice_output
from ..runtime.interpret import Env
from ..runtime.plan import Pass
from ..sites.arch import Point, PointIO
from ..sites.bind import first_tensor

if TYPE_CHECKING:
    from ..model import Model


class NNsightBackend(Backend):
    """Runs programs inside ``nnsight`` traces (``NNsight`` envoys, any module)."""

    name = "nnsight"

    def __init__(self) -> None:
        self._wrapper: PrivateEnvoy | None = None

    def run_pass(self, model: Model, p: Pass, calls: list, env: Env) -> Any:
        """One nnsight trace over the pass's runs, visiting hook points in forward order."""
        return _run_pass(model, self.wrapper(model.module), p, calls, env)

    def wrapper(self, module: nn.Module) -> PrivateEnvoy:
        """The private nnsight envoy of ``module`` (built on first use, then cached)."""
        if self._wrapper is None or self._wrapper.module is not module:
            self._wrapper = PrivateEnvoy(module)
        return self._wrapper


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
    point: Point | None = None
    keep: bool = False


def _steps(model: Model, p: Pass, state: PassRun) -> list[_Step]:
    """The worker's stops: the pass's module points, plus the inputs their outputs need."""
    resolver = model.resolver

    def key(path: str, io: PointIO) -> tuple:
        return p.order.get(Point(path, io)) or resolver.bind(f"module:{path}:{io}").order

    steps: dict[Point, _Step] = {}
    for point in state.points:
        path, io = point
        if io == "pattern":
            continue
        step = steps.setdefault(point, _Step(key(path, io), path, io))
        step.point = point
        if io == "output":
            inp = _Step(_input_key(key, path), path, "input")
            inp = steps.setdefault(Point(path, "input"), inp)
            inp.keep = True
    return sorted(steps.values(), key=lambda s: s.key)


def _input_key(key: Any, path: str) -> tuple:
    """Where the worker takes the input of a module whose output it visits.

    At the module's own place in the tree, unless the output's site takes its forward
    place from a module that runs earlier (``Hook.order_as``: a norm registered after
    the MLP it runs before); then just before that output.
    """
    own, out = key(path, "input"), key(path, "output")
    return own if own < out else (*out[:-1], out[-1] - 0.5)


class _Call:
    """The forward call of one pass, handed to ``envoy.trace`` as its single input."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict):
        self.module, self.args, self.kwargs = module, args, kwargs


def _forward(call: _Call) -> Any:
    return call.module(*call.args, **call.kwargs)


class _Lowering:
    """The trace body of one pass: visits its steps in forward order."""

    def __init__(self, wrapper: PrivateEnvoy, state: PassRun, steps: list[_Step], result: bool):
        self.wrapper, self.state, self.steps, self.result = wrapper, state, steps, result
        self.modules: dict[str, nn.Module] = state.model.resolver.modules
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
            key = tensor_kwarg(kwargs, step.path)
            x = kwargs[key]
        else:
            return  # no input: nothing to fire, and a kept input reads as None
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
        assert step.point is not None, "_steps gives every output step its point"
        new = self.fire(step.point, first_tensor(output), module, self.inputs.get(step.path))
        if new is not None:
            envoy.output = replace_first(output, new)

    def fire(self, point: Point, x: Tensor, module: nn.Module, inp: Any) -> Any:
        """``PassRun.fire`` with the trace stood down.

        Program nodes that call the model's own submodules (a logit lens) then run
        them plainly, as ``Envoy.__call__`` does, instead of feeding the trace.
        """
        with self.wrapper.stood_down():
            return self.state.fire(point, x, module, inp)

    def pattern_hook(self, point: Point, module: nn.Module) -> Any:
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


def _run_pass(model: Model, wrapper: PrivateEnvoy, p: Pass, calls: list, env: Env) -> Any:
    state = PassRun(model, p, env, [batch_size(c) for c in calls])
    args, kwargs = concat(calls)
    steps = _steps(model, p, state)
    lowering = _Lowering(wrapper, state, steps, 0 in p.runs)
    patterns = [point for point in state.points if point[1] == "pattern"]
    modules = model.resolver.modules
    locations = [wrapper.location(s.path, s.io) for s in steps]
    before = [wrapper.calls(loc) for loc in locations]
    try:
        with pattern_attention(model.module, bool(patterns)):
            for point in patterns:
                PATTERN_HOOKS[id(modules[point[0]])] = lowering.pattern_hook(
                    point, modules[point[0]]
                )
            with wrapper.attached({s.path for s in steps}):
                _trace(wrapper.envoy, _Call(model.module, args, kwargs), lowering)
    except OutOfOrderError:
        raise _never_reached(lowering, wrapper, locations, before) from None
    finally:
        for point in patterns:
            PATTERN_HOOKS.pop(id(modules[point[0]]), None)
    for step, loc, n in zip(steps, locations, before, strict=True):
        if step.point is not None and wrapper.calls(loc) - n > 1:
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


def _never_reached(
    lowering: _Lowering, wrapper: PrivateEnvoy, locations: list, before: list
) -> Exception:
    """The error for a worker left waiting when the forward pass ended."""
    i = lowering.at
    if i < len(lowering.steps) and wrapper.calls(locations[i]) > before[i]:
        late, early = lowering.steps[i].path, lowering.steps[i - 1].path if i else ""
        return ScheduleError(
            f"module {late or 'the model'!r} ran before {early or 'the model'!r}, although "
            "the model's module tree registers it after: the nnsight backend visits hook "
            "points in module-tree order, so it missed it. Read these sites in separate "
            "programs, or use backend='torch' for this model."
        )
    return ExecutionError(lowering.state.unfired_message())

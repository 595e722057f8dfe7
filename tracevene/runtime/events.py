"""Executing the events of one forward pass, whatever engine fires the hooks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..errors import ExecutionError
from ..ir.program import run_name
from ..sites.arch import Point
from ..sites.bind import Binding, Ctx
from ..sites.vocab import display
from .interpret import Env
from .plan import Pass

if TYPE_CHECKING:
    from ..model import Model


class Stop(BaseException):
    """Raised inside a hook to end a pass that has done all it was needed for.

    A ``BaseException``, so that a model's own ``except Exception`` cannot swallow it.
    """


def _rows(runs: list[int], sizes: list[int]) -> dict[int, slice]:
    """The rows of each run in a pass that stacks ``runs`` of ``sizes`` rows."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return {r: slice(s, s + n) for r, s, n in zip(runs, starts, sizes, strict=True)}


class PassRun:
    """State of one forward pass: its hooks, what fired, and the rows of each run."""

    def __init__(self, model: Model, p: Pass, env: Env, sizes: list[int]):
        self.model, self.p, self.env = model, p, env
        self.rows = {p.runs[0]: slice(None)} if len(sizes) == 1 else _rows(p.runs, sizes)
        self.bindings: dict[str, Binding] = p.bindings
        self.captures, self.points = p.captures, p.points
        self.fired: set[Point] = set()
        self.captured: dict[Point, Tensor] = {}
        self.stop_early = 0 not in p.runs
        self.busy = False  # True while nodes run: module calls they make are not events

    def fire(self, point: Point, x: Tensor, module: nn.Module, inp: Any) -> Tensor | None:
        """Execute the events of one hook point; returns the new tensor if written."""
        if self.busy:  # a program node called a module of the model (a logit lens)
            return None
        if point in self.fired:
            raise ExecutionError(
                f"module {point[0]!r} ran more than once in one forward pass, so its sites "
                "are ambiguous; tracevene does not guess which call you meant."
            )
        self.fired.add(point)
        self.busy = True
        try:
            new = self._execute(point, x, module, inp)
        finally:
            self.busy = False
        if point in self.captures:
            self.captured[point] = x if new is None else new
        if self.stop_early and self.fired >= self.points:
            raise Stop
        return new

    def _execute(self, point: Point, x: Tensor, module: nn.Module, inp: Any):
        ctx = Ctx(module, inp, self.captured)
        changed = False
        for node in self.p.events.get(point, ()):
            if node.op in ("read", "write"):
                ctx.rows = self.rows[node.run_index]
                binding = self.bindings[node.key]
                if node.op == "read":
                    self.env.read(node, binding, x, ctx)
                else:
                    x, changed = self.env.write(node, binding, x, ctx), True
            else:
                self.env.compute(node)
        return x if changed else None

    def unfired_message(self) -> str:
        """Why a pass is incomplete: which sites never ran, and where."""
        missing = sorted(self.points - self.fired)
        sites = [
            f"{run_name(n.run_index)}.{display(n.key)}"
            for point in missing
            for n in self.p.events.get(point, ())
            if n.op in ("read", "write")
        ]
        reasons = "; ".join(f"{path or 'the model'} ({io})" for path, io in missing)
        return (
            f"site(s) {', '.join(sites) or '(captures)'} never ran during the forward pass: "
            f"no call reached {reasons}. The module may be skipped for these inputs, or "
            "the engine computes it inside a fused kernel; tracevene will not return "
            "unpatched numbers."
        )

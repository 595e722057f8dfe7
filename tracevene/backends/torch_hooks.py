"""The reference backend: plain PyTorch forward hooks.

Every other backend is checked against this one. Each forward pass registers hooks
only on the modules its events need, and removes them in ``finally``: no hook
outlives a run, whatever is raised inside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ExecutionError
from ..runtime.attention import pattern_attention
from ..runtime.engine import Backend
from ..runtime.events import PassRun, Stop
from ..runtime.hooks import install
from ..runtime.inputs import batch_size, concat, slice_output
from ..runtime.interpret import Env
from ..runtime.plan import Pass

if TYPE_CHECKING:
    from ..model import Model


class TorchBackend(Backend):
    """Runs programs with ``register_forward_hook`` / ``register_forward_pre_hook``."""

    name = "torch"

    def run_pass(self, model: Model, p: Pass, calls: list, env: Env) -> Any:
        """One forward call with hooks on the pass's hook points only."""
        return _run_pass(model, p, calls, env)


def _run_pass(model: Model, p: Pass, calls: list, env: Env) -> Any:
    state = PassRun(model, p, env, [batch_size(c) for c in calls])
    args, kwargs = concat(calls)
    handles: list[Any] = []
    modules = model.resolver.modules
    try:
        with pattern_attention(model.module, any(io == "pattern" for _, io in state.points)):
            for point in state.points:
                handles.append(install(state, point, modules[point[0]]))
            try:
                output = model.module(*args, **kwargs)
            except Stop:
                output = None
    finally:
        for h in handles:
            h.remove()
    if output is None and state.fired < state.points or state.fired < state.points:
        raise ExecutionError(state.unfired_message())
    if 0 in p.runs and len(p.runs) > 1:
        output = slice_output(output, state.rows[0])
    return output

"""Hook installation shared by the torch and TransformerLens engines.

``install`` puts one forward hook (or pre-hook, or eager-attention callback) on a
module for one hook point of a pass; every event at that point is executed by
``events.PassRun.fire``. The returned handle's ``remove`` takes it off again.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import ExecutionError
from ..sites.arch import Point
from ..sites.bind import first_tensor
from .attention import PATTERN_HOOKS
from .events import PassRun


def install(state: PassRun, point: Point, module: nn.Module) -> Any:
    """Hook ``module`` for ``point`` of the pass ``state``; returns a handle to ``remove``."""
    path, io = point
    if io == "input":

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            key = None if args else tensor_kwarg(kwargs, path)
            new = state.fire(point, args[0] if args else kwargs[key], mod, None)
            if new is None:
                return None
            if key is None:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, key: new}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    if io == "output":

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            inp = args[0] if args else kwargs[tensor_kwarg(kwargs, path)] if kwargs else None
            new = state.fire(point, first_tensor(output), mod, inp)
            return None if new is None else replace_first(output, new)

        return module.register_forward_hook(hook, with_kwargs=True)

    def pattern(w: Tensor) -> Tensor:
        new = state.fire(point, w, module, None)
        return w if new is None else new

    PATTERN_HOOKS[id(module)] = pattern
    return _Removable(id(module))


class _Removable:
    def __init__(self, key: int):
        self.key = key

    def remove(self) -> None:
        PATTERN_HOOKS.pop(self.key, None)


def tensor_kwarg(kwargs: dict, path: str) -> str:
    """The name of the first tensor keyword argument of a call to the module at ``path``."""
    for k, v in kwargs.items():
        if isinstance(v, Tensor):
            return k
    raise ExecutionError(f"module {path!r} was called without a tensor argument to hook")


def replace_first(output: Any, new: Tensor) -> Any:
    """``output`` (a tensor, tuple, list or mapping) with its first tensor replaced."""
    if isinstance(output, Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    key = next(iter(output.keys()))
    output[key] = new
    return output

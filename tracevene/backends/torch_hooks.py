"""The reference backend: plain PyTorch forward hooks.

Every other backend is checked against this one. Each forward pass registers hooks
only on the modules its events need, and removes them in ``finally``: no hook
outlives a run, whatever is raised inside it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ExecutionError
from ..sites.bind import first_tensor
from .base import Backend
from .events import PassRun, Stop
from .inputs import batch_size, concat, slice_output
from .interpret import Env
from .plan import Pass

ATTENTION_NAME = "tracevene_eager"
_PATTERN_HOOKS: dict[int, Any] = {}


class TorchBackend(Backend):
    """Runs programs with ``register_forward_hook`` / ``register_forward_pre_hook``."""

    name = "torch"

    def run_pass(self, model: Any, p: Pass, calls: list, env: Env) -> Any:
        """One forward call with hooks on the pass's hook points only."""
        return _run_pass(model, p, calls, env)


def _run_pass(model: Any, p: Pass, calls: list, env: Env) -> Any:
    state = PassRun(model, p, env, [batch_size(c) for c in calls])
    args, kwargs = concat(calls)
    handles: list[Any] = []
    modules = model.resolver.modules
    try:
        with pattern_attention(model.module, any(io == "pattern" for _, io in state.points)):
            for point in state.points:
                handles.append(_install(state, point, modules[point[0]]))
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


def _install(state: PassRun, point: tuple[str, str], module: nn.Module) -> Any:
    path, io = point
    if io == "input":

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            key = None if args else _tensor_kwarg(kwargs, path)
            new = state.fire(point, args[0] if args else kwargs[key], mod, None)
            if new is None:
                return None
            if key is None:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, key: new}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    if io == "output":

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            inp = args[0] if args else kwargs[_tensor_kwarg(kwargs, path)] if kwargs else None
            new = state.fire(point, first_tensor(output), mod, inp)
            return None if new is None else _replace_first(output, new)

        return module.register_forward_hook(hook, with_kwargs=True)

    def pattern(w: Tensor) -> Tensor:
        new = state.fire(point, w, module, None)
        return w if new is None else new

    _PATTERN_HOOKS[id(module)] = pattern
    return _Removable(id(module))


class _Removable:
    def __init__(self, key: int):
        self.key = key

    def remove(self) -> None:
        _PATTERN_HOOKS.pop(self.key, None)


def _tensor_kwarg(kwargs: dict, path: str) -> str:
    for k, v in kwargs.items():
        if isinstance(v, Tensor):
            return k
    raise ExecutionError(f"module {path!r} was called without a tensor argument to hook")


def _replace_first(output: Any, new: Tensor) -> Any:
    if isinstance(output, Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    key = next(iter(output.keys()))
    output[key] = new
    return output


# -- attention probabilities ---------------------------------------------------------
def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Eager attention with a hook on the probabilities (same numbers as HF's eager)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    hook = _PATTERN_HOOKS.get(id(module))
    if hook is not None:
        weights = hook(weights)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


_registered = False
#: id(config) -> [config, its own _attn_implementation, passes using the switch]
_switched: dict[int, list] = {}
_switch_lock = threading.Lock()


@contextlib.contextmanager
def pattern_attention(root: nn.Module | None, active: bool) -> Iterator[None]:
    """Route the attention of the HF models inside ``root`` through ``_attention``.

    Switches every Hugging Face config found on ``root``'s modules for the duration of
    one pass, and restores them whatever happens. Passes that overlap (runs on one
    module are serialised by ``base.module_lock``, but two wrapped modules may share
    a config) count their uses: the first saves the config's own value, the last puts
    it back, so a config is never left switched.
    """
    global _registered
    if not active or root is None:
        yield
        return
    from transformers import AttentionInterface, AttentionMaskInterface, PretrainedConfig
    from transformers.masking_utils import eager_mask

    found = (getattr(m, "config", None) for m in root.modules())
    configs = {id(c): c for c in found if isinstance(c, PretrainedConfig)}
    with _switch_lock:
        if not _registered:
            AttentionInterface.register(ATTENTION_NAME, _attention)
            AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
            _registered = True
        for k, c in configs.items():
            if k not in _switched:
                _switched[k] = [c, c._attn_implementation, 0]
            _switched[k][2] += 1
            c._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        with _switch_lock:
            for k in configs:
                entry = _switched[k]
                entry[2] -= 1
                if entry[2] == 0:
                    entry[0]._attn_implementation = entry[1]
                    del _switched[k]

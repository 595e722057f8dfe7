"""Turning user inputs into forward-call arguments, and batching runs together."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

Call = tuple[tuple, dict]


def to_call(model: Any, inputs: Any, forward_kwargs: Mapping[str, Any]) -> Call:
    """``(args, kwargs)`` for ``model.module(...)`` from one run's inputs."""
    hf = model.resolver.arch is not None
    inputs = tokenize(model, inputs)
    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, torch.Tensor):
        args, kwargs = ((), {"input_ids": inputs}) if hf else ((inputs,), {})
    elif isinstance(inputs, tuple):
        args, kwargs = inputs, {}
    else:
        raise TypeError(
            f"cannot use a {type(inputs).__name__} as model inputs: pass token ids, a dict "
            "of forward arguments, text (with a tokenizer), or the module's own input "
            "tensor / tuple of tensors."
        )
    kwargs = {**forward_kwargs, **kwargs}
    if hf:
        kwargs.setdefault("use_cache", False)
    device = model.device
    return _to(args, device), {k: _to(v, device) for k, v in kwargs.items()}


def tokenize(model: Any, inputs: Any, what: str = "inputs") -> Any:
    """Text (``str`` / ``list[str]``) tokenised by the model's tokenizer; else ``inputs``."""
    if not (isinstance(inputs, str) or (isinstance(inputs, list) and _all_str(inputs))):
        return inputs
    if model.tokenizer is None:
        raise ValueError(
            f"text {what} need a tokenizer: iv.wrap(model, tokenizer=tok), or pass "
            "token ids (a LongTensor [batch, pos])."
        )
    return dict(model.tokenizer(inputs, return_tensors="pt", padding=True))


def _all_str(x: list) -> bool:
    return bool(x) and all(isinstance(s, str) for s in x)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    return x


def batch_size(call: Call) -> int:
    """The batch size of a call: dim 0 of its first tensor."""
    for x in (*call[0], *call[1].values()):
        if isinstance(x, torch.Tensor):
            return x.shape[0] if x.dim() else 1
    return 1


def can_batch(calls: Sequence[Call]) -> bool:
    """Whether calls have the same structure and shapes except the batch dim."""
    first = calls[0]
    return all(_compatible(first, c) for c in calls[1:])


def _compatible(a: Call, b: Call) -> bool:
    if len(a[0]) != len(b[0]) or a[1].keys() != b[1].keys():
        return False
    pairs = list(zip(a[0], b[0], strict=True)) + [(a[1][k], b[1][k]) for k in a[1]]
    for x, y in pairs:
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.dim() == 0 or x.shape[1:] != y.shape[1:] or x.dtype != y.dtype:
                return False
        elif x is not y and x != y:
            return False
    return True


def concat(calls: Sequence[Call]) -> Call:
    """One call whose tensors are the calls' tensors stacked along the batch dim."""
    if len(calls) == 1:
        return calls[0]
    args = tuple(_cat([c[0][i] for c in calls]) for i in range(len(calls[0][0])))
    kwargs = {k: _cat([c[1][k] for c in calls]) for k in calls[0][1]}
    return args, kwargs


def _cat(xs: list) -> Any:
    return torch.cat(xs) if isinstance(xs[0], torch.Tensor) else xs[0]


def slice_output(output: Any, rows: slice) -> Any:
    """The rows of a (batched) model output that belong to one run."""
    if isinstance(output, torch.Tensor):
        return output[rows] if output.dim() else output
    if hasattr(output, "keys") and hasattr(output, "__setitem__"):
        out = type(output)(**{k: slice_output(v, rows) for k, v in output.items()})
        return out
    if isinstance(output, (tuple, list)):
        return type(output)(slice_output(v, rows) for v in output)
    return output

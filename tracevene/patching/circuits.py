"""Circuits: keep a set of heads, mean-ablate the rest, and see what survives.

The ablation protocol: every head outside the circuit has its per-head output ``z``
replaced, at every position, by its mean over a reference set of prompts (for IOI,
the "ABC" prompts), taken per group (e.g. per template, so that positions line up).
Heads inside the circuit, MLPs, embeddings and LayerNorms run normally.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..metrics import logits_of
from ..model import Model, as_model
from ..tracing.tracer import trace
from .runner import sizes

HeadKey = tuple[int, int]


def head_means(
    model: Model | torch.nn.Module, reference: Tensor, groups: Tensor | None = None
) -> list[Tensor]:
    """Every layer's per-head ``z`` averaged over ``reference`` prompts, per group.

    Args:
        model: The model.
        reference: Token ids ``[n, pos]`` to average over.
        groups: Group id of each reference prompt (``[n]``); ``None`` puts all in one.

    Returns:
        One tensor per layer, ``[n_groups, pos, head, d_head]`` (group ids index it; a
        group id without prompts gets NaN).
    """
    model = as_model(model)
    groups = _groups(groups, reference.shape[0], "reference")
    with trace(model) as t:
        saved = [t.layer[i].attn.z.save() for i in range(sizes(model, "head_means").n_layers)]
    with torch.no_grad():
        result = t.program.run(model, reference)
    n_groups = int(groups.max()) + 1
    counts = torch.bincount(groups, minlength=n_groups)  # an empty group's mean is NaN
    means = []
    for handle in saved:
        z = result[handle].detach()
        total = torch.zeros(n_groups, *z.shape[1:], dtype=z.dtype, device=z.device)
        total.index_add_(0, groups.to(z.device), z)
        means.append(total / counts.to(z.device).view(-1, 1, 1, 1))
    return means


def run_circuit(
    model: Model | torch.nn.Module,
    inputs: Tensor,
    keep: Iterable[HeadKey],
    reference: Tensor | Sequence[Tensor],
    *,
    groups: Tensor | tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Logits of ``model`` on ``inputs`` with every head outside ``keep`` mean-ablated.

    Args:
        model: The model.
        inputs: Token ids ``[batch, pos]``.
        keep: The circuit's heads, as ``(layer, head)`` pairs.
        reference: Token ids ``[n, pos]`` whose mean ``z`` replaces ablated heads, or
            the means themselves (what ``head_means`` returns: compute them once
            to evaluate many circuits).
        groups: With token ids as ``reference``: ``(input_groups [batch],
            reference_groups [n])``, so each input prompt is ablated with the mean over
            the reference prompts of its group. With means: ``input_groups`` only.

    Returns:
        The logits ``[batch, pos, vocab]``.
    """
    model = as_model(model)
    keep = _keep(model, keep)
    if isinstance(reference, Tensor):
        input_groups, reference_groups = groups if groups is not None else (None, None)
        means = head_means(model, reference, reference_groups)
    else:
        input_groups, means = groups, list(reference)
    rows = _groups(input_groups, inputs.shape[0], "inputs")
    n_groups = means[0].shape[0]
    missing = sorted(g for g in set(rows.tolist()) if g >= n_groups or means[0][g].isnan().any())
    if missing:
        raise ArgumentError(
            f"input group {missing[0]} has no reference prompts to average over; give every "
            "input group at least one reference prompt (groups=(input_groups, reference_groups))"
        )
    n_heads = sizes(model, "run_circuit").n_heads
    with trace(model) as t:
        for layer, mean in enumerate(means):
            value = mean[rows]  # [batch, pos, head, d_head]
            ablated = [h for h in range(n_heads) if (layer, h) not in keep]
            if len(ablated) == n_heads:
                t.layer[layer].attn.z = value
            else:
                for h in ablated:
                    t.layer[layer].attn.head[h].z = value[:, :, h]
    with torch.no_grad():
        return logits_of(t.program.run(model, inputs).output)


def _keep(model: Model, keep: Iterable[HeadKey]) -> set[HeadKey]:
    keep = {(int(layer), int(head)) for layer, head in keep}
    n_layers, n_heads, _ = sizes(model, "run_circuit")
    for layer, head in keep:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ArgumentError(
                f"head ({layer}, {head}) is not in the model: layers 0..{n_layers - 1}, "
                f"heads 0..{n_heads - 1}"
            )
    return keep


def _groups(groups: Any, n: int, what: str) -> Tensor:
    if groups is None:
        return torch.zeros(n, dtype=torch.long)
    groups = torch.as_tensor(groups).long().cpu()
    if groups.shape != (n,) or (groups < 0).any():
        raise ArgumentError(
            f"groups for {what} must be non-negative ids of shape [{n}]; got shape "
            f"{tuple(groups.shape)}"
        )
    return groups

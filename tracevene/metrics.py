"""Metrics for intervention experiments: IIA, logit difference, KL, and the DAS loss.

Each takes logits (a tensor, a model output with ``.logits``, or a
``iv.Result``) and returns one value per example, so that
``iv.evaluate`` can average them over a dataset.

The default ``position=-1`` is each prompt's last token only without padding or with
left padding; on a right-padded batch it is padding for the shorter prompts, so pass
``position=iv.last_token_positions(inputs)`` (``iv.train`` and ``iv.evaluate`` refuse
a right-padded base with their default loss and metric).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from .errors import ArgumentTypeError

Position = int | Int[Tensor, " batch"] | None


def logits_of(x: Any) -> Tensor:
    """The logits in ``x``: a tensor, an output with ``.logits``, or a result's output.

    Args:
        x: A tensor, a model output with ``.logits`` (or a tuple whose first element is
            the logits), or an ``iv.Result`` whose ``output`` is one of those.

    Returns:
        The logits tensor.

    Raises:
        ArgumentTypeError: ``x`` holds no logits.
    """
    out = getattr(x, "output", x) if not isinstance(x, Tensor) else x
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    if not isinstance(logits, Tensor):
        raise ArgumentTypeError(
            f"cannot find logits in a {type(out).__name__}: pass a tensor, a model output "
            "with .logits, or a tracevene Result whose output is one of those."
        )
    return logits


def at_position(logits: Tensor, position: Position = -1) -> Float[Tensor, "batch vocab"]:
    """Logits at one position per example (``None``: the logits have no position axis).

    Args:
        logits: Logits ``[batch, pos, vocab]`` (or ``[batch, vocab]``, returned as is).
        position: The position read: an int for every example, a tensor ``[batch]`` of
            one position per example, or ``None`` when there is no position axis.

    Returns:
        The logits ``[batch, vocab]`` at that position.
    """
    if position is None or logits.dim() == 2:
        return logits
    if isinstance(position, Tensor):
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, position.to(logits.device)]
    return logits[:, position]


def iia(x: Any, labels: Tensor, position: Position = -1) -> Float[Tensor, " batch"]:
    """Interchange-intervention accuracy: 1.0 where the argmax is the counterfactual label.

    Args:
        x: Logits ``[batch, pos, vocab]`` or ``[batch, classes]``, an output or a result.
        labels: Counterfactual labels ``[batch]`` (what the high-level model predicts
            under the same intervention).
        position: The position read (default: the last; a tensor gives one per example).

    Returns:
        ``1.0`` or ``0.0`` per example, ``[batch]``.
    """
    pred = at_position(logits_of(x), position).argmax(-1)
    return (pred == labels.to(pred.device)).float()


def logit_diff(
    x: Any, correct: Tensor, wrong: Tensor, position: Position = -1
) -> Float[Tensor, " batch"]:
    """``logit[correct] - logit[wrong]`` per example (e.g. IO minus S in IOI), in float32.

    Args:
        x: Logits ``[batch, pos, vocab]`` or ``[batch, vocab]``, an output or a result.
        correct: Token id of the correct answer per example, ``[batch]``.
        wrong: Token id of the wrong answer per example, ``[batch]``.
        position: The position read (default: the last; a tensor gives one per example).

    Returns:
        The logit difference per example, ``[batch]``.
    """
    logits = at_position(logits_of(x), position).float()
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, correct.to(logits.device)] - logits[rows, wrong.to(logits.device)]


def kl_to_counterfactual(x: Any, counterfactual: Any, position: Position = -1) -> Tensor:
    """``KL(p_counterfactual || p_intervened)`` per example, in nats.

    Args:
        x: The intervened run's logits (or output / result).
        counterfactual: Logits of the counterfactual run (e.g. the model on the source).
        position: The position compared (default: the last).

    Returns:
        The KL divergence per example, ``[batch]``.
    """
    log_p = F.log_softmax(at_position(logits_of(x), position).float(), -1)
    log_q = F.log_softmax(at_position(logits_of(counterfactual), position).float(), -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def cross_entropy(x: Any, labels: Tensor, position: Position = -1) -> Float[Tensor, " batch"]:
    """Cross-entropy of the counterfactual labels, per example (the DAS training loss).

    Args:
        x: Logits ``[batch, pos, vocab]`` or ``[batch, classes]``, an output or a result.
        labels: Counterfactual labels ``[batch]``.
        position: The position read (default: the last; a tensor gives one per example).

    Returns:
        The loss per example, ``[batch]`` (average it for the training loss).
    """
    logits = at_position(logits_of(x), position).float()
    return F.cross_entropy(logits, labels.to(logits.device), reduction="none")

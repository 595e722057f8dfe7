"""Stacked experiments: many experiments per forward pass, one metric value each.

A patching sweep runs many experiments on the same ``batch`` prompts. They share
forward passes: a pass of ``k`` experiments runs ``k`` copies of the batch, and
experiment ``e`` of the pass owns rows ``e * batch .. (e + 1) * batch``, where its
writes go and where its metric reads. ``run_stacked`` cuts the experiments into such
passes (with a progress bar) and scores each experiment's rows; what a pass writes is
up to its caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ArgumentError, ArgumentTypeError
from .outputs import experiment

if TYPE_CHECKING:
    from ..model import Model

E = TypeVar("E")
Metric = Callable[[Any], Tensor]


def run_stacked(
    experiments: Sequence[E],
    run: Callable[[Sequence[E]], Any],
    metric: Metric,
    batch: int,
    *,
    experiments_per_pass: int = 16,
    progress: bool = True,
    desc: str = "experiments",
) -> Float[Tensor, " experiments"]:
    """The metric of every experiment, ``experiments_per_pass`` experiments per pass.

    Args:
        experiments: What each experiment does, in a form ``run`` understands.
        run: ``run(chunk) -> scored`` runs one pass of ``len(chunk)`` experiments (rows
            ``e * batch .. (e + 1) * batch`` for experiment ``e`` of the chunk) and
            returns what the metric scores, for all its rows (e.g. the logits
            ``[len(chunk) * batch, pos, vocab]``).
        metric: ``metric(x) -> scalar`` on one experiment's rows of ``x``.
        batch: Rows per experiment.
        experiments_per_pass: How many experiments share one pass.
        progress: Show a progress bar.
        desc: The progress bar's label.

    Returns:
        ``[len(experiments)]`` metric values (float32, on the CPU).

    Raises:
        ArgumentError: ``experiments_per_pass`` is below 1.
    """
    check_per_pass(experiments_per_pass)
    out = torch.empty(len(experiments))
    chunks = range(0, len(experiments), experiments_per_pass)
    for start in tqdm(chunks, desc=desc, disable=not progress):
        chunk = experiments[start : start + experiments_per_pass]
        out[start : start + len(chunk)] = score_each(run(chunk), metric, len(chunk), batch)
    return out


def check_per_pass(experiments_per_pass: int) -> None:
    """Refuse fewer than one experiment per pass (``ArgumentError``)."""
    if experiments_per_pass < 1:
        raise ArgumentError(f"experiments_per_pass={experiments_per_pass} must be at least 1")


def score_each(scored: Any, metric: Metric, n: int, batch: int) -> Float[Tensor, " n"]:
    """``metric`` of each of the ``n`` experiments' rows of ``scored`` (without gradients)."""
    with torch.no_grad():
        return torch.stack([
            torch.as_tensor(metric(experiment(scored, e, batch))).detach().float().cpu()
            for e in range(n)
        ])  # fmt: skip


def rows(e: int, batch: int) -> Int[Tensor, " batch"]:
    """The rows of experiment ``e``: ``e * batch .. (e + 1) * batch``."""
    return torch.arange(e * batch, (e + 1) * batch)


def repeat(inputs: Any, n: int) -> Any:
    """``n`` copies of the batch along the batch axis (token ids, or a dict of tensors)."""
    if isinstance(inputs, Tensor):
        return inputs.repeat(n, *([1] * (inputs.dim() - 1)))
    if isinstance(inputs, Mapping):
        return {k: repeat(v, n) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    raise ArgumentTypeError(
        f"patching takes token ids (a tensor [batch, pos]), a dict of tensors, or text "
        f"(str / list[str], with a tokenizer), got {type(inputs).__name__}"
    )


class Sizes(NamedTuple):
    """Layer and head counts of a model with a site table."""

    n_layers: int
    n_heads: int
    n_kv_heads: int


def sizes(model: Model, what: str) -> Sizes:
    """The layer and head counts ``what`` sweeps over.

    Raises:
        ArgumentError: The model has no site table (no layers or heads to sweep).
    """
    n_layers, n_heads, n_kv_heads = model.n_layers, model.n_heads, model.n_kv_heads
    if n_layers is None or n_heads is None or n_kv_heads is None:
        raise ArgumentError(
            f"{what} needs a model with a site table (a supported Hugging "
            f"Face family or a TransformerLens model), got {model!r}"
        )
    return Sizes(n_layers, n_heads, n_kv_heads)

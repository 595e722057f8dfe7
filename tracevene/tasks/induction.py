"""Induction: repeated random sequences, head scores, and orig/new pairs for path patching.

A sequence is ``BOS``, then filler tokens, with ``n`` distinct random tokens
``x_1 .. x_n`` (``n`` random, from ``min_len`` to ``repeat_len``) placed at a random
position ``first`` and repeated at a random later position ``start``. The fillers
are drawn from the tokens not in ``x``, so the only way to predict ``x_{i+1}`` at
the second ``x_i`` is induction: find the earlier ``x_i`` and copy the token after
it. Both positions are random, so the model can use neither the repeat offset nor
the position of the first occurrence: the layer-0 head that marks each position with
its previous token has to do so everywhere. The random length also discourages a
variant of the circuit that marks each position with the token ``d > 1`` places back
(short repeats right after each other leave no such position before the query).

``orig`` holds such sequences; ``new`` is the same sequence with the first occurrence
resampled (``y_1 .. y_n``, also distinct from ``x``), so induction no longer
predicts the second half. The metric is the mean log-probability of the correct
token ``x_{i+1}`` at the second ``x_i`` (``i = 1 .. n-1``).

Scores of every head, from its attention pattern ``[batch, head, query, key]``:

- previous-token score: mean attention from each position ``p >= 1`` to ``p - 1``;
- induction score: mean attention from the second ``x_i`` to the first ``x_{i+1}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import ArgumentError
from ..model import as_model
from ..tracing.tracer import trace

BOS = 0  # the default first token; sequence tokens are drawn from low .. vocab_size - 1


@dataclass
class Dataset:
    """Repeated random sequences and their resampled counterparts.

    Attributes:
        orig: Token ids ``[n, pos]``: BOS, fillers, ``x_1..x_n``, fillers, the repeat,
            fillers.
        new: ``orig`` with the first occurrence replaced by other tokens ``[n, pos]``.
        first: Position of ``x_1``'s first occurrence, per sequence ``[n]``.
        start: Position of the repeat's first token (the second ``x_1``) ``[n]``.
        repeat_len: The longest repeated segment.
        lengths: The number of repeated tokens of each sequence ``[n]``.
        mask: ``[n, pos]``: True at the second ``x_i`` for ``i < n`` (where induction
            predicts the next token).
        targets: ``[n, pos]``: the next token of ``orig`` (the last position: BOS).
    """

    orig: Int[Tensor, "n pos"]
    new: Int[Tensor, "n pos"]
    first: Int[Tensor, " n"]
    start: Int[Tensor, " n"]
    repeat_len: int
    lengths: Int[Tensor, " n"]
    mask: Bool[Tensor, "n pos"]
    targets: Int[Tensor, "n pos"]

    def __len__(self) -> int:
        return self.orig.shape[0]


def make_dataset(
    n: int,
    vocab_size: int,
    *,
    seq_len: int = 32,
    repeat_len: int = 8,
    min_len: int = 2,
    seed: int | torch.Generator = 0,
    low: int = 1,
    bos: int = BOS,
) -> Dataset:
    """``n`` repeated random sequences with a random repeat offset, and their pairs.

    Args:
        n: Number of sequences.
        vocab_size: Tokens are drawn from ``low .. vocab_size - 1``.
        seq_len: Length of every sequence, BOS included.
        repeat_len: The longest repeated segment.
        min_len: The shortest repeated segment (lengths are uniform in between).
        seed: A seed or a ``torch.Generator``.
        low: The smallest token drawn (keep BOS and other special tokens below it).
        bos: The first token of every sequence.

    Returns:
        The dataset (``orig``, ``new``, repeat starts, mask and targets).
    """
    _check(vocab_size, seq_len, repeat_len, low, min_len)
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    order = torch.rand(n, vocab_size - low, generator=g).argsort(-1) + low  # permutations
    x, y, pool = order[:, :repeat_len], order[:, repeat_len : 2 * repeat_len], order[:, repeat_len:]
    pick = torch.randint(0, pool.shape[1], (n, seq_len), generator=g)
    orig = pool.gather(1, pick)  # fillers: tokens that are not in x
    orig[:, 0] = bos
    lengths = torch.randint(min_len, repeat_len + 1, (n,), generator=g)
    first, start = _positions(seq_len, lengths, g)
    j = torch.arange(repeat_len)
    valid = j < lengths[:, None]
    rows = torch.arange(n)[:, None].expand(-1, repeat_len)[valid]
    orig[rows, (first[:, None] + j)[valid]] = x[valid]
    orig[rows, (start[:, None] + j)[valid]] = x[valid]
    new = orig.clone()
    new[rows, (first[:, None] + j)[valid]] = y[valid]
    mask = torch.zeros(n, seq_len, dtype=torch.bool)
    mask[rows, (start[:, None] + j)[valid]] = True
    mask[torch.arange(n), start + lengths - 1] = False  # the last x: its next token is a filler
    targets = torch.cat([orig[:, 1:], torch.full((n, 1), bos)], dim=1)
    return Dataset(orig, new, first, start, repeat_len, lengths, mask, targets)


def _positions(seq_len: int, lengths: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random ``first`` and ``start``: ``1 <= first``, ``first + n <= start <= seq_len - n``."""
    free = seq_len - 1 - 2 * lengths  # filler positions
    cuts = (torch.rand(len(lengths), 2, generator=g) * (free[:, None] + 1)).long().sort(-1).values
    first = 1 + cuts[:, 0]
    return first, first + lengths + cuts[:, 1] - cuts[:, 0]


def _check(vocab_size: int, seq_len: int, repeat_len: int, low: int, min_len: int) -> None:
    if not 2 <= min_len <= repeat_len:
        raise ArgumentError(
            f"min_len={min_len}, repeat_len={repeat_len}: a repeat needs at least 2 tokens to "
            "predict one; use 2 <= min_len <= repeat_len"
        )
    if seq_len < 2 * repeat_len + 1:
        raise ArgumentError(
            f"seq_len={seq_len} cannot hold BOS and two copies of repeat_len={repeat_len} "
            f"tokens: use seq_len >= {2 * repeat_len + 1}"
        )
    if vocab_size - low < 2 * repeat_len + 1:
        raise ArgumentError(
            f"vocab_size={vocab_size} with low={low} leaves {vocab_size - low} tokens; x, its "
            f"resampled copy and the fillers need at least {2 * repeat_len + 1}: use "
            f"vocab_size >= {low + 2 * repeat_len + 1} or a shorter repeat_len"
        )


def log_probs(logits: Float[Tensor, "batch pos vocab"], ds: Dataset) -> Float[Tensor, " batch"]:
    """Mean log-probability of the correct next token on each sequence's repeated half."""
    if logits.shape[:2] != ds.orig.shape:
        raise ArgumentError(
            f"logits of shape {tuple(logits.shape)} do not match the dataset's "
            f"{len(ds)} sequences of {ds.orig.shape[1]} tokens: pass the logits of ds.orig "
            "(or ds.new), [batch, pos, vocab]"
        )
    lp = F.log_softmax(logits.float(), dim=-1)
    correct = lp.gather(-1, ds.targets.to(lp.device)[..., None])[..., 0]
    mask = ds.mask.to(lp.device)
    return (correct * mask).sum(1) / mask.sum(1)


def metric(ds: Dataset) -> Callable[[Tensor], Tensor]:
    """``metric(logits) -> scalar``: ``log_probs`` averaged over the dataset."""
    return lambda logits: log_probs(logits, ds).mean()


def accuracy(logits: Float[Tensor, "batch pos vocab"], ds: Dataset) -> float:
    """Fraction of repeated-half positions where the argmax is the correct next token."""
    hit = logits.argmax(-1).cpu() == ds.targets
    return (hit & ds.mask).sum().item() / ds.mask.sum().item()


def loss(logits: Float[Tensor, "batch pos vocab"], ds: Dataset) -> Tensor:
    """Cross-entropy of the correct next token on the repeated half (the training loss)."""
    return -log_probs(logits, ds).mean()


def previous_token_scores(pattern: Float[Tensor, "batch head q k"]) -> Float[Tensor, " head"]:
    """Mean attention from each position ``p >= 1`` to ``p - 1``, per head."""
    return pattern.float().diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, -1))


def induction_scores(
    pattern: Float[Tensor, "batch head q k"], ds: Dataset
) -> Float[Tensor, " head"]:
    """Mean attention from the second ``x_i`` to the first ``x_{i+1}``, per head."""
    p = torch.arange(pattern.shape[-1])
    keys = (p - ds.start[:, None] + ds.first[:, None] + 1).clamp(0, len(p) - 1)  # [batch, q]
    rows = torch.arange(pattern.shape[0])[:, None]
    dev = pattern.device
    picked = pattern.float()[rows.to(dev), :, p.to(dev), keys.to(dev)]  # [batch, q, head]
    mask = ds.mask.to(dev)[..., None]
    return (picked * mask).sum(dim=(0, 1)) / mask.sum()


def head_scores(model: Any, ds: Dataset, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Previous-token and induction scores ``[layer, head]`` of every head, on ``ds.orig``.

    The patterns are read with one program: ``t.layer[i].attn.pattern.save()``.

    Args:
        model: An ``iv.Model`` (or a module ``iv.wrap`` accepts).
        ds: The sequences.
        batch_size: Sequences per forward pass.

    Returns:
        ``(previous_token, induction)``, each ``[n_layers, n_heads]``.
    """
    model = as_model(model)
    with trace(model) as t:
        saves = [t.layer[i].attn.pattern.save() for i in range(model.n_layers)]
    prev, ind = [], []
    for lo in range(0, len(ds), batch_size):
        part = _slice(ds, lo, lo + batch_size)
        with torch.no_grad():
            result = t.program.run(model, part.orig.to(model.device))
        patterns = [result[s] for s in saves]
        prev.append(torch.stack([previous_token_scores(p) for p in patterns]) * len(part))
        ind.append(torch.stack([induction_scores(p, part) for p in patterns]) * len(part))
    total_prev, total_ind = sum(prev[1:], prev[0]), sum(ind[1:], ind[0])  # in batch order
    return total_prev.cpu() / len(ds), total_ind.cpu() / len(ds)


def _slice(ds: Dataset, lo: int, hi: int) -> Dataset:
    return Dataset(
        ds.orig[lo:hi], ds.new[lo:hi], ds.first[lo:hi], ds.start[lo:hi], ds.repeat_len,
        ds.lengths[lo:hi], ds.mask[lo:hi], ds.targets[lo:hi],
    )  # fmt: skip

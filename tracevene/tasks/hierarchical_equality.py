"""The hierarchical equality task, ``(w == x) == (y == z)``: data, variables and a score.

Inputs are four *entities* ``w, x, y, z``, each a random vector (4 dimensions by
default) drawn from a finite pool (20 entities by default); the model sees the four
vectors concatenated, ``[batch, 16]``. The label is ``1`` when the two pairs agree
(both equal or both different) and ``0`` otherwise. The high-level causal model
computes two intermediate variables, ``WX = (w == x)`` and ``YZ = (y == z)``, and
then ``label = (WX == YZ)``; distributed alignment search (DAS) looks for them in
the MLP's hidden layers (Geiger et al. 2023, "Finding alignments between
interpretable causal variables and distributed neural representations").

Sampling is balanced: each pair is equal with probability 1/2, so ``WX``, ``YZ`` and
the label are fair coins, independent of each other's values in other examples.

Counterfactual data (``counterfactual_batches``) has two sources per example: the
first gives ``WX``, the second ``YZ``. Each example intervenes on ``WX``, ``YZ`` or
both; a variable that is not intervened on takes its source from the base itself,
so the swap is a no-op and one program with two sources serves every example.

The model that solves the task, ``EqualityMLP``, and its training (``train_mlp``) are
in ``tracevene.models.equality``.

Example:
    ```python
    from tracevene.models import equality
    from tracevene.tasks import hierarchical_equality as he

    pool = he.entity_pool(seed=0)
    x, y = he.factual_data(pool, 512, seed=1)
    model = equality.train_mlp(pool, seed=0, steps=300)
    print(he.accuracy(model, x, y))
    ```
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ArgumentError

VARIABLES = ("WX", "YZ")
KINDS = ("WX", "YZ", "both")  # which variables an example intervenes on
N_ENTITIES = 20
ENTITY_DIM = 4


# -- entities and factual data ------------------------------------------------------------
def entity_pool(n: int = N_ENTITIES, dim: int = ENTITY_DIM, seed: int = 0) -> Tensor:
    """``[n, dim]`` entity vectors, uniform in ``[-1, 1]`` (a fixed pool for a seed)."""
    if n < 2 or dim < 1:
        raise ArgumentError(
            f"need at least 2 entities of at least 1 dimension, got n={n}, dim={dim}"
        )
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, dim, generator=g) * 2 - 1


def sample_pairs(n: int, n_entities: int, g: torch.Generator) -> Tensor:
    """``[n, 2]`` entity indices, equal with probability 1/2, else two different ones."""
    first = torch.randint(0, n_entities, (n,), generator=g)
    shift = torch.randint(1, n_entities, (n,), generator=g)  # any other entity
    equal = torch.rand(n, generator=g) < 0.5
    second = torch.where(equal, first, (first + shift) % n_entities)
    return torch.stack([first, second], dim=1)


def sample_indices(n: int, n_entities: int, g: torch.Generator) -> Tensor:
    """``[n, 4]`` entity indices of ``w, x, y, z`` (balanced: each pair equal half the time)."""
    return torch.cat([sample_pairs(n, n_entities, g), sample_pairs(n, n_entities, g)], dim=1)


def variables_of(idx: Tensor) -> dict[str, Tensor]:
    """The high-level variables of ``[n, 4]`` indices: ``WX``, ``YZ`` and ``label`` (longs)."""
    wx = (idx[:, 0] == idx[:, 1]).long()
    yz = (idx[:, 2] == idx[:, 3]).long()
    return {"WX": wx, "YZ": yz, "label": (wx == yz).long()}


def embed(pool: Tensor, idx: Tensor) -> Tensor:
    """The model's input for ``[n, 4]`` indices: the four entity vectors, concatenated."""
    return pool[idx].reshape(idx.shape[0], -1)


def factual_data(pool: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` balanced examples: inputs ``[n, 4 * dim]`` and labels ``[n]``."""
    g = torch.Generator().manual_seed(seed)
    idx = sample_indices(n, pool.shape[0], g)
    return embed(pool, idx), variables_of(idx)["label"]


# -- counterfactual data for DAS ------------------------------------------------------------
def counterfactual_batches(
    pool: Tensor, n_batches: int, batch_size: int, seed: int, kinds: tuple[str, ...] = KINDS
) -> list[dict[str, Any]]:
    """Batches of interchange examples for the two variables ``WX`` and ``YZ``.

    Each batch is ``{"base", "sources": [source_wx, source_yz], "labels", "kind"}``, the
    format ``iv.train`` takes for a program with two sources (the first
    feeds ``WX``, the second ``YZ``). ``labels`` is what the high-level model answers
    with ``WX`` taken from the first source and ``YZ`` from the second; ``kind`` says
    which variables each example intervenes on (an index into ``kinds``). For an
    example that leaves a variable alone, that variable's source is the base itself.

    Args:
        pool: The entity pool (``entity_pool``, or ``model.entities``).
        n_batches: Number of batches.
        batch_size: Examples per batch.
        seed: Seed of the sampling.
        kinds: The interventions to mix, uniformly: any of ``"WX"``, ``"YZ"``, ``"both"``.
    """
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise ArgumentError(f"kinds={kinds!r}: choose one or more of {KINDS}")
    g = torch.Generator().manual_seed(seed)
    return [_counterfactual_batch(pool, batch_size, kinds, g) for _ in range(n_batches)]


def _counterfactual_batch(
    pool: Tensor, n: int, kinds: tuple[str, ...], g: torch.Generator
) -> dict[str, Any]:
    base, src_wx, src_yz = (sample_indices(n, pool.shape[0], g) for _ in range(3))
    kind = torch.randint(0, len(kinds), (n,), generator=g)
    names = [kinds[int(k)] for k in kind]
    uses_wx = torch.tensor([k in ("WX", "both") for k in names])
    uses_yz = torch.tensor([k in ("YZ", "both") for k in names])
    src_wx = torch.where(uses_wx[:, None], src_wx, base)
    src_yz = torch.where(uses_yz[:, None], src_yz, base)
    wx, yz = variables_of(src_wx)["WX"], variables_of(src_yz)["YZ"]
    return {
        "base": embed(pool, base),
        "sources": [embed(pool, src_wx), embed(pool, src_yz)],
        "labels": (wx == yz).long(),
        "kind": kind,
    }


# -- scores ---------------------------------------------------------------------------------
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of examples the model labels correctly."""
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()

"""The hierarchical equality task, ``(w == x) == (y == z)``, and a small MLP that solves it.

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

Example:
    ```python
    from tracevene.tasks import hierarchical_equality as he

    pool = he.entity_pool(seed=0)
    x, y = he.factual_data(pool, 512, seed=1)
    model = he.train_mlp(pool, seed=0, steps=300)
    print(he.accuracy(model, x, y))
    ```
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, MissingFileError

VARIABLES = ("WX", "YZ")
KINDS = ("WX", "YZ", "both")  # which variables an example intervenes on
N_ENTITIES = 20
ENTITY_DIM = 4
HIDDEN = 16
N_LAYERS = 3
MODEL_TYPE = "hierarchical_equality_mlp"


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


# -- the model ------------------------------------------------------------------------------
class EqualityMLP(nn.Module):
    """A ReLU MLP for the task: ``n_layers`` hidden blocks, then a 2-way linear head.

    Hidden block ``i`` (1-based) is the module ``layer{i}`` (``Linear`` then ``ReLU``):
    its output is the site ``t.module("layer1").output`` ``[batch, hidden]``. The
    entity pool the model was trained on travels with it as the buffer ``entities``.

    Args:
        n_entities: Size of the entity pool.
        entity_dim: Dimensions of each entity vector (the input is ``4 * entity_dim``).
        hidden: Width of each hidden layer.
        n_layers: Number of hidden layers.
        entity_seed: Seed of the entity pool (``entity_pool``).
    """

    entities: Tensor

    def __init__(
        self,
        n_entities: int = N_ENTITIES,
        entity_dim: int = ENTITY_DIM,
        hidden: int = HIDDEN,
        n_layers: int = N_LAYERS,
        entity_seed: int = 0,
    ):
        super().__init__()
        if n_layers < 1 or hidden < 1:
            raise ArgumentError(f"n_layers={n_layers} and hidden={hidden} must be at least 1")
        self.config = {
            "model_type": MODEL_TYPE,
            "n_entities": n_entities,
            "entity_dim": entity_dim,
            "hidden": hidden,
            "n_layers": n_layers,
            "entity_seed": entity_seed,
        }
        self.register_buffer("entities", entity_pool(n_entities, entity_dim, entity_seed))
        width = 4 * entity_dim
        for i in range(1, n_layers + 1):
            self.add_module(f"layer{i}", nn.Sequential(nn.Linear(width, hidden), nn.ReLU()))
            width = hidden
        self.head = nn.Linear(width, 2)

    @property
    def layer_names(self) -> list[str]:
        """Module paths of the hidden layers: ``["layer1", "layer2", ...]``."""
        return [f"layer{i}" for i in range(1, self.config["n_layers"] + 1)]

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[batch, 2]`` for inputs ``[batch, 4 * entity_dim]``."""
        for name in self.layer_names:
            x = getattr(self, name)(x)
        return self.head(x)

    def save(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def load(cls, directory: str | Path) -> EqualityMLP:
        """The model saved in ``directory`` by ``save``, in eval mode.

        Raises:
            MissingFileError: ``directory`` lacks ``config.json`` or ``model.safetensors``
                (also a ``FileNotFoundError``).
            ArgumentError: ``config.json`` is not an EqualityMLP's.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config_file, weights = directory / "config.json", directory / "model.safetensors"
        if not config_file.is_file() or not weights.is_file():
            raise MissingFileError(
                f"{directory} is not a saved EqualityMLP: it needs config.json and "
                "model.safetensors (write them with EqualityMLP.save or "
                "models/train_hierarchical_equality.py)."
            )
        config = json.loads(config_file.read_text())
        if config.get("model_type") != MODEL_TYPE:
            raise ArgumentError(
                f"{config_file} has model_type={config.get('model_type')!r}, not "
                f"{MODEL_TYPE!r}: give a directory saved by EqualityMLP.save."
            )
        kwargs = {k: v for k, v in config.items() if k != "model_type"}
        model = cls(**kwargs)
        model.load_state_dict(load_file(str(weights)))
        return model.eval()


# -- training -------------------------------------------------------------------------------
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of examples the model labels correctly."""
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def train_mlp(
    pool: Tensor | None = None,
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 256,
    lr: float = 5e-3,
    weight_decay: float = 1.0,
    warmup: int = 200,
    **model_kwargs: Any,
) -> EqualityMLP:
    """Train an ``EqualityMLP`` on fresh balanced batches (CPU, a few seconds).

    Args:
        pool: Entity pool; default: the model's own (``entity_seed`` in ``model_kwargs``).
        seed: Seed of the initial weights and of the training data.
        steps: Optimizer steps (AdamW; linear warmup, then cosine decay of ``lr``).
        batch_size: Examples per step.
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay (AdamW).
        warmup: Steps of linear warmup to ``lr``.
        **model_kwargs: Passed to ``EqualityMLP``.

    Returns:
        The trained model, in eval mode.
    """
    torch.manual_seed(seed)
    model = EqualityMLP(**model_kwargs)
    if pool is not None:
        if pool.shape != model.entities.shape:
            raise ArgumentError(
                f"pool has shape {tuple(pool.shape)}, the model expects "
                f"{tuple(model.entities.shape)}: pass n_entities / entity_dim to match"
            )
        model.entities.copy_(pool)
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    for _ in range(steps):
        idx = sample_indices(batch_size, model.entities.shape[0], g)
        x, y = embed(model.entities, idx), variables_of(idx)["label"]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps times a cosine decay from 1 to 0 over ``steps``."""
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return ramp * 0.5 * (1 + math.cos(math.pi * step / steps))

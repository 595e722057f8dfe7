"""``EqualityMLP``, a small MLP for the hierarchical equality task, and its training.

The task itself (entities, factual and counterfactual data, the causal model's
variables, ``accuracy``) lives in ``tracevene.tasks.hierarchical_equality``; this module
holds the model class, its save / load format (``config.json`` + ``model.safetensors``,
as bundled in ``models/hierarchical_equality/``) and ``train_mlp``, which
``models/train_hierarchical_equality.py`` runs to make that checkpoint.

Example:
    ```python
    from tracevene.models import equality
    from tracevene.tasks import hierarchical_equality as he

    model = equality.train_mlp(seed=0, steps=300)
    x, y = he.factual_data(model.entities, 512, seed=1)
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
from ..tasks.hierarchical_equality import (
    ENTITY_DIM,
    N_ENTITIES,
    embed,
    entity_pool,
    sample_indices,
    variables_of,
)

HIDDEN = 16
N_LAYERS = 3
MODEL_TYPE = "hierarchical_equality_mlp"


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

    Raises:
        ArgumentError: ``steps`` or ``batch_size`` is below 1, ``warmup`` is negative,
            or ``pool`` does not have the model's entity shape.
    """
    _check_schedule(steps, batch_size, warmup)
    torch.manual_seed(seed)
    model = _model_with_pool(pool, model_kwargs)
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


def _check_schedule(steps: int, batch_size: int, warmup: int) -> None:
    if steps < 1 or batch_size < 1 or warmup < 0:
        raise ArgumentError(
            f"steps={steps}, batch_size={batch_size}, warmup={warmup}: steps and "
            "batch_size must be at least 1 and warmup at least 0 (the defaults are "
            "3000, 256 and 200)"
        )


def _model_with_pool(pool: Tensor | None, model_kwargs: dict[str, Any]) -> EqualityMLP:
    """A fresh ``EqualityMLP``, its entity buffer replaced by ``pool`` when one is given."""
    model = EqualityMLP(**model_kwargs)
    if pool is not None:
        if pool.shape != model.entities.shape:
            raise ArgumentError(
                f"pool has shape {tuple(pool.shape)}, the model expects "
                f"{tuple(model.entities.shape)}: pass n_entities / entity_dim to match"
            )
        model.entities.copy_(pool)
    return model


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps times a cosine decay from 1 to 0 over ``steps``."""
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return ramp * 0.5 * (1 + math.cos(math.pi * step / steps))

"""Static interventions: fixed maps from a site's value (and a source's) to a new value.

Each is called as ``intervention(base, source=None)`` on traced values inside a trace
block, or on plain tensors anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import ArgumentError, ShapeError
from .base import Intervention, lookup_variable, need_source


class Zero(Intervention):
    """Zero ablation: the site becomes zeros.

    Example: ``t.layer[2].mlp.out = iv.Zero()(t.layer[2].mlp.out)``.
    """

    def forward(self, base: Tensor, source: Tensor | None = None) -> Tensor:
        """Zeros shaped like ``base``."""
        return torch.zeros_like(base)


class MeanAblate(Intervention):
    """Mean ablation: the site becomes a fixed mean (broadcast to its shape).

    Args:
        mean: The replacement value, e.g. ``acts.mean(0)`` over a reference dataset;
            broadcast against the site from the right (``[d]``, ``[pos, d]``, ...).
    """

    mean: Tensor

    def __init__(self, mean: Tensor):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean).detach().clone())

    def forward(self, base: Tensor, source: Tensor | None = None) -> Tensor:
        """The mean, broadcast to ``base``'s shape."""
        return self.mean.to(base.device, base.dtype).expand_as(base)


class Add(Intervention):
    """Steering: add ``scale * vector`` to the site.

    Args:
        vector: The steering vector, broadcast against the site (usually ``[d]``).
        scale: A multiplier, so one vector can be swept over strengths.
    """

    vector: Tensor

    def __init__(self, vector: Tensor, scale: float = 1.0):
        super().__init__()
        self.register_buffer("vector", torch.as_tensor(vector).detach().clone())
        self.scale = float(scale)

    def forward(self, base: Tensor, source: Tensor | None = None) -> Tensor:
        """``base + scale * vector``."""
        return base + self.scale * self.vector.to(base.device, base.dtype)


class Scale(Intervention):
    """Multiply the site by ``factor`` (``0`` ablates, ``-1`` flips).

    Args:
        factor: The number every element of the site is multiplied by.
    """

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, base: Tensor, source: Tensor | None = None) -> Tensor:
        """``base * factor``."""
        return base * self.factor


class Noise(Intervention):
    """Add seeded Gaussian noise of standard deviation ``std`` (ROME-style corruption).

    The noise is drawn on the CPU from a generator seeded with ``seed`` at every call,
    so the same shape always gets the same noise, on any device and any backend. It is
    drawn for the whole tensor: copies of a batch stacked along the batch axis (as
    patching sweeps stack experiments) get different noise. To corrupt every copy the
    same way, draw the noise once and add it as a tensor (``iv.Add`` or ``site += noise``).

    Args:
        std: Standard deviation (ROME uses 3x the embeddings' standard deviation).
        seed: Seed of the noise.
    """

    def __init__(self, std: float, seed: int = 0):
        super().__init__()
        self.std, self.seed = float(std), int(seed)

    def forward(self, base: Tensor, source: Tensor | None = None) -> Tensor:
        """``base`` plus seeded noise of its shape."""
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(base.shape, generator=gen, dtype=torch.float32)
        return base + (self.std * noise).to(base.device, base.dtype)


class Interchange(Intervention):
    """Interchange: take the source's value, on the whole vector or on a subspace.

    Args:
        subspace: Indices of the last dimension to take from the source
            (``None``: all of them).
        variables: Named, disjoint index sets of the last dimension; call with
            ``variable=name`` to swap one of them (without ``variable``, all of them
            are swapped, as with the rotations' ``variables``).

    Example:
        ```python
        import torch
        import tracevene as iv

        swap = iv.Interchange(variables={"left": [0, 1], "right": [2, 3]})
        base, source = torch.zeros(4), torch.ones(4)
        print(swap(base, source, variable="right"))  # tensor([0., 0., 1., 1.])
        ```
    """

    def __init__(
        self,
        subspace: Sequence[int] | None = None,
        variables: Mapping[str, Sequence[int]] | None = None,
    ):
        super().__init__()
        if subspace is not None and variables is not None:
            raise ArgumentError(
                "give Interchange either subspace=[...] or variables={...}, not both"
            )
        self.subspace = None if subspace is None else [int(i) for i in subspace]
        if self.subspace == [] or any(len(v) == 0 for v in (variables or {}).values()):
            raise ArgumentError(
                "Interchange got an empty index set: give at least one dimension per "
                "subspace / variable, or subspace=None to swap the whole vector."
            )
        self.variables = {k: [int(i) for i in v] for k, v in (variables or {}).items()}
        _check_disjoint(self.variables)

    def forward(
        self,
        base: Float[Tensor, "... d"],
        source: Float[Tensor, "... d"] | None = None,
        variable: str | None = None,
    ) -> Float[Tensor, "... d"]:
        """The source's values on the subspace (or ``variable``), elsewhere ``base``'s."""
        source = need_source(self, source)
        index = _pick(self, self.subspace, self.variables, variable)
        if index is None:
            return source.to(base.dtype).expand_as(base)
        if max(index) >= base.shape[-1]:
            raise ShapeError(
                f"Interchange swaps dimension {max(index)}, but the value has shape "
                f"{tuple(base.shape)}; use indices below {base.shape[-1]}."
            )
        mask = torch.zeros(base.shape[-1], dtype=torch.bool, device=base.device)
        mask[index] = True
        return torch.where(mask, source.to(base.dtype), base)


def _check_disjoint(variables: Mapping[str, Sequence[int]]) -> None:
    seen: dict[int, str] = {}
    for name, idx in variables.items():
        for i in idx:
            if i in seen:
                raise ArgumentError(
                    f"variables {seen[i]!r} and {name!r} both own dimension {i}; variables "
                    "must own disjoint sets of dimensions: give each dimension to one variable"
                )
            seen[i] = name


def _pick(
    module: Intervention,
    default: list[int] | None,
    variables: Mapping[str, list[int]],
    variable: str | None,
) -> list[int] | None:
    """The index set for ``variable`` (``None``: the whole vector).

    With no variable named: the default index set, or else all the variables' dimensions.
    """
    if variable is None:
        if default is None and variables:
            return sorted(i for index in variables.values() for i in index)
        return default
    return lookup_variable(module, variables, variable)

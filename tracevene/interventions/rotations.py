"""Trainable interventions: distributed alignment search (DAS) and its relatives.

Each is called as ``intervention(base, source)`` and swaps part of ``base`` for the
same part of ``source`` in a learned basis. The orthogonal matrices are
``torch.nn.utils.parametrize`` parametrizations, computed in float32 whatever the
dtype of the activations, and materialised once per program run (programs run under
``parametrize.cached()``), however many sites share one intervention.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import cast

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ArgumentError
from .base import Intervention, check_width, compute_dtype, lookup_variable, need_source

MAPS = ("cayley", "matrix_exp")


class _Orthogonal(nn.Module):
    """Square orthogonal parametrization ``Q = Q0 @ map(A - A^T)`` (float32 inside).

    ``Q0`` is a fixed random orthogonal start; the trained matrix ``A`` starts at zero.
    """

    def __init__(self, d: int, orthogonal_map: str):
        super().__init__()
        if orthogonal_map not in MAPS:
            raise ArgumentError(f"orthogonal_map={orthogonal_map!r}: choose one of {MAPS}")
        self.orthogonal_map = orthogonal_map
        self.register_buffer("start", nn.init.orthogonal_(torch.empty(d, d)))

    def forward(self, a: Tensor) -> Tensor:
        x = a.float().tril(-1)
        x = x - x.T
        if self.orthogonal_map == "cayley":
            eye = torch.eye(x.shape[0], device=x.device)
            q = torch.linalg.solve(eye + x, eye - x)
        else:
            q = torch.linalg.matrix_exp(x)
        return (self.start.float() @ q).to(a.dtype)


class _Stiefel(nn.Module):
    """``d x k`` matrix with orthonormal columns: the Q of a QR (float32 inside)."""

    def forward(self, w: Tensor) -> Tensor:
        q, r = torch.linalg.qr(w.float())
        signs = torch.where(r.diagonal() < 0, -1.0, 1.0)  # make the map smooth and unique
        return (q * signs).to(w.dtype)


class Rotation(nn.Module):
    """A module whose ``weight`` is ``parametrization(original)``, ``original = start``.

    Deep copies are rebuilt with a parametrization of their own. torch's deepcopy of a
    parametrized module keeps its class, whose ``weight`` property caches under the id
    of the *original* module; under ``parametrize.cached()`` (every program run) a copy
    would then silently use the original's weight, and its own parameters would get no
    gradient.
    """

    weight: Tensor
    parametrizations: nn.ModuleDict  # set by register_parametrization

    def __init__(self, start: Tensor, parametrization: nn.Module):
        super().__init__()
        self.weight = start if isinstance(start, nn.Parameter) else nn.Parameter(start)
        # On the meta device (loading checks a spec's sizes before building for real)
        # skip the trial evaluation: meta kernels of tril / solve would import torch._refs.
        unsafe = start.is_meta
        parametrize.register_parametrization(self, "weight", parametrization, unsafe=unsafe)

    def __deepcopy__(self, memo: dict) -> Rotation:
        if id(self) in memo:
            return memo[id(self)]
        plist = cast(parametrize.ParametrizationList, self.parametrizations["weight"])
        original = copy.deepcopy(plist.original, memo)
        maps = [copy.deepcopy(m, memo) for m in plist]
        with torch.no_grad():
            replica = Rotation(original, maps[0])
            for m in maps[1:]:
                parametrize.register_parametrization(replica, "weight", m)
        replica.train(self.training)
        memo[id(self)] = replica
        return replica


def _swap(base: Tensor, source: Tensor, basis: Tensor, weight: Tensor | None = None) -> Tensor:
    """``base`` with its coordinates along ``basis`` (columns) taken from ``source``.

    Equal to rotating both, swapping those coordinates and rotating back, for an
    orthonormal basis; ``weight`` mixes each coordinate softly instead (Boundless DAS).
    """
    dt = compute_dtype(base)
    b = basis.to(dt)
    coords = (source.to(dt) - base.to(dt)) @ b
    if weight is not None:
        coords = coords * weight.to(dt)
    return (base.to(dt) + coords @ b.T).to(base.dtype)


def _blocks(variables: Mapping[str, int] | None, k: int | None) -> tuple[int, dict[str, slice]]:
    """``k`` and the consecutive block of rotated dimensions each variable owns."""
    if not variables:
        if k is None:
            raise ArgumentError("give the number of interchanged dimensions k (or variables={...})")
        return k, {}
    sizes = {name: int(n) for name, n in variables.items()}
    if any(n < 1 for n in sizes.values()):
        raise ArgumentError(
            f"variables={dict(variables)}: every variable needs at least 1 dimension"
        )
    total = sum(sizes.values())
    if k is not None and k != total:
        raise ArgumentError(
            f"k={k} but the variables' sizes {sizes} add up to {total}: pass k={total} "
            "or leave k out (it defaults to the sum)."
        )
    starts = [0, *torch.tensor(list(sizes.values())).cumsum(0).tolist()]
    return total, {n: slice(s, s + sizes[n]) for n, s in zip(sizes, starts, strict=False)}


class _Subspace(Intervention):
    """Shared logic of the rotated-subspace interventions with a fixed ``k``."""

    d: int
    k: int
    slices: dict[str, slice]
    rotation: Rotation

    def _setup(self, d: int, k: int | None, variables: Mapping[str, int] | None) -> None:
        self.d = int(d)
        self.k, self.slices = _blocks(variables, k)
        if not 1 <= self.k <= self.d:
            raise ArgumentError(
                f"k={self.k} must be between 1 and d={self.d}: k is the number of "
                "dimensions interchanged, at most the width of the site."
            )

    def _columns(self, variable: str | None) -> slice:
        if variable is None:
            return slice(0, self.k)
        return lookup_variable(self, self.slices, variable)

    def forward(
        self,
        base: Float[Tensor, "... d"],
        source: Float[Tensor, "... d"] | None = None,
        variable: str | None = None,
    ) -> Float[Tensor, "... d"]:
        """Swap the first ``k`` rotated dimensions (or one variable's) in from ``source``."""
        source = need_source(self, source)
        check_width(self, base, self.d)
        check_width(self, source, self.d, "source")
        return _swap(base, source, self.rotation.weight[:, self._columns(variable)])

    @property
    def basis(self) -> Float[Tensor, "d k"]:
        """The learned orthonormal basis of the interchanged subspace (detached)."""
        with torch.no_grad():
            return self.rotation.weight[:, : self.k].detach().float().clone()


class RotatedSpace(_Subspace):
    """Distributed alignment search (DAS): interchange ``k`` dimensions of a learned rotation.

    The rotation is a full ``d x d`` orthogonal matrix; the first ``k`` of its columns
    span the interchanged subspace. ``variables`` lets several causal variables own
    disjoint blocks of those dimensions (``rot(base, source, variable="x")``).

    Args:
        d: Width of the site (its last dimension).
        k: Number of interchanged dimensions (default: the variables' total size).
        variables: Names and sizes of variables, laid out consecutively.
        orthogonal_map: ``"cayley"`` (default: trains faster and better for DAS) or
            ``"matrix_exp"``.
    """

    def __init__(
        self,
        d: int,
        k: int | None = None,
        variables: Mapping[str, int] | None = None,
        orthogonal_map: str = "cayley",
    ):
        super().__init__()
        self._setup(d, k, variables)
        self.rotation = Rotation(torch.zeros(self.d, self.d), _Orthogonal(self.d, orthogonal_map))


class LowRankRotatedSpace(_Subspace):
    """DAS with only the ``d x k`` interchanged part of the rotation (cheaper for small k).

    Args:
        d: Width of the site.
        k: Number of interchanged dimensions (default: the variables' total size).
        variables: Names and sizes of variables, laid out consecutively.
    """

    def __init__(self, d: int, k: int | None = None, variables: Mapping[str, int] | None = None):
        super().__init__()
        self._setup(d, k, variables)
        start = nn.init.orthogonal_(torch.empty(self.d, self.d))[:, : self.k]
        self.rotation = Rotation(start.contiguous(), _Stiefel())


class _Annealed(Intervention):
    """Shared parts of the soft-mask interventions: a temperature buffer, input checks."""

    d: int
    temperature: Tensor
    rotation: Rotation

    def set_temperature(self, value: float) -> None:
        """Set the temperature (the trainer calls this on its schedule)."""
        self.temperature.fill_(float(value))

    def _check(self, base: Tensor, source: Tensor | None) -> Tensor:
        source = need_source(self, source)
        check_width(self, base, self.d)
        check_width(self, source, self.d, "source")
        return source


class BoundlessRotatedSpace(_Annealed):
    """Boundless DAS: a learned rotation with a learned, soft boundary.

    Rotated dimension ``i`` (0-based) is taken from the source with weight
    ``sigmoid((b - i - 0.5) / (T * d))``, where the boundary ``b = d * sigmoid(theta)``
    is trained and the temperature ``T`` (a buffer, not a parameter) is annealed by
    ``iv.train`` from ``temperature_schedule[0]`` to ``[1]``: from 1 (soft
    over all ``d`` dimensions) to ``min(0.01, 0.1 / d)`` (an edge a tenth of a
    dimension wide), so the mask ends as a hard cut after ``b`` dimensions whatever
    ``d`` is.

    Args:
        d: Width of the site.
        init_boundary: Initial boundary as a fraction of ``d`` (in ``(0, 1)``).
        temperature: Initial temperature.
        orthogonal_map: ``"cayley"`` or ``"matrix_exp"``.
    """

    temperature_schedule = (1.0, 0.01)

    def __init__(
        self,
        d: int,
        init_boundary: float = 0.5,
        temperature: float = 1.0,
        orthogonal_map: str = "cayley",
    ):
        super().__init__()
        if not 0 < init_boundary < 1:
            raise ArgumentError(f"init_boundary={init_boundary} must be a fraction in (0, 1)")
        self.d = int(d)
        self.rotation = Rotation(torch.zeros(self.d, self.d), _Orthogonal(self.d, orthogonal_map))
        self.theta = nn.Parameter(torch.tensor(math.log(init_boundary / (1 - init_boundary))))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.temperature_schedule = (1.0, min(0.01, 0.1 / self.d))

    @property
    def boundary(self) -> float:
        """The learned boundary, in dimensions (strictly between 0 and d)."""
        return self.d * torch.sigmoid(self.theta.detach().float()).item()

    def mask(self) -> Float[Tensor, " d"]:
        """The weight with which each rotated dimension is taken from the source."""
        i = torch.arange(self.d, device=self.theta.device, dtype=torch.float32) + 0.5
        b = self.d * torch.sigmoid(self.theta.float())
        return torch.sigmoid((b - i) / (self.temperature.float() * self.d))

    def forward(
        self, base: Float[Tensor, "... d"], source: Float[Tensor, "... d"] | None = None
    ) -> Float[Tensor, "... d"]:
        """Mix ``base`` and ``source`` in the rotated basis through the boundary mask."""
        source = self._check(base, source)
        return _swap(base, source, self.rotation.weight, self.mask())


class SigmoidMask(_Annealed):
    """A learned soft mask over the site's own dimensions (no rotation).

    Dimension ``i`` is taken from the source with weight ``sigmoid(logit_i / T)``;
    ``T`` is annealed by the trainer like ``iv.BoundlessRotatedSpace``'s.

    Args:
        d: Width of the site.
        temperature: Initial temperature.
    """

    temperature_schedule = (1.0, 0.01)

    def __init__(self, d: int, temperature: float = 1.0):
        super().__init__()
        self.d = int(d)
        self.logits = nn.Parameter(torch.zeros(self.d))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def mask(self) -> Float[Tensor, " d"]:
        """The weight with which each dimension is taken from the source."""
        return torch.sigmoid(self.logits.float() / self.temperature.float())

    def forward(
        self, base: Float[Tensor, "... d"], source: Float[Tensor, "... d"] | None = None
    ) -> Float[Tensor, "... d"]:
        """``base + mask * (source - base)``."""
        source = self._check(base, source)
        dt = compute_dtype(base)
        mixed = base.to(dt) + self.mask().to(dt) * (source.to(dt) - base.to(dt))
        return mixed.to(base.dtype)

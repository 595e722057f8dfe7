"""The backend interface, and the registry of backends (imported lazily)."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import BackendError, closest
from ..sites.bind import Resolver

if TYPE_CHECKING:
    from ..ir.program import Program
    from ..model import Model
    from ..result import Result

#: backend name -> (module, class, pip extra, package it needs)
BACKENDS: dict[str, tuple[str, str, str | None, str | None]] = {
    "torch": ("tracevene.backends.torch_hooks", "TorchBackend", None, None),
    "nnsight": ("tracevene.backends.nnsight", "NNsightBackend", "nnsight", "nnsight"),
    "transformer_lens": (
        "tracevene.backends.transformer_lens", "LensBackend", "transformer-lens", "transformer_lens"
    ),
}
PLANNED: dict[str, str] = {}


class Backend(ABC):
    """Executes programs on models.

    One small interface; ``torch_hooks.TorchBackend`` is the reference implementation.
    """

    name: str = ""

    def prepare(self, module: nn.Module) -> nn.Module:
        """The module this backend runs (the caller's, or a private copy)."""
        return module

    def make_resolver(self, module: nn.Module) -> Resolver:
        """The object that binds site names to this backend's hook points."""
        return Resolver(module)

    @abstractmethod
    def check_site(self, model: Model, site: str) -> None:
        """Raise :class:`tracevene.errors.SiteError` if ``site`` is not valid on ``model``."""

    @abstractmethod
    def run(
        self,
        model: Model,
        program: Program,
        inputs: Sequence[Any],
        args: Mapping[str, Any],
        forward_kwargs: dict[str, Any],
        schedule: str,
    ) -> Result:
        """Run ``program`` with ``inputs[0]`` as the base and the rest as sources."""


def get_backend(name: str) -> Backend:
    """The backend called ``name``.

    Raises:
        BackendError: Unknown name, or its package is not installed.
    """
    if name not in BACKENDS:
        if name in PLANNED:
            raise BackendError(
                f"the {name!r} backend is not available in this version of tracevene; "
                "use backend='torch'."
            )
        near = ", ".join(closest(name, BACKENDS))
        raise BackendError(f"unknown backend {name!r}; closest: {near}.")
    module, cls, extra, package = BACKENDS[name]
    if package is not None and importlib.util.find_spec(package) is None:
        raise BackendError(
            f"the {name!r} backend needs the {package!r} package: pip install "
            f"'tracevene[{extra}]'"
        )
    return getattr(importlib.import_module(module), cls)()

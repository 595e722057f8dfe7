"""A program bound to a model, as an ``nn.Module`` whose parameters are its interventions'."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import ArgumentError

if TYPE_CHECKING:
    from .ir.program import Program
    from .model import Model
    from .result import Result

__all__ = ["BoundProgram"]


class BoundProgram(nn.Module):
    """A program bound to a model: an ``nn.Module`` that runs the program.

    Create one with ``program.bind(model, **args)``. Calling it runs
    ``program.run(model, base, sources, **args)`` and returns the ``iv.Result``
    (``bound(base, [source])["logits"]`` for a named save, ``.output`` for the model's
    output). Its submodules, and so its ``parameters()``, ``state_dict()``,
    ``.to()``, ``.train()`` and ``.eval()``, are exactly the program's intervention
    modules, under ``interventions.<key>`` (the keys of ``program.modules``); the
    model is held but not registered, so its weights are neither returned nor moved,
    and stay frozen in every run. The modules are the program's own objects: training
    the bound module trains the program, and ``program.save`` saves the result.

    Attributes:
        program (Program): The program.
        model (Model): The ``iv.Model`` it runs on.
        args (dict[str, Any]): Placeholder values passed to every run (a call's own
            override them).
        interventions (nn.ModuleDict): The program's modules, by key.
    """

    def __init__(
        self,
        program: Program,
        model: Model,
        *,
        schedule: str = "auto",
        forward_kwargs: Mapping[str, Any] | None = None,
        args: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.interventions = nn.ModuleDict(program.modules)
        self.program, self.model, self.schedule = program, model, schedule
        self.forward_kwargs = dict(forward_kwargs or {})
        self.args = dict(args or {})
        _check_args(program, self.args, "bind")

    def forward(self, base: Any, sources: Sequence[Any] = (), **args: Any) -> Result:
        """Run the program on the bound model.

        Args:
            base: Inputs of the base run, as in ``program.run``.
            sources: Inputs of each source run, in order.
            **args: Placeholder values for this call (over those given to ``bind``).

        Returns:
            The ``iv.Result``: the saved values and the base run's output.
        """
        _check_args(self.program, args, "call")
        return self.program.run(
            self.model,
            base,
            sources,
            schedule=self.schedule,
            forward_kwargs=self.forward_kwargs,
            **{**self.args, **args},
        )

    def extra_repr(self) -> str:
        """The program and the model, for ``print(bound)``."""
        module = type(self.model.module).__name__
        return f"program={self.program!r}, model={module} on {self.model.backend.name!r}"


def _check_args(program: Program, args: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(args) - set(program.args))
    if unknown:
        raise ArgumentError(
            f"{where}: {unknown} are not placeholders of this program (it has "
            f"{program.args or 'none'}); record them with t.arg(name)."
        )

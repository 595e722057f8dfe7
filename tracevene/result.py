"""``Result``: what a program run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .errors import MissingKeyError, TraceError


@dataclass
class Result:
    """Saved values and the base run's output.

    Attributes:
        saves: Named saves, ``name -> tensor``.
        output: The base run's model output.
        values: Every save by node id (unnamed saves are reached through their handles).
        plan: How the program was scheduled (``print(result.plan.describe())``).
    """

    saves: dict[str, Tensor]
    output: Any
    values: dict[int, Tensor] = field(default_factory=dict, repr=False)
    plan: Any = field(default=None, repr=False)
    program: Any = field(default=None, repr=False)

    def __getitem__(self, key: Any) -> Tensor:
        """``result["name"]``, or ``result[saved_handle]``."""
        if isinstance(key, str):
            if key not in self.saves:
                raise MissingKeyError(
                    f"no save named {key!r}; named saves: {', '.join(self.saves) or 'none'}"
                )
            return self.saves[key]
        save = getattr(key, "_save", None)
        if save is None:
            raise TraceError(f"index a result with a save name or a saved handle, not {key!r}")
        tracer = key._tracer
        if self.program is not None and self.program is tracer.program:
            return self.values[tracer.node_map[save]]
        if key.name is not None:
            return self.saves[key.name]
        raise TraceError(
            "this unnamed save belongs to another program than the one that made this "
            "result: give it a name (.save('name')) and use result['name']."
        )

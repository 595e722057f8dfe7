"""Starting a forward pass at a later block, from the residual an earlier run recorded.

A sweep that patches block ``L`` leaves blocks ``0 .. L-1`` as they were in the
unpatched run, so what they hand on is already known. ``Starts`` records, in one run,
each block's input and the form of a block's output; ``Starts.at`` then runs the model
with the blocks before ``L`` replaced by stand-ins that compute nothing and hand on
the recorded input of block ``L`` (for the pass's rows and positions). The embedding
still runs (it is cheap); block ``L`` and those after it run as usual.

It needs an engine that calls the Hugging Face blocks themselves (torch, nnsight):
``SiteResolver.blocks`` is ``None`` where it cannot (the TransformerLens bridge).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from jaxtyping import Float
from torch import Tensor, nn

from .engine import module_lock
from .hooks import replace_first

_MISSING = object()


@dataclass
class Starts:
    """Each block's input in one run, so that later passes can start at any block.

    Attributes:
        model: The top module (its ``module_lock`` guards the stand-ins).
        blocks: The model's blocks, in forward order.
        inputs: ``inputs[L]`` is block ``L``'s input ``[batch, pos, d_model]`` in the run.
        form: One block output of the run (a tensor, or a tuple starting with one):
            the form a stand-in's output takes.
    """

    model: nn.Module
    blocks: nn.ModuleList
    inputs: list[Tensor] = field(default_factory=list)
    form: Any = None

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Within the block, a run of the model records the form of block 0's output."""
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.form is None:
                self.form = output

        handle = self.blocks[0].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def at(self, layer: int, hidden: Float[Tensor, "rows pos d_model"]) -> Iterator[None]:
        """Within the block, the model's blocks before ``layer`` hand on ``hidden``.

        ``hidden`` is block ``layer``'s input for the pass (its rows and positions). The
        stand-ins are instance attributes shadowing ``forward``, put in place and taken
        off again under ``module_lock(model)``, so no other run sees them.
        """
        skipped = self.blocks[:layer]
        out = replace_first(self.form, hidden)
        with module_lock(self.model):
            saved = [b.__dict__.get("forward", _MISSING) for b in skipped]
            try:
                for block in skipped:
                    block.forward = _stand_in(out)
                yield
            finally:
                for block, old in zip(skipped, saved, strict=True):
                    if old is _MISSING:
                        del block.forward
                    else:
                        block.forward = old


def _stand_in(out: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return out

    return forward

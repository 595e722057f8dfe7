"""Views: how a site's tensor is cut from (and written back into) a hooked tensor.

Every engine builds its bindings from these; a view is a ``(get, set)`` pair with
``get(hooked_rows, ctx) -> site tensor`` and ``set(hooked_rows, new, ctx) -> new hooked
tensor``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .arch import Point

#: Head axis of each per-head site in its vocabulary layout (``[B, P, H, Dh]``;
#: ``[B, H, P, P]`` for attention probabilities).
HEAD_DIM = {"attn.q": 2, "attn.k": 2, "attn.v": 2, "attn.z": 2, "attn.pattern": 1}


@dataclass
class Ctx:
    """What a view may need besides the hooked tensor, for one firing of a hook.

    Attributes:
        module: The hooked module.
        input: The module's first input (for output hooks), all batch rows.
        captured: Tensors captured earlier in the same forward, by ``(path, io)``.
        rows: The batch rows of the run being read or written.
        state: Scratch space shared by the views of this firing.
    """

    module: nn.Module
    input: Tensor | None = None
    captured: dict[Point, Tensor] = field(default_factory=dict)
    rows: slice = field(default_factory=lambda: slice(None))
    state: dict[Any, Tensor] = field(default_factory=dict)


Getter = Callable[[Tensor, Ctx], Tensor]
Setter = Callable[[Tensor, Tensor, Ctx], Tensor]
View = tuple[Getter, Setter]


def _get(x: Tensor, ctx: Ctx) -> Tensor:
    return x


def _set(x: Tensor, new: Tensor, ctx: Ctx) -> Tensor:
    return new


#: The hooked tensor itself.
IDENT: View = (_get, _set)


def heads(n: int, dh: int, part: int = 0, parts: int = 1) -> View:
    """Chunk ``part`` of ``parts`` of the last dim, as ``n`` heads of ``dh``."""
    width = n * dh

    def get(x: Tensor, ctx: Ctx) -> Tensor:
        return x[..., part * width : (part + 1) * width].unflatten(-1, (n, dh))

    def put(x: Tensor, new: Tensor, ctx: Ctx) -> Tensor:
        if parts == 1:
            return new.flatten(-2)
        y = x.clone()
        y[..., part * width : (part + 1) * width] = new.flatten(-2)
        return y

    return get, put


def interleaved(n: int, dh: int, part: int, parts: int) -> View:
    """Part ``part`` of a last dim laid out as ``n`` heads x ``parts`` x ``dh``."""

    def get(x: Tensor, ctx: Ctx) -> Tensor:
        return x.unflatten(-1, (n, parts, dh))[..., part, :]

    def put(x: Tensor, new: Tensor, ctx: Ctx) -> Tensor:
        y = x.clone()
        y.unflatten(-1, (n, parts, dh))[..., part, :] = new
        return y

    return get, put


def head_out(h: int, z: Callable[[Ctx], Tensor], w: Callable[[Ctx], Tensor]) -> View:
    """Head ``h``'s share of the attention output, ``z(ctx) @ w(ctx)``, written as a delta.

    Args:
        h: The head.
        z: ``ctx -> [..., Dh]``, the head's weighted values for the rows read.
        w: ``ctx -> [Dh, D]``, the rows of the output projection the head writes through.
    """

    def get(out: Tensor, ctx: Ctx) -> Tensor:
        value = z(ctx) @ w(ctx)
        delta = ctx.state.get((h, ctx.rows.start, ctx.rows.stop))
        return value if delta is None else value + delta

    def put(out: Tensor, new: Tensor, ctx: Ctx) -> Tensor:
        change = new - get(out, ctx)
        key = (h, ctx.rows.start, ctx.rows.stop)
        ctx.state[key] = ctx.state.get(key, 0) + change
        return out + change

    return get, put


def head_weight(module: nn.Module, h: int, dh: int) -> Tensor:
    """Rows of an output projection that head ``h`` writes through, as ``[dh, d_out]``."""
    w = module.get_parameter("weight")
    if isinstance(module, nn.Linear):
        return w[:, h * dh : (h + 1) * dh].T
    return w[h * dh : (h + 1) * dh]  # transformers' Conv1D stores [d_in, d_out]


def resid_mid(pre: Point) -> View:
    """The residual after attention: the block's input (captured at ``pre``) plus this."""

    def get(out: Tensor, ctx: Ctx) -> Tensor:
        return ctx.captured[pre][ctx.rows] + out

    def put(out: Tensor, new: Tensor, ctx: Ctx) -> Tensor:
        return new - ctx.captured[pre][ctx.rows]

    return get, put


def select_head(view: View, dim: int, h: int) -> View:
    """Head ``h`` (on axis ``dim``) of what ``view`` cuts."""
    base_get, base_set = view
    index = (slice(None),) * dim + (h,)

    def get(x: Tensor, ctx: Ctx) -> Tensor:
        return base_get(x, ctx)[index]

    def put(x: Tensor, new: Tensor, ctx: Ctx) -> Tensor:
        full = base_get(x, ctx).clone()
        full[index] = new
        return base_set(x, full, ctx)

    return get, put

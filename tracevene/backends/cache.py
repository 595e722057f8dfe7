"""Reusing source passes across runs whose sources recur (epochs of DAS training).

A source pass is *cacheable* when it only reads clean activations of source runs and
computes from them (no writes, no intervention modules, no base run): its results
depend on nothing but the model, the sources' inputs and the placeholders. Then the
values it hands to later passes are kept, keyed by those inputs, and the next run
with the same inputs skips the pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..ir.nodes import Node
from .plan import Pass

CACHEABLE_OPS = ("read", "getitem", "call_function", "call_method")


class SourceCache:
    """Values handed on by source passes, keyed by the sources' inputs.

    Pass one instance to every ``iv.Program.run`` over recurring data
    (``program.run(..., source_cache=cache)``); ``iv.train`` does this
    across epochs. Only valid while the model's weights stay the same.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, dict[int, Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)


def cacheable(p: Pass) -> bool:
    """Whether pass ``p`` may be served from a cache (see the module docstring)."""
    nodes = [n for nodes in p.events.values() for n in nodes]
    return 0 not in p.runs and bool(nodes) and all(n.op in CACHEABLE_OPS for n in nodes)


def pass_key(program_id: int, p: Pass, calls: list, args: Mapping[str, Any]) -> tuple:
    """A key for the pass: the program, its runs, and digests of inputs and placeholders."""
    digest = hashlib.blake2b(digest_size=16)
    for call in calls:
        _feed(digest, call)
    _feed(digest, dict(sorted(args.items())))
    return program_id, tuple(p.runs), digest.hexdigest()


def handed_on(p: Pass, nodes: Sequence[Node]) -> set[int]:
    """Ids of the pass's nodes that nodes outside the pass (of ``nodes``) refer to."""
    inside = {n.id for events in p.events.values() for n in events}
    return {r for n in nodes if n.id not in inside for r in n.refs() if r in inside}


def compact(x: Any) -> Any:
    """A tensor that does not keep a larger one alive (a view is copied)."""
    if isinstance(x, Tensor):
        x = x.detach()
        return x.clone() if x._base is not None else x
    return x


def _feed(digest: Any, x: Any) -> None:
    if isinstance(x, Tensor):
        t = x.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(x, Mapping):
        for k, v in x.items():
            digest.update(f"K{k!r}".encode())
            _feed(digest, v)
    elif isinstance(x, (tuple, list)):
        digest.update(f"L{len(x)}".encode())
        for v in x:
            _feed(digest, v)
    else:
        digest.update(f"V{type(x).__name__}:{x!r}".encode())

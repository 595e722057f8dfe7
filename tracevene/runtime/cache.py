"""Reusing source passes across runs whose sources recur (epochs of DAS training).

A source pass is *cacheable* when it only reads clean activations of source runs and
computes from them (no writes, no intervention modules, no base run): its results
depend on nothing but the model, the sources' inputs and the values it computes from.
Then the values it hands to later passes are kept, and the next run whose pass has the
same key skips the pass.

The key is the pass's content, never an object's ``id`` (ids are reused once an object
is gone): the backend, the model module (a token that no other live module has), its
mode and the identity, version counter and storage of every parameter and buffer (an
in-place update or a replaced tensor misses), the pass's nodes (ops, sites, runs,
arguments and node ids), the values of the nodes outside the pass that it computes from
(placeholders, constants, values of earlier passes), the ids it hands on, and the
forward calls of its runs.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..ir.nodes import Node
from .plan import Pass

if TYPE_CHECKING:
    from ..model import Model

CACHEABLE_OPS = ("read", "getitem", "call_function", "call_method")


class SourceCache:
    """Values handed on by source passes, keyed by the sources' inputs.

    Pass one instance to every ``iv.Program.run`` over recurring data
    (``program.run(..., source_cache=cache)``); ``iv.train`` does this
    across epochs. One cache may be shared by any number of programs and models:
    entries are keyed by what a pass reads and computes (see the module docstring),
    so a changed weight, another program or other inputs miss rather than hit.
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


def pass_key(
    model: Model, p: Pass, calls: list, values: Mapping[int, Any], nodes: Sequence[Node]
) -> tuple:
    """A key for the pass that depends only on what the pass's results depend on.

    Args:
        model: The ``iv.Model`` that runs the pass.
        p: The pass.
        calls: Forward calls of the pass's runs.
        values: Values of the nodes that have run so far.
        nodes: The program's nodes.
    """
    inside = {n.id for events in p.events.values() for n in events}
    digest = hashlib.blake2b(digest_size=16)
    module = model.module
    digest.update(f"B{model.backend.name}:{token(module)}:{module.training}:".encode())
    dev = model.device.type
    digest.update(f"A{torch.is_autocast_enabled(dev)}:{torch.get_autocast_dtype(dev)}".encode())
    for kind, tensors in (("P", module.named_parameters()), ("U", module.named_buffers())):
        for name, t in tensors:
            ptr = t.data_ptr() if t.numel() else 0
            digest.update(
                f"{kind}{name}:{token(t)}:{t._version}:{ptr}:{t.dtype}:{tuple(t.shape)}:"
                f"{t.device}".encode()
            )
    for event, events in p.events.items():
        digest.update(f"E{event!r}".encode())
        for n in events:
            digest.update(repr((n.id, n.op, n.target, n.run, n.args, n.kwargs)).encode())
    outside = sorted({r for n in nodes if n.id in inside for r in n.refs()} - inside)
    for r in outside:
        digest.update(f"R{r}".encode())
        # a value not there yet: the pass raises, so no entry is ever kept under this key
        _feed(digest, values[r] if r in values else "<missing>")
    for call in calls:
        _feed(digest, call)
    return tuple(p.runs), tuple(sorted(handed_on(p, nodes))), digest.hexdigest()


_tokens: dict[int, tuple[weakref.ref, int]] = {}
_counter = itertools.count()
_tokens_lock = threading.RLock()  # re-entrant: a collection may call drop() inside


def token(x: Any) -> int:
    """A number never given to another object (unlike ``id``, reused once one is gone)."""
    with _tokens_lock:
        entry = _tokens.get(id(x))
        if entry is not None and entry[0]() is x:
            return entry[1]
        key = id(x)

        def drop(ref: weakref.ref, key: int = key) -> None:
            with _tokens_lock:
                if _tokens.get(key, (None,))[0] is ref:
                    del _tokens[key]

        _tokens[key] = (weakref.ref(x, drop), n := next(_counter))
        return n


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

"""Evaluating program nodes on real tensors (shared by every backend)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    ExecutionError,
    MissingKeyError,
    ScheduleError,
    ShapeError,
    TraceveneError,
)
from ..ir.nodes import Node, Ref, resolve_function
from ..ir.program import Program, format_index, run_name
from ..sites.bind import Binding, Ctx
from ..sites.vocab import display


def _passes(e: Exception) -> bool:
    """Whether ``e`` propagates as it is rather than as an ``ExecutionError``.

    tracevene's own errors already say what failed; those that stand in for a builtin
    error (an intervention given a bad argument) get the user's line like any other.
    """
    stand_ins = (ArgumentError, ArgumentTypeError, MissingKeyError)
    return isinstance(e, TraceveneError) and not isinstance(e, stand_ins)


class Env:
    """Values of the nodes that have run so far."""

    def __init__(self, program: Program, args: dict[str, Any], device: torch.device):
        self.program = program
        self.args = args
        self.device = device
        self.values: dict[int, Any] = {}

    def get(self, x: Any, node: Node) -> Any:
        """Resolve refs inside an argument."""
        if isinstance(x, Ref):
            if x.id not in self.values:
                raise ScheduleError(
                    f"line {node.loc}: %{node.id} needs %{x.id} "
                    f"({_describe(self.program.nodes[x.id])}), which has not run yet. The "
                    "module order tracevene inferred does not match this model's execution "
                    "order; try schedule='sequential' or read the value from a source run."
                )
            return self.values[x.id]
        if isinstance(x, tuple):
            return tuple(self.get(v, node) for v in x)
        if isinstance(x, list):
            return [self.get(v, node) for v in x]
        if isinstance(x, slice):
            return slice(self.get(x.start, node), self.get(x.stop, node), self.get(x.step, node))
        return x

    def compute(self, node: Node) -> None:
        """Run a node that is neither a read nor a write."""
        try:
            self.values[node.id] = self._compute(node)
        except ShapeError as e:
            if node.op != "call_module":
                raise
            raise ShapeError(_module_shape_message(self.program, node, e)) from e
        except Exception as e:
            if _passes(e):
                raise
            raise ExecutionError(
                f"line {node.loc}: {_describe(node)} failed: {type(e).__name__}: {e}"
            ) from e

    def _compute(self, node: Node) -> Any:
        op = node.op
        if op == "arg":
            return self.args[node.key]
        if op == "const":
            return self.program.tensors[node.key].to(self.device)
        if op == "save" and not node.kwargs:  # the common case, without the general path
            return self.get(node.args[0], node)
        args = self.get(node.args, node)
        kwargs = {k: self.get(v, node) for k, v in node.kwargs}
        if op == "getitem":
            return args[0][args[1]]
        if op == "setitem":
            out = args[0].clone()
            out[args[1]] = args[2]
            return out
        if op == "call_function":
            return resolve_function(node.key)(*args, **kwargs)
        if op == "call_method":
            return getattr(args[0], node.key)(*args[1:], **kwargs)
        if op == "call_module":
            return self.program.modules[node.key](*args, **kwargs)
        if op == "save":
            return args[0]
        raise ExecutionError(f"cannot compute op {op!r}")

    def read(self, node: Node, binding: Binding, x: Tensor, ctx: Ctx) -> None:
        """Run a read node against the hooked tensor ``x`` (all rows)."""
        try:
            value = binding.get(_rows(x, ctx.rows), ctx)
            # A view of a live activation would change if the model later modified it in
            # place (ReLU(inplace=True)), which arbitrary modules may do: keep module-site
            # values as they were when read. The architectures with site tables never
            # modify activations in place, so vocabulary sites skip this copy.
            own = binding.site.kind == "module" and (value is x or value._base is not None)
            self.values[node.id] = value.clone() if own else value
        except Exception as e:
            if _passes(e):
                raise
            raise ExecutionError(f"line {node.loc}: {_describe(node)} failed: {e}") from e

    def write(self, node: Node, binding: Binding, x: Tensor, ctx: Ctx) -> Tensor:
        """Run a write node; returns the new hooked tensor."""
        index, value = self.get(node.args, node)
        rows = _rows(x, ctx.rows)
        try:
            site = binding.get(rows, ctx)
            new = _assign(site, index, value, node)
            new_rows = binding.set(rows, new, ctx)
        except Exception as e:
            if _passes(e):
                raise
            raise ExecutionError(f"line {node.loc}: {_describe(node)} failed: {e}") from e
        if ctx.rows == slice(None):
            return new_rows
        out = x.clone()
        out[ctx.rows] = new_rows
        return out

    def run_nodes(self, nodes: list[Node]) -> None:
        """Compute a list of nodes (no reads or writes among them)."""
        for node in nodes:
            self.compute(node)


def _rows(x: Tensor, rows: slice) -> Tensor:
    return x if rows == slice(None) else x[rows]


def _assign(site: Tensor, index: Any, value: Any, node: Node) -> Tensor:
    if not isinstance(value, (Tensor, int, float, bool)):
        where = f"{run_name(node.run_index)}.{display(node.key)}{format_index(index)}"
        raise ExecutionError(
            f"line {node.loc}: cannot write a {type(value).__name__} ({value!r:.40}) to "
            f"{where}: a site takes a tensor or a number. The value comes from a module "
            "or function of the program: make it return a tensor."
        )
    if not isinstance(value, Tensor):
        value = torch.as_tensor(value, dtype=site.dtype, device=site.device)
    target = site if index == () else site[index]
    while value.dim() > target.dim() and value.shape[0] == 1:  # as torch's setitem allows
        value = value[0]
    try:
        shape = torch.broadcast_shapes(value.shape, target.shape)
    except RuntimeError:
        shape = None
    if shape != target.shape:
        where = f"{run_name(node.run_index)}.{display(node.key)}{format_index(index)}"
        raise ShapeError(
            f"line {node.loc}: cannot write a value of shape {tuple(value.shape)} to {where}, "
            f"which has shape {tuple(target.shape)} (the site has shape {tuple(site.shape)}). "
            "Index the value or the site so the shapes match (or broadcast)."
        )
    value = value.to(site.dtype)
    if index == ():
        # A fresh, dense tensor: never the caller's tensor or a stride-0 broadcast, which
        # the model's in-place operations would corrupt or reject.
        return value.expand(site.shape).clone(memory_format=torch.contiguous_format)
    out = site.clone()
    out[index] = value
    return out


def _describe(node: Node) -> str:
    if node.op in ("read", "write"):
        return f"{node.op} of {run_name(node.run_index)}.{display(node.key)}"
    return f"%{node.id} ({node.op} {node.target or ''})".replace(" )", ")")


def _module_shape_message(program: Program, node: Node, error: ShapeError) -> str:
    """The module's shape error, with the user's line and the sites its inputs come from."""
    sites = ", ".join(source_sites(program, node)) or "no site (constants and placeholders)"
    module = type(program.modules[node.key]).__name__
    return (
        f"line {node.loc}: {module} ({node.target}) applied to {sites}: {error} If the "
        "program was saved for another model, run it on a model whose sites have the "
        "widths it was built for."
    )


def source_sites(program: Program, node: Node) -> list[str]:
    """The sites (``base.layer[1].resid_post``) that ``node``'s arguments are computed from.

    Walks references back through computed values to the ``read`` nodes they start
    at, in program order.
    """
    seen: set[int] = set()
    stack = list(node.refs())
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            if program.nodes[i].op != "read":
                stack.extend(program.nodes[i].refs())
    reads = [program.nodes[i] for i in sorted(seen) if program.nodes[i].op == "read"]
    names = (f"{run_name(n.run_index)}.{display(n.key)}" for n in reads)
    return list(dict.fromkeys(names))

"""Path patching (Wang et al. 2023): a sender's effect along chosen paths only.

The orig run is repeated with the senders' outputs taken from the new run while every
other attention head is frozen at its orig value (MLPs are recomputed, as in the
paper, unless ``freeze_mlps``); the receivers' inputs are read from that run. A second
orig run with only the receivers' inputs replaced by those values measures the metric.
So the senders reach the receivers through direct paths only (the residual stream),
and the receivers reach the output through everything downstream of them.

Two forms give the same numbers: ``"two_pass"`` (the two runs one after the other)
and ``"single_pass"`` (both stacked along the batch axis of one forward pass; the
second half's receivers copy the first half's values at the moment they are
computed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError, ArgumentTypeError
from ..model import Model, as_model
from ..runtime.inputs import slice_output
from ..tracing.tracer import trace
from .activation import Metric, input_shape, paired_inputs
from .outputs import scored
from .result import PatchResult
from .runner import check_per_pass, repeat, run_stacked, sizes
from .runner import rows as rows_of

Position = int | Tensor | None
FORMS = ("two_pass", "single_pass")
INPUTS = ("q", "k", "v")


@dataclass(frozen=True, eq=False)
class Head:
    """An attention head as a sender (its output) or a receiver (its inputs).

    Attributes:
        layer: The head's layer.
        head: The head's index in the layer.
        input: As a receiver: ``"q"``, ``"k"`` or ``"v"`` to patch that input only;
            ``None`` patches all three.
        pos: Positions the node covers: an int, per-example positions (a LongTensor
            ``[batch]``), or ``None`` for all positions.
    """

    layer: int
    head: int
    input: str | None = None
    pos: Position = None

    def __repr__(self) -> str:
        name = f"Head({self.layer}.{self.head}" + (f".{self.input}" if self.input else "")
        return name + ("" if self.pos is None else f", pos={_pos_repr(self.pos)}") + ")"


@dataclass(frozen=True, eq=False)
class Mlp:
    """A layer's MLP as a sender (its output) or a receiver (its input).

    Attributes:
        layer: The MLP's layer.
        pos: Positions, as for ``Head``.
    """

    layer: int
    pos: Position = None

    def __repr__(self) -> str:
        return (
            f"Mlp({self.layer}" + ("" if self.pos is None else f", pos={_pos_repr(self.pos)}") + ")"
        )


@dataclass(frozen=True, eq=False)
class Resid:
    """The residual stream entering a layer (``layer[i].resid_pre``) at some positions.

    As a sender, the stream takes its value from the new run there (everything that
    reached it); as a receiver, it is the stream the later layers read there.

    Attributes:
        layer: The layer the stream enters.
        pos: Positions, as for ``Head``.
    """

    layer: int
    pos: Position = None

    def __repr__(self) -> str:
        return (
            f"Resid({self.layer}"
            + ("" if self.pos is None else f", pos={_pos_repr(self.pos)}")
            + ")"
        )


Node = Head | Mlp | Resid
_KIND = {Mlp: "mlp", Resid: "resid"}


def path_patching(
    model: Model | torch.nn.Module,
    orig: Any,
    new: Any,
    metric: Metric,
    senders: str | Sequence[Node | Sequence[Node]] = "heads",
    receivers: str | Node | Sequence[Node] = "logits",
    *,
    freeze_mlps: bool = False,
    form: str = "two_pass",
    experiments_per_pass: int = 16,
    progress: bool = True,
) -> PatchResult:
    """Measure ``metric`` with each sender set patched along its paths to ``receivers``.

    Args:
        model: The model.
        orig: Token ids ``[batch, pos]`` of the prompts the model runs on, a dict of
            tensors (``input_ids``, ``attention_mask``), or text (``str`` /
            ``list[str]``, tokenised with padding by the model's tokenizer).
        new: Inputs of the same shape and padding: where the senders' values come from.
        metric: ``metric(x) -> scalar`` for one experiment's rows: ``x`` is the logits
            ``[batch, pos, vocab]`` where the model has them, otherwise the model's
            output (for a headless ``BertModel`` its ``BaseModelOutputWithPooling...``:
            read ``x.last_hidden_state``), as for ``activation_patching``.
        senders: ``"heads"`` (every head alone; values ``[layer, head]``) or a list of
            sender sets, each a ``Head`` / ``Mlp`` / ``Resid`` or a list
            of them (values ``[n_sets]``).
        receivers: ``"logits"`` (the senders' direct effect on the output), or a
            ``Head`` / ``Mlp`` / ``Resid`` or a list of them, which receive
            together. On a model without logits (an encoder) ``"logits"`` means its
            output, e.g. the final hidden state: the senders reach it through the
            residual stream and the recomputed MLPs and LayerNorms only (in a
            post-LN encoder such as BERT that includes every later layer's norms).
            Node positions are the padded batch's.
        freeze_mlps: Also freeze the MLPs that are not senders or receivers (the paper
            recomputes them).
        form: ``"two_pass"`` or ``"single_pass"``.
        experiments_per_pass: How many sender sets share one forward pass.
        progress: Show a progress bar.

    Returns:
        The metric of every patched run.

    Raises:
        ArgumentError: Bad senders, receivers, form or ``experiments_per_pass``, or
            orig and new inputs of different shapes or padding.
    """
    model = as_model(model)
    sets, shape, axes = _sender_sets(model, senders)
    targets = _receivers(model, receivers)
    if form not in FORMS:
        raise ArgumentError(f"form={form!r}: choose 'two_pass' or 'single_pass'")
    check_per_pass(experiments_per_pass)
    orig, new = paired_inputs(model, orig, new, ("orig", "new"))
    caches = (_components(model, orig), _components(model, new))
    run = _single_pass if form == "single_pass" else _two_pass
    out = run_stacked(
        sets, lambda chunk: run(model, orig, chunk, targets, caches, freeze_mlps), metric,
        _batch(orig), experiments_per_pass=experiments_per_pass, progress=progress,
        desc="path patching",
    )  # fmt: skip
    return PatchResult(out.reshape(shape), axes, "path", "noise", "path patching")


# -- arguments ----------------------------------------------------------------------------
def _sender_sets(model: Model, senders: Any) -> tuple[list[list[Node]], tuple, tuple]:
    """Sender sets as lists of nodes, and the result's shape and axis names."""
    if isinstance(senders, str):
        if senders != "heads":
            raise ArgumentError(
                f"senders={senders!r}: give 'heads' (every head alone) or a list of sender "
                "sets such as [Head(0, 1), [Head(1, 0), Mlp(1)]]"
            )
        n_layers, n_heads, _ = sizes(model, "path_patching")
        sets: list[list[Node]] = [[Head(lay, h)] for lay in range(n_layers) for h in range(n_heads)]
        return sets, (n_layers, n_heads), ("layer", "head")
    sets = [_nodes(model, s, "sender") for s in senders]
    if not sets:
        raise ArgumentError("senders is empty: give 'heads' or at least one sender set")
    for nodes in sets:
        for node in nodes:
            if isinstance(node, Head) and node.input is not None:
                raise ArgumentError(
                    f"sender {node!r} names an input ({node.input!r}); a sender is a head's "
                    f"output: use Head({node.layer}, {node.head})"
                )
    return sets, (len(sets),), ("sender",)


def _receivers(model: Model, receivers: Any) -> list[Node]:
    """The receiver nodes; ``[]`` for the logits (the output of a model without logits)."""
    if isinstance(receivers, str):
        if receivers != "logits":
            raise ArgumentError(
                f"receivers={receivers!r}: give 'logits' or Head / Mlp nodes, e.g. Head(1, 0, 'k')"
            )
        return []
    return _nodes(model, receivers, "receiver")


def _nodes(model: Model, nodes: Any, role: str) -> list[Node]:
    nodes = [nodes] if isinstance(nodes, Head | Mlp | Resid) else list(nodes)
    n_layers, n_heads, _ = sizes(model, "path_patching")
    for node in nodes:
        if not isinstance(node, Head | Mlp | Resid):
            raise ArgumentTypeError(
                f"a {role} must be a Head(layer, head), an Mlp(layer) or a Resid(layer); got "
                f"{type(node).__name__} {node!r}"
            )
        if not 0 <= node.layer < n_layers:
            raise ArgumentError(f"{role} {node!r}: layer must be in 0..{n_layers - 1}")
        if isinstance(node, Head):
            if not 0 <= node.head < n_heads:
                raise ArgumentError(f"{role} {node!r}: head must be in 0..{n_heads - 1}")
            if node.input not in (None, *INPUTS):
                raise ArgumentError(
                    f"{role} {node!r}: input must be 'q', 'k', 'v' or None (all three)"
                )
    return nodes


# -- the runs -----------------------------------------------------------------------------
def _batch(inputs: Any) -> int:
    """The batch size of token ids ``[batch, pos]`` (or a dict's ``input_ids``)."""
    shape = input_shape(inputs)
    if shape is None:
        raise ArgumentTypeError(
            "path_patching takes token ids (a tensor [batch, pos]), a dict of tensors with "
            "'input_ids', or text (str / list[str], with a tokenizer), got "
            f"{type(inputs).__name__}"
        )
    return shape[0]


def _components(model: Model, inputs: Any) -> dict[str, list[Tensor]]:
    """Every layer's per-head ``z``, MLP output and residual input on ``inputs``."""
    layers = range(sizes(model, "path_patching").n_layers)
    with trace(model) as t:
        saved = {
            "z": [t.layer[i].attn.z.save() for i in layers],
            "mlp": [t.layer[i].mlp.out.save() for i in layers],
            "resid": [t.layer[i].resid_pre.save() for i in layers],
        }
    with torch.no_grad():
        result = t.program.run(model, inputs)
    return {kind: [result[s].detach() for s in handles] for kind, handles in saved.items()}


@dataclass
class _Writes:
    """What the first run writes: every layer's ``z``, frozen MLPs, and senders' rows."""

    z: list[Tensor]
    mlp: dict[int, Tensor]
    rows: list[tuple[Node, Tensor, Any, Tensor]]  # (sender, rows, positions, value)


def _frozen(
    model: Model, chunk: list[list[Node]], targets: list[Node], caches: tuple, freeze_mlps: bool
) -> _Writes:
    """The first run's writes for ``chunk`` (experiment ``e`` owns the ``e``-th batch copy)."""
    orig, new = caches
    n = len(chunk)
    batch = orig["z"][0].shape[0]
    layers = range(sizes(model, "path_patching").n_layers)
    writes = _Writes([orig["z"][i].repeat(n, 1, 1, 1) for i in layers], {}, [])
    if freeze_mlps:
        skip = {node.layer for node in targets if isinstance(node, Mlp)}
        writes.mlp = {i: orig["mlp"][i].repeat(n, 1, 1) for i in layers if i not in skip}
    for e, nodes in enumerate(chunk):
        for node in nodes:
            rows, pos = _index(e, batch, node.pos)
            if isinstance(node, Head):
                source = new["z"][node.layer][_rows0(batch), pos, node.head]
                writes.z[node.layer][rows, pos, node.head] = source
                continue
            source = new[_KIND[type(node)]][node.layer][_rows0(batch), pos]
            if isinstance(node, Mlp) and node.layer in writes.mlp:
                writes.mlp[node.layer][rows, pos] = source
            else:  # only this experiment's rows: other experiments recompute the site
                writes.rows.append((node, rows, pos, source))
    return writes


def _write_frozen(run: Any, writes: _Writes, targets: list[Node], rows: Any) -> None:
    """Write the first run's values into ``run`` (rows ``rows``), leaving receivers free."""
    free = {(n.layer, n.head) for n in targets if isinstance(n, Head) and n.input is None}
    for layer, value in enumerate(writes.z):
        heads = [h for h in range(value.shape[2]) if (layer, h) not in free]
        if len(heads) == value.shape[2]:
            run.layer[layer].attn.z[rows] = value
        else:
            for h in heads:
                run.layer[layer].attn.head[h].z[rows] = value[:, :, h]
    for layer, value in writes.mlp.items():
        run.layer[layer].mlp.out[rows] = value
    for node, experiment_rows, pos, value in writes.rows:  # rows of the first run's half
        _site(run, node)[experiment_rows, pos] = value


def _site(run: Any, node: Node) -> Any:
    """A node's site in ``run`` (for an MLP or all of a head's inputs, its output)."""
    if isinstance(node, Head):
        return run.site(f"attn.{node.input or 'z'}", node.layer, node.head)
    return run.site("mlp.out" if isinstance(node, Mlp) else "resid_pre", node.layer)


def _two_pass(model, orig, chunk, targets, caches, freeze_mlps) -> Any:
    """What the metric scores (logits, or the output), for every experiment's rows."""
    n, batch = len(chunk), _batch(orig)
    writes = _frozen(model, chunk, targets, caches, freeze_mlps)
    with trace(model) as t:
        saved = [_site(t, node).save() for node in targets]
        _write_frozen(t, writes, targets, slice(None))
    inputs = repeat(orig, n)
    with torch.no_grad():
        first = t.program.run(model, inputs)
    if not targets:
        return scored(first.output)
    with trace(model) as t:
        for node, handle in zip(targets, saved, strict=True):
            rows, pos = _all_rows(n, batch, node.pos)
            _site(t, node)[rows, pos] = first[handle][rows, pos]
    with torch.no_grad():
        return scored(t.program.run(model, inputs).output)


def _single_pass(model, orig, chunk, targets, caches, freeze_mlps) -> Any:
    """As ``_two_pass``, with both runs stacked along the batch axis of one pass."""
    n, batch = len(chunk), _batch(orig)
    writes = _frozen(model, chunk, targets, caches, freeze_mlps)
    half = n * batch
    with trace(model) as t:
        for node in targets:
            rows, pos = _all_rows(n, batch, node.pos)
            _site(t, node)[rows + half, pos] = _site(t, node)[rows, pos]
        _write_frozen(t, writes, targets, slice(0, half))
    with torch.no_grad():
        out = scored(t.program.run(model, repeat(orig, 2 * n)).output)
    return slice_output(out, slice(half, None) if targets else slice(0, half))


# -- rows and positions -------------------------------------------------------------------
def _rows0(batch: int) -> Tensor:
    return torch.arange(batch)


def _index(e: int, batch: int, pos: Position) -> tuple[Any, Any]:
    """Row and position indices of experiment ``e``'s copy of the batch."""
    return rows_of(e, batch), _positions(pos, batch)


def _all_rows(n: int, batch: int, pos: Position) -> tuple[Tensor, Any]:
    """Rows of all ``n`` experiments and their positions (as broadcastable indices)."""
    rows = torch.arange(n * batch)
    positions = _positions(pos, batch)
    if isinstance(positions, Tensor):
        return rows, positions.repeat(n)
    return rows, positions


def _positions(pos: Position, batch: int) -> Any:
    if pos is None:
        return slice(None)
    if isinstance(pos, int):
        return torch.full((batch,), pos)
    pos = torch.as_tensor(pos).long()
    if pos.shape != (batch,):
        raise ArgumentError(
            f"per-example positions must be a LongTensor [batch] = [{batch}]; got shape "
            f"{tuple(pos.shape)}"
        )
    return pos


def _pos_repr(pos: int | Tensor) -> str:
    return str(pos) if isinstance(pos, int) else f"tensor{tuple(pos.shape)}"

"""Turning user inputs into forward-call arguments, and batching runs together."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, ArgumentTypeError, ExecutionError
from ..ir.nodes import Node, Ref
from ..ir.program import Program, format_arg, format_index, run_name
from ..sites.vocab import display, parse

if TYPE_CHECKING:
    from ..model import Model

Call = tuple[tuple, dict]


def to_call(
    model: Model,
    inputs: Any,
    forward_kwargs: Mapping[str, Any],
    device: torch.device | None = None,
) -> Call:
    """``(args, kwargs)`` for ``model.module(...)`` from one run's inputs.

    ``device`` is where the inputs go (default ``model.device``; a run that already
    read it passes it on).
    """
    hf = model.resolver.arch is not None
    inputs = tokenize(model, inputs)
    if isinstance(inputs, torch.Tensor):
        args, kwargs = ((), {"input_ids": inputs}) if hf else ((inputs,), {})
    elif isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, tuple):
        args, kwargs = inputs, {}
    else:
        raise ArgumentTypeError(
            f"cannot use a {type(inputs).__name__} as model inputs: pass token ids, a dict "
            "of forward arguments, text (with a tokenizer), or the module's own input "
            "tensor / tuple of tensors."
        )
    kwargs = {**forward_kwargs, **kwargs}
    if hf:
        kwargs.setdefault("use_cache", False)
    device = model.device if device is None else device
    args, kwargs = _to(args, device), {k: _to(v, device) for k, v in kwargs.items()}
    if hf and "attention_mask" in kwargs:  # (with_position_ids needs a mask)
        kwargs = with_position_ids(model.module, kwargs, _length(kwargs))
    return args, kwargs


def _length(kwargs: Mapping[str, Any]) -> int | None:
    """The number of tokens a Hugging Face call runs (``None`` if it cannot tell)."""
    for key in ("input_ids", "inputs_embeds"):
        x = kwargs.get(key)
        if isinstance(x, Tensor) and x.dim() >= 2:
            return x.shape[1]
    return None


# -- positions of padded batches ---------------------------------------------------------
def position_ids(mask: Tensor, length: int | None = None) -> Tensor | None:
    """Position ids that give each row the positions of its prompt run alone.

    A token's position counts the real tokens (``attention_mask`` 1) before it, as
    Hugging Face's ``generate`` counts them (padding before the first real token gets
    position 0; padding is masked out of attention, so its position is moot). Only rows where
    padding moves a real token off the model's default position (``0, 1, ...``: a pad
    before a real token, as in left padding) get these positions; the other rows keep
    the defaults, so right-padded and unpadded rows run exactly as without this.

    Args:
        mask: The attention mask ``[batch, pos]`` (1 real token, 0 padding), covering
            any cached tokens before the ones this call runs.
        length: How many tokens the call runs (the last ``length`` columns of the
            mask; default all of them).

    Returns:
        A LongTensor ``[batch, length]``, or ``None`` where every row keeps the
        default positions (then the model computes them itself).
    """
    mask = mask.long()
    length = mask.shape[1] if length is None else length
    derived = (mask.cumsum(-1) - 1).clamp(min=0)[:, -length:]
    default = torch.arange(mask.shape[1], device=mask.device)[-length:].expand_as(derived)
    moved = ((derived != default) & (mask[:, -length:] != 0)).any(-1, keepdim=True)
    if not bool(moved.any()):
        return None
    return torch.where(moved, derived, default)


def with_position_ids(module: nn.Module, kwargs: dict[str, Any], length: int | None) -> dict:
    """``kwargs`` plus ``position_ids`` from the attention mask where padding needs them.

    Left padding otherwise shifts every real token of a shorter prompt to a later
    position (models with learned positions, such as GPT-2, then compute other
    values). Nothing changes when ``kwargs`` already hold ``position_ids``, have no
    2-D attention mask, or ``module``'s forward takes no ``position_ids``.
    """
    mask = kwargs.get("attention_mask")
    if "position_ids" in kwargs or length is None or not isinstance(mask, Tensor):
        return kwargs
    if mask.dim() != 2 or mask.shape[1] < length or not _takes_position_ids(type(module)):
        return kwargs
    positions = position_ids(mask, length)
    return kwargs if positions is None else {**kwargs, "position_ids": positions}


@functools.cache
def _takes_position_ids(cls: type) -> bool:
    try:
        return "position_ids" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def tokenize(model: Model, inputs: Any, what: str = "inputs") -> Any:
    """Text (``str`` / ``list[str]``) tokenised by the model's tokenizer; else ``inputs``."""
    if not (isinstance(inputs, str) or (isinstance(inputs, list) and _all_str(inputs))):
        return inputs
    if model.tokenizer is None:
        raise ArgumentError(
            f"text {what} need a tokenizer: iv.wrap(model, tokenizer=tok), or pass "
            "token ids (a LongTensor [batch, pos])."
        )
    return dict(model.tokenizer(inputs, return_tensors="pt", padding=True))


def _all_str(x: list) -> bool:
    return bool(x) and all(isinstance(s, str) for s in x)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    return x


def batch_size(call: Call) -> int:
    """The batch size of a call: dim 0 of its first tensor."""
    for x in (*call[0], *call[1].values()):
        if isinstance(x, torch.Tensor):
            return x.shape[0] if x.dim() else 1
    return 1


def can_batch(calls: Sequence[Call]) -> bool:
    """Whether calls have the same structure and shapes except the batch dim."""
    first = calls[0]
    return all(_compatible(first, c) for c in calls[1:])


def _compatible(a: Call, b: Call) -> bool:
    if len(a[0]) != len(b[0]) or a[1].keys() != b[1].keys():
        return False
    pairs = list(zip(a[0], b[0], strict=True)) + [(a[1][k], b[1][k]) for k in a[1]]
    for x, y in pairs:
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.dim() == 0 or x.shape[1:] != y.shape[1:] or x.dtype != y.dtype:
                return False
        elif x is not y and x != y:
            return False
    return True


def concat(calls: Sequence[Call]) -> Call:
    """One call whose tensors are the calls' tensors stacked along the batch dim."""
    if len(calls) == 1:
        return calls[0]
    args = tuple(_cat([c[0][i] for c in calls]) for i in range(len(calls[0][0])))
    kwargs = {k: _cat([c[1][k] for c in calls]) for k in calls[0][1]}
    return args, kwargs


def _cat(xs: list) -> Any:
    return torch.cat(xs) if isinstance(xs[0], torch.Tensor) else xs[0]


def slice_output(output: Any, rows: slice) -> Any:
    """The rows of a (batched) model output that belong to one run."""
    if isinstance(output, torch.Tensor):
        return output[rows] if output.dim() else output
    if hasattr(output, "keys") and hasattr(output, "__setitem__"):
        out = type(output)(**{k: slice_output(v, rows) for k, v in output.items()})
        return out
    if isinstance(output, (tuple, list)):
        return type(output)(slice_output(v, rows) for v in output)
    return output


# -- right padding ------------------------------------------------------------------------
def last_token_positions(inputs: Any) -> Tensor:
    """The position of each prompt's last real token in a padded batch.

    Works for left and right padding alike: with left padding every row's last real
    token is the last position; with right padding it is where the row's
    ``attention_mask`` ends. Index a site with it, row by row:

        batch = model.tokenizer(prompts, return_tensors="pt", padding=True)
        last = iv.last_token_positions(batch)
        with iv.trace(model, batch) as t:
            logits = t.logits[torch.arange(len(prompts)), last].save()

    Args:
        inputs: A dict or ``BatchEncoding`` with ``attention_mask`` (without one,
            nothing is padded and every row's last token is the last position), or
            the attention mask ``[batch, pos]`` itself (1 real token, 0 padding).

    Returns:
        A LongTensor ``[batch]`` of positions.

    Raises:
        ArgumentTypeError: ``inputs`` is text or another type (tokenize first).
        ArgumentError: A mask that is not ``[batch, pos]`` of 0 and 1, or a row with
            no real token.
    """
    mask = _mask_of(inputs)
    if mask.dim() != 2 or not bool(((mask == 0) | (mask == 1)).all()):
        raise ArgumentError(
            f"last_token_positions needs an attention mask [batch, pos] of 0 (padding) "
            f"and 1 (real tokens); got a {mask.dtype} tensor of shape {tuple(mask.shape)}. "
            "Pass the tokenizer's output (a dict with 'attention_mask') or its mask."
        )
    empty = (~mask.bool().any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ArgumentError(
            f"row(s) {empty} of the attention mask hold no real token (all 0), so they "
            "have no last token; drop those rows from the batch."
        )
    return mask.shape[1] - 1 - mask.long().flip(-1).argmax(-1)


def _mask_of(inputs: Any) -> Tensor:
    """The attention mask of ``inputs`` (all ones for unpadded token ids)."""
    if isinstance(inputs, Mapping):
        if inputs.get("attention_mask") is not None:
            return torch.as_tensor(inputs["attention_mask"])
        if inputs.get("input_ids") is not None:
            return torch.ones_like(torch.as_tensor(inputs["input_ids"]))
    elif isinstance(inputs, Tensor):
        return inputs
    raise ArgumentTypeError(
        f"last_token_positions takes tokenized inputs (a dict or BatchEncoding with "
        f"'attention_mask') or an attention mask tensor, got {type(inputs).__name__}. "
        "Tokenize text first: batch = model.tokenizer(prompts, return_tensors='pt', "
        "padding=True), and pass that batch both here and to iv.trace."
    )


def check_padding(program: Program, calls: Sequence[Call]) -> None:
    """Refuse positions counted from the end (``[:, -1]``) of a right-padded run.

    In a right-padded batch, the last positions of the shorter prompts are padding,
    so ``site[:, -1]`` reads or writes padding for them instead of their last token.

    Raises:
        ExecutionError: A read or write of a site at a negative position (or a slice
            starting at one) in a run whose ``attention_mask`` ends in 0 on some row.
    """
    reads = {n.id: n for n in program.nodes if n.op == "read"}
    padded: dict[int, list[int]] = {}
    for node in program.nodes:
        if node.op != "write" and node.op != "getitem":
            continue  # (most nodes: skipped without a call)
        site, index = _indexed_site(node, reads)
        if site is None or site.run_index >= len(calls):
            continue
        end = _from_end(index, _position_axes(site.key))
        if end is None:
            continue
        run = site.run_index
        if run not in padded:
            padded[run] = _right_padded(calls[run])
        if padded[run]:
            raise ExecutionError(_padding_message(node, site, index, end, padded[run]))


def _indexed_site(node: Node, reads: Mapping[int, Node]) -> tuple[Node | None, Any]:
    """The read or write node of a site that ``node`` indexes, and the index."""
    if node.op == "write":
        return node, node.args[0]
    if node.op == "getitem" and isinstance(node.args[0], Ref) and node.args[0].id in reads:
        return reads[node.args[0].id], node.args[1]
    return None, None


def _position_axes(target: str) -> tuple[int, ...]:
    """The position axes of a vocabulary site (none for module and hook sites)."""
    site = parse(target)
    if site.kind not in ("top", "layer"):
        return ()
    if site.key == "attn.pattern":  # [B, H, P, P], or [B, P, P] for one head
        return (1, 2) if site.head is not None else (2, 3)
    return (1,)


def _from_end(index: Any, axes: tuple[int, ...]) -> Any:
    """The negative position (an int, or a slice starting at one) ``index`` takes, if any."""
    items = index if isinstance(index, tuple) else (index,)
    if any(x is Ellipsis or x is None for x in items):
        return None  # the axes move; not worth guessing
    for axis in axes:
        x = items[axis] if axis < len(items) else None
        if isinstance(x, int) and not isinstance(x, bool) and x < 0:
            return x
        if isinstance(x, slice) and isinstance(x.start, int) and x.start < 0:
            return x
    return None


def _right_padded(call: Call) -> list[int]:
    """Rows whose attention mask ends in padding (0 at the last position)."""
    mask = call[1].get("attention_mask")
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[1] == 0:
        return []
    ends = (mask[:, -1] == 0) & (mask != 0).any(-1)
    return ends.nonzero().flatten().tolist()


def _padding_message(node: Node, site: Node, index: Any, end: Any, rows: list[int]) -> str:
    run = run_name(site.run_index)
    where = f"{run}.{display(site.key)}{format_index(index)}"
    what = f"position {end}" if isinstance(end, int) else f"positions {format_arg(end)}"
    return (
        f"line {node.loc}: {where} counts positions from the end, but the {run} inputs "
        f"are right-padded: row(s) {rows} end in padding (attention_mask 0 at the last "
        f"position), so {what} is padding there, not the prompt's last token. Index "
        "each prompt's last real token instead, site[torch.arange(batch), "
        "iv.last_token_positions(inputs)] (or pass those positions as t.arg('pos')), or "
        "pad on the left (tokenizer.padding_side = 'left')."
    )

"""Activation patching sweeps, many experiments per forward pass.

A sweep patches one cell at a time (a layer and a position, optionally one head) from
one run into another and measures the effect with a metric. tracevene stacks many
such experiments along the batch axis of one forward pass: each experiment is a copy
of the patched run's batch, and each copy gets its own cell.

Three levers, all from one unpatched run of the patched input:

- A cell whose patch writes what the unpatched run already holds there (resid_pre
  before the first token where clean and corrupted differ) changes nothing: its
  metric is the unpatched run's, and no pass runs it.
- In a causal language model, patching position ``p`` leaves every position before
  ``p`` as it was, so the experiments that patch ``p`` share one pass that starts at
  ``p``: the keys and values of the positions before it come from the unpatched
  run's KV cache, and so do their logits. Any other model (an encoder, where every
  position sees every other, or a model without logits) runs every pass over the
  whole input.
- Patching block ``L`` leaves the blocks before it as they were, so a pass starts at
  the lowest block its experiments patch, from the unpatched run's input to that
  block (``runtime/skip.py``), on the torch and nnsight backends; the TransformerLens
  bridge runs every block.

The metric scores the logits of a language model and the model's output otherwise
(see ``tracevene/patching/outputs.py``).

Text inputs (``str`` / ``list[str]``) are tokenised as ``iv.trace`` tokenises them
(padding on the tokenizer's side, with an attention mask); the two runs must tokenise
to the same padded shape with the same padding (``paired_inputs``). A padded base
keeps the KV-cache lever: its attention mask covers the cached positions and each
pass's position ids are derived from it, as in ``iv.trace``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ArgumentError, SiteError
from ..model import Model, as_model
from ..runtime.inputs import tokenize
from ..runtime.skip import Starts
from ..tracing.tracer import trace
from .outputs import scored
from .result import PatchResult
from .runner import repeat, score_each, sizes

Metric = Callable[[Any], Tensor]
DIRECTIONS = ("denoise", "noise")
POSITIONS = ("each", "all", "dest_src")
HEAD_SITES = ("q", "k", "v", "pattern", "z", "out")
Cell = tuple[tuple[int, ...], tuple[int, ...]]  # ((layer,) or (layer, head), positions)


def activation_patching(
    model: Model | torch.nn.Module,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    *,
    site: str = "resid_pre",
    heads: bool = False,
    direction: str = "denoise",
    positions: str = "each",
    experiments_per_pass: int = 16,
    progress: bool = True,
) -> PatchResult:
    """Patch ``site`` at every layer and position (and head) and measure ``metric``.

    With ``direction="denoise"`` each experiment runs the model on ``corrupted`` with
    one cell taken from the clean run (TransformerLens's ``get_act_patch_*``); with
    ``"noise"``, on ``clean`` with one cell from the corrupted run.

    Args:
        model: The model: a language model, an encoder such as a headless
            ``BertModel``, or a TransformerLens model.
        clean: Token ids ``[batch, pos]`` of the clean prompts, a dict of tensors
            (``input_ids``, ``attention_mask``), or text (``str`` / ``list[str]``,
            tokenised with padding by the model's tokenizer).
        corrupted: The corrupted prompts, of the same shape and padding.
        metric: ``metric(x) -> scalar`` for one experiment's rows of the batch. ``x`` is
            the logits ``[batch, pos, vocab]`` where the model has them (e.g. a
            normalised logit difference), otherwise the model's output (for a
            ``BertModel`` its ``BaseModelOutputWithPooling...``: read
            ``x.last_hidden_state`` ``[batch, pos, d_model]``). Positions are the
            padded batch's: read a right-padded prompt's last token at
            ``iv.last_token_positions(batch)``.
        site: A per-layer site with a position axis: ``"resid_pre"``, ``"resid_mid"``,
            ``"resid_post"``, ``"attn.out"``, ``"mlp.out"``, ``"attn.pattern"``; with
            ``heads=True`` a per-head site: ``"z"``, ``"q"``, ``"k"``, ``"v"``,
            ``"out"`` or ``"pattern"``. Pattern sites are patched by destination
            position (a whole row of the pattern); the sweep then reads and writes
            the attention probabilities, so attention runs through an eager kernel.
        heads: Patch one head at a time (axes ``[layer, pos, head]``).
        direction: ``"denoise"`` or ``"noise"``.
        positions: ``"each"`` patches one position at a time; ``"all"`` patches the
            site at every position at once (axes ``[layer]`` or ``[layer, head]``, as
            TransformerLens's ``*_all_pos`` functions); ``"dest_src"`` (pattern sites
            only) patches one entry (destination, source) of the pattern at a time
            (axes ``[layer, dest_pos, src_pos]``, then ``head``).
        experiments_per_pass: How many experiments share one forward pass.
        progress: Show a progress bar over the passes.

    Returns:
        The metric of every cell. The head axis comes last, so TransformerLens's
        ``get_act_patch_attn_head_pattern_by_pos`` (``[layer, head, dest_pos]``) is
        ``values.permute(0, 2, 1)`` of ``site="pattern", heads=True``, and its
        ``*_dest_src_pos`` is ``values.permute(0, 3, 1, 2)`` of ``positions="dest_src"``.

    Raises:
        ArgumentError: An unknown direction or positions, ``"dest_src"`` on a site
            that is not a pattern, ``experiments_per_pass`` below 1, or clean and
            corrupted inputs of different shapes or padding.
        SiteError: A site this model does not have, or a per-head site without
            ``heads=True``.
    """
    model = as_model(model)
    _check(site, heads, direction, positions, experiments_per_pass)
    clean, corrupted = paired_inputs(model, clean, corrupted)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    n_layers, n_heads, n_kv_heads = sizes(model, "activation_patching")
    n_heads = n_kv_heads if heads and site in ("k", "v") else n_heads
    keys = _cells(n_layers, n_heads if heads else 0)
    values = _read_all(model, source, keys, site)  # also checks the site names
    axis = _pos_axis(site, heads)
    n_pos = next(iter(values.values())).shape[axis]
    cells = [(key, p) for key in keys for p in _grid(positions, n_pos)]
    unpatched = _Unpatched.of(model, base, keys, site, by_position=positions != "all")
    batch = next(iter(values.values())).shape[0]
    changed = [i for i, cell in enumerate(cells) if not unpatched.holds(cell, values, axis)]
    out = score_each(unpatched.out, metric, 1, batch).expand(len(cells)).clone()
    chunks = _chunks(cells, changed, experiments_per_pass, unpatched)
    for chunk in tqdm(chunks, desc=f"patching {site}", disable=not progress):
        todo = [cells[i] for i in chunk]
        out[chunk] = _run_chunk(model, base, todo, (site, axis), values, metric, unpatched)
    return _result(out, n_layers, n_heads if heads else 0, n_pos, site, direction,
                   _axes(site, positions))  # fmt: skip


def _check(site: str, heads: bool, direction: str, positions: str, per_pass: int) -> None:
    """Reject arguments no sweep takes, with what would be valid."""
    if direction not in DIRECTIONS:
        raise ArgumentError(f"direction={direction!r}: choose 'denoise' or 'noise'")
    if positions not in POSITIONS:
        raise ArgumentError(f"positions={positions!r}: choose 'each', 'all' or 'dest_src'")
    if per_pass < 1:
        raise ArgumentError(f"experiments_per_pass={per_pass} must be at least 1")
    if not heads and site in HEAD_SITES:
        raise SiteError(
            f"site={site!r} is a per-head site: pass heads=True to patch one head at a "
            f"time, or site='attn.{site}' to patch every head of a layer at once"
        )
    if positions == "dest_src" and not site.endswith("pattern"):
        raise ArgumentError(
            f"positions='dest_src' patches one (destination, source) entry of an attention "
            f"pattern, so it needs site='pattern' with heads=True or site='attn.pattern'; "
            f"for site={site!r} use positions='each' or 'all'"
        )


def paired_inputs(
    model: Model, clean: Any, corrupted: Any, names: tuple[str, str] = ("clean", "corrupted")
) -> tuple[Any, Any]:
    """Both runs' inputs, text tokenised (padded, with an attention mask) as ``iv.trace`` does.

    Patching pairs position ``p`` of one run with position ``p`` of the other, so the
    two need the same shape and, where padded, the same padding.

    Raises:
        ArgumentError: Inputs of different shapes, or attention masks that differ
            (a pair of prompts with different numbers of tokens).
    """
    text = [_is_text(x) for x in (clean, corrupted)]
    pair = (tokenize(model, clean, f"{names[0]} inputs"),
            tokenize(model, corrupted, f"{names[1]} inputs"))  # fmt: skip
    shapes = [input_shape(x) for x in pair]
    if None not in shapes and shapes[0] != shapes[1]:
        how = _TOKENS_HOW if any(text) else "pad or truncate them to the same [batch, pos]"
        raise ArgumentError(
            f"{names[0]} and {names[1]} inputs must have the same shape, got {names[0]} "
            f"{shapes[0]} and {names[1]} {shapes[1]}: {how}"
        )
    _check_masks(pair, names)
    return pair


_TOKENS_HOW = (
    "patching pairs position p of each prompt with position p of its counterpart, so each "
    "pair of prompts must tokenise to as many tokens (check len(model.tokenizer(prompt)"
    "['input_ids'])) and reword those that do not, or pass token ids of one length"
)


def _is_text(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, list) and bool(x) and isinstance(x[0], str))


def input_shape(inputs: Any) -> tuple[int, ...] | None:
    """``[batch, pos, ...]`` of token ids (or a dict's ``input_ids``); ``None`` if unknown."""
    if isinstance(inputs, Mapping):
        tensors = [v for v in inputs.values() if isinstance(v, Tensor) and v.dim() >= 2]
        inputs = inputs.get("input_ids", tensors[0] if tensors else None)
    if isinstance(inputs, Tensor) and inputs.dim() >= 2:
        return tuple(inputs.shape)
    return None


def _mask(inputs: Any) -> Tensor | None:
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask if isinstance(mask, Tensor) and mask.dim() == 2 else None


def _check_masks(pair: tuple[Any, Any], names: tuple[str, str]) -> None:
    """Refuse runs padded differently: their positions would not pair up."""
    masks = [_mask(x) for x in pair]
    if masks == [None, None]:
        return
    shape = input_shape(pair[0]) or input_shape(pair[1])
    full = torch.ones(shape[:2], dtype=torch.long) if shape else None
    a, b = (full if m is None else m.long().cpu() for m in masks)
    if a is None or b is None or a.shape != b.shape:
        return
    rows = (a != b).any(-1).nonzero().flatten().tolist()
    if rows:
        counts = ", ".join(f"{int(a[r].sum())} vs {int(b[r].sum())}" for r in rows[:4])
        raise ArgumentError(
            f"row(s) {rows} of the {names[0]} and {names[1]} inputs are padded differently "
            f"(their attention masks differ; real tokens {counts}): {_TOKENS_HOW}"
        )


def _pos_axis(site: str, heads: bool) -> int:
    """The site's (destination) position axis: 2 in a layer's pattern ``[B, H, P, P]``."""
    return 2 if site == "attn.pattern" and not heads else 1


def _grid(positions: str, n_pos: int) -> list[tuple[int, ...]]:
    """The positions of the cells: ``()`` for all at once, ``(p,)``, or ``(dest, src)``."""
    if positions == "all":
        return [()]
    if positions == "each":
        return [(p,) for p in range(n_pos)]
    return [(d, s) for d in range(n_pos) for s in range(n_pos)]


def _axes(site: str, positions: str) -> tuple[str, ...]:
    """The position axes' names of a result."""
    if positions == "all":
        return ()
    if positions == "dest_src":
        return ("dest_pos", "src_pos")
    return ("dest_pos",) if site.endswith("pattern") else ("pos",)


def _result(
    out: Tensor, n_layers: int, n_heads: int, n_pos: int, site: str, direction: str,
    pos_axes: tuple[str, ...],
) -> PatchResult:  # fmt: skip
    """The metrics as ``[layer, *positions, head]`` (heads last, as TransformerLens's)."""
    shape = (n_layers, *([n_heads] if n_heads else []), *([n_pos] * len(pos_axes)))
    values: Float[Tensor, "layer ..."] = out.reshape(shape)
    if n_heads and pos_axes:  # [layer, pos, head], as TransformerLens's *_by_pos functions
        values = values.movedim(1, -1)
    axes = ("layer", *pos_axes, *(["head"] if n_heads else []))
    return PatchResult(values, axes, site, direction)


def _cells(n_layers: int, n_heads: int) -> list[tuple[int, ...]]:
    """Cell keys: ``(layer,)``, or ``(layer, head)`` when ``n_heads`` > 0."""
    if n_heads:
        return [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    return [(layer,) for layer in range(n_layers)]


def _at(run: Any, key: tuple[int, ...], site: str) -> Any:
    """The site value of cell ``key`` (``(layer,)`` or ``(layer, head)``) in ``run``."""
    return run.site(f"attn.{site}", *key) if len(key) == 2 else run.site(site, key[0])


def _read_all(model: Model, inputs: Any, keys: list, site: str) -> dict[Any, Tensor]:
    """Every cell's site value on ``inputs`` (one forward pass)."""
    with trace(model) as t:
        saved = {key: _at(t, key, site).save() for key in keys}
    result = t.program.run(model, inputs)
    return {key: result[handle].detach() for key, handle in saved.items()}


def _chunks(
    cells: list[Cell], todo: list[int], size: int, unpatched: _Unpatched
) -> list[Tensor]:
    """Indices of the cells each pass runs, of those in ``todo``, in layer order.

    Where the unpatched run lets passes start at a later position (its KV cache), each
    pass holds cells of one position only. Each pass starts at its lowest block.
    """
    start = [unpatched.position(cell) for cell in cells]
    order = sorted(todo, key=lambda i: (start[i], cells[i][0]))
    chunks: list[list[int]] = []
    for i in order:
        if not chunks or len(chunks[-1]) == size or start[chunks[-1][0]] != start[i]:
            chunks.append([])
        chunks[-1].append(i)
    return [torch.tensor(c) for c in chunks]


def _start(pos: tuple[int, ...]) -> int:
    """The first position a cell's patch changes: its (destination) position, or 0."""
    return pos[0] if pos else 0


def _cut(pos: tuple[int, ...], axis: int) -> tuple:
    """The index of positions ``pos`` from axis ``axis`` on, every row and head."""
    return (*(slice(None),) * axis, *pos)


@dataclass
class _Unpatched:
    """The unpatched run: each cell's value and the output, and where passes can start.

    Attributes:
        out: What the metric scores in the unpatched run (its logits).
        cells: Cell key -> the site's value there.
        ids: The token ids, where passes may start at a later position (else ``None``).
        mask: Their attention mask (``None``: no padding).
        cache: The run's KV cache, where passes may start at a later position.
        starts: Each block's input, where passes may start at a later block.
    """

    out: Any
    cells: dict[tuple[int, ...], Tensor]
    ids: Tensor | None = None
    mask: Tensor | None = None
    cache: Any = None
    starts: Starts | None = None

    @classmethod
    def of(
        cls, model: Model, base: Any, keys: list[tuple[int, ...]], site: str, by_position: bool
    ) -> _Unpatched:
        """Run ``base`` once, keeping what later passes reuse.

        Passes start at the patched position only in a Hugging Face causal LM (one
        that can generate, with logits) called on token ids, padded or not, when cells
        have positions (``by_position``): in an encoder every position sees every other.
        They start at the patched block where the engine calls the blocks itself.
        """
        ids, mask = _ids_and_mask(base) if by_position and _generates(model) else (None, None)
        inputs = base if ids is None else {"input_ids": ids, "use_cache": True,
                                           **_with_mask(mask, 1)}  # fmt: skip
        blocks = model.resolver.blocks
        starts = None if blocks is None else Starts(model.module, blocks)
        with trace(model) as t:
            saved = {key: _at(t, key, site).save() for key in keys}
            resid = [t.site("resid_pre", i).save() for i in range(len(blocks or ()))]
        with torch.no_grad(), starts.recording() if starts else nullcontext():
            result = t.program.run(model, inputs)
        cache = getattr(result.output, "past_key_values", None)
        if ids is not None and not _can_crop(cache):
            ids = mask = cache = None
        if starts is not None:
            starts.inputs = [result[h].detach() for h in resid]
        cells = {key: result[h].detach() for key, h in saved.items()}
        return cls(_detach(scored(result.output)), cells, ids, mask, cache, starts)

    def holds(self, cell: Cell, values: Mapping[Any, Tensor], axis: int) -> bool:
        """Whether ``cell`` already holds what ``values`` patch in: patching changes nothing."""
        key, pos = cell
        return torch.equal(self.cells[key][_cut(pos, axis)], values[key][_cut(pos, axis)])

    def position(self, cell: Cell) -> int:
        """The position a pass patching ``cell`` can start at."""
        return _start(cell[1]) if self.cache is not None else 0

    def inputs(self, base: Any, start: int, n: int) -> Any:
        """Forward arguments for ``n`` copies of the batch, from position ``start`` on.

        The attention mask covers the cached positions too; the backend derives each
        row's position ids from it (left padding), as for a whole pass.
        """
        if start == 0 or self.ids is None:
            return repeat(base, n)
        cache = _fork(self.cache)
        cache.crop(start - self.ids.shape[1])  # a negative count: tokens to drop
        cache.batch_select_indices(torch.arange(self.ids.shape[0]).repeat(n))
        ids = self.ids[:, start:].repeat(n, 1)
        return {"input_ids": ids, "past_key_values": cache, "use_cache": True,
                **_with_mask(self.mask, n)}  # fmt: skip

    def at(self, block: int, start: int, n: int) -> Any:
        """A context in which the model's blocks before ``block`` compute nothing."""
        if block == 0 or self.starts is None:
            return nullcontext()
        return self.starts.at(block, self.starts.inputs[block][:, start:].repeat(n, 1, 1))

    def prepend(self, out: Any, start: int, n: int) -> Any:
        """A pass's scored output from position ``start``, with the unpatched positions before."""
        if start == 0:
            return out
        prefix = self.out[:, :start]
        full = out.new_empty((out.shape[0], prefix.shape[1] + out.shape[1], *out.shape[2:]))
        full.unflatten(0, (n, -1))[:, :, :start] = prefix  # broadcast over the n copies
        full[:, start:] = out
        return full


def _fork(cache: Any) -> Any:
    """A copy of a KV cache to crop and extend, sharing the tensors (never written in place).

    Cropping slices and row selection indexes, so each makes new tensors; only the
    cache and its layer objects need copies of their own.
    """
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return copy.deepcopy(cache)
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in layers]
    return new


def _can_crop(cache: Any) -> bool:
    """Whether a KV cache can drop its last positions (a sliding window past its size cannot)."""
    if not hasattr(cache, "batch_select_indices") or not hasattr(cache, "crop"):
        return False
    try:
        _fork(cache).crop(-1)
    except RuntimeError:  # transformers: a sliding layer that no longer keeps the past
        return False
    return True


def _generates(model: Model) -> bool:
    """Whether the model is a Hugging Face language model that can generate."""
    hf = model.resolver.plain
    if hf is None or model.resolver.arch is None:
        return False
    can_generate = getattr(hf, "can_generate", None)
    return callable(can_generate) and bool(can_generate())


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


def _ids_and_mask(base: Any) -> tuple[Tensor | None, Tensor | None]:
    """``base``'s token ids and mask (``None``: no padding), if that is all it holds."""
    if isinstance(base, Tensor):
        return (base, None) if base.dim() == 2 else (None, None)
    if not isinstance(base, Mapping) or not set(base) <= {"input_ids", "attention_mask"}:
        return None, None
    ids, mask = base.get("input_ids"), base.get("attention_mask")
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        return None, None
    if mask is None or bool((torch.as_tensor(mask) != 0).all()):
        return ids, None
    mask = torch.as_tensor(mask)
    return (ids, mask) if mask.shape == ids.shape else (None, None)


def _with_mask(mask: Tensor | None, n: int) -> dict[str, Tensor]:
    return {} if mask is None else {"attention_mask": mask.repeat(n, 1)}


def _run_chunk(
    model: Model,
    base: Any,
    chunk: list[Cell],
    site: tuple[str, int],
    values: Mapping[Any, Tensor],
    metric: Metric,
    unpatched: _Unpatched,
) -> Tensor:
    """Run ``len(chunk)`` experiments as one pass; the metric of each.

    ``site`` is the site's name and its position axis. All experiments of the chunk
    share one start position (``_Unpatched.position``); the pass starts there, at the
    lowest block any of them patches.
    """
    n = len(chunk)
    start, block = unpatched.position(chunk[0]), min(key[0] for key, _ in chunk)
    batch = next(iter(values.values())).shape[0]
    by_site: dict[Any, list[tuple[int, tuple[int, ...]]]] = {}
    for e, (key, pos) in enumerate(chunk):
        by_site.setdefault(key, []).append((e, pos))
    with trace(model) as t:
        for key, experiments in by_site.items():
            _write(_at(t, key, site[0]), values[key], experiments, batch, start, site[1])
    with torch.no_grad(), unpatched.at(block, start, n):
        out = scored(t.program.run(model, unpatched.inputs(base, start, n)).output)
    return score_each(unpatched.prepend(out, start, n), metric, n, batch)


def _write(
    target: Any, value: Tensor, experiments: list, batch: int, start: int, axis: int
) -> None:
    """Write each experiment's cell of ``value`` into its rows of ``target``.

    ``experiments`` holds ``(e, positions)`` pairs, all with as many positions; the
    positions index ``value`` from its axis ``axis`` on (the pass starts at ``start``).
    """
    rows = torch.cat([torch.arange(e * batch, (e + 1) * batch) for e, _ in experiments])
    skip = (slice(None),) * (axis - 1)  # the head axis of a layer's pattern
    n_pos = len(experiments[0][1])
    shifts = [start] + [0] * (n_pos - 1)  # only the destination moves with the pass
    index = [
        torch.tensor([pos[i] - shifts[i] for _, pos in experiments]).repeat_interleave(batch)
        for i in range(n_pos)
    ]
    source = torch.cat([value[_cut(pos, axis)] for _, pos in experiments])
    target[(rows, *skip, *index) if n_pos else rows] = source

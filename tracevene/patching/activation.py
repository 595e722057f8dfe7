"""Activation patching sweeps, many experiments per forward pass.

A sweep patches one cell at a time (a layer and a position, optionally one head) from
one run into another and measures the effect with a metric. tracevene stacks many
such experiments along the batch axis of one forward pass: each experiment is a copy
of the patched run's batch, and each copy gets its own cell.

In a causal language model, patching position ``p`` leaves every position before
``p`` as it was, so the experiments that patch ``p`` share one pass that starts at
``p``: the keys and values of the positions before it come from the unpatched run's
KV cache, and so do their logits.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..metrics import logits_of
from ..model import Model, as_model
from ..tracing.tracer import trace
from .result import PatchResult

Metric = Callable[[Tensor], Tensor]
DIRECTIONS = ("denoise", "noise")


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
        model: The model.
        clean: Token ids ``[batch, pos]`` of the clean prompts (or a dict of tensors).
        corrupted: The corrupted prompts, of the same shape.
        metric: ``metric(logits) -> scalar`` for one experiment's logits
            ``[batch, pos, vocab]`` (e.g. a normalised logit difference).
        site: A per-layer site with a position axis: ``"resid_pre"``, ``"resid_mid"``,
            ``"resid_post"``, ``"attn.out"``, ``"mlp.out"``; with ``heads=True`` a
            per-head site: ``"z"``, ``"q"``, ``"k"``, ``"v"`` or ``"out"``.
        heads: Patch one head at a time (axes ``[layer, pos, head]``).
        direction: ``"denoise"`` or ``"noise"``.
        positions: ``"each"`` patches one position at a time; ``"all"`` patches the
            site at every position at once (axes ``[layer]`` or ``[layer, head]``, as
            TransformerLens's ``*_all_pos`` functions).
        experiments_per_pass: How many experiments share one forward pass.
        progress: Show a progress bar over the passes.

    Returns:
        The metric of every cell.
    """
    model = as_model(model)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: choose 'denoise' or 'noise'")
    if positions not in ("each", "all"):
        raise ValueError(f"positions={positions!r}: choose 'each' or 'all'")
    if experiments_per_pass < 1:
        raise ValueError(f"experiments_per_pass={experiments_per_pass} must be at least 1")
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    n_heads = model.n_kv_heads if heads and site in ("k", "v") else model.n_heads
    keys = _cells(model.n_layers, n_heads if heads else 0)
    values = _read_all(model, source, keys, site)  # also checks the site names
    n_pos = next(iter(values.values())).shape[1]
    each = positions == "each"
    cells = [(key, p) for key in keys for p in (range(n_pos) if each else [None])]
    prefix = _Prefix.of(model, base) if each else None
    out = torch.empty(len(cells))
    chunks = _chunks(cells, experiments_per_pass, by_position=prefix is not None)
    for chunk in tqdm(chunks, desc=f"patching {site}", disable=not progress):
        todo = [cells[i] for i in chunk]
        out[chunk] = _run_chunk(model, base, todo, site, values, metric, prefix)
    shape = (model.n_layers, *([n_heads] if heads else []), *([n_pos] if each else []))
    result = out.reshape(shape)
    if heads and each:  # [layer, pos, head], as TransformerLens's *_by_pos functions
        result = result.permute(0, 2, 1)
    axes = ("layer", *(["pos"] if each else []), *(["head"] if heads else []))
    return PatchResult(result, axes, site, direction)


def _cells(n_layers: int, n_heads: int) -> list[tuple[int, ...]]:
    """Cell keys: ``(layer,)``, or ``(layer, head)`` when ``n_heads`` > 0."""
    if n_heads:
        return [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    return [(layer,) for layer in range(n_layers)]


def _at(run: Any, key: tuple[int, ...], site: str) -> Any:
    """The site value of cell ``key`` (``(layer,)`` or ``(layer, head)``) in ``run``."""
    scope = run.layer[key[0]]
    if len(key) == 2:
        scope = scope.attn.head[key[1]]
    for part in site.split("."):
        scope = getattr(scope, part)
    return scope


def _read_all(model: Model, inputs: Any, keys: list, site: str) -> dict[Any, Tensor]:
    """Every cell's site value on ``inputs`` (one forward pass)."""
    with trace(model) as t:
        saved = {key: _at(t, key, site).save() for key in keys}
    result = t.program.run(model, inputs)
    return {key: result[handle].detach() for key, handle in saved.items()}


def _chunks(cells: list, size: int, by_position: bool) -> list[Tensor]:
    """Indices of the cells each pass runs; one position per pass if ``by_position``."""
    order = (
        sorted(range(len(cells)), key=lambda i: cells[i][1]) if by_position else range(len(cells))
    )
    chunks: list[list[int]] = []
    for i in order:
        full = chunks and len(chunks[-1]) == size
        if not chunks or full or (by_position and cells[chunks[-1][0]][1] != cells[i][1]):
            chunks.append([])
        chunks[-1].append(i)
    return [torch.tensor(c) for c in chunks]


@dataclass
class _Prefix:
    """The unpatched run's KV cache and logits, so passes can start at a later position."""

    ids: Tensor
    logits: Tensor
    cache: Any

    @classmethod
    def of(cls, model: Model, base: Any) -> _Prefix | None:
        """The prefix of ``base`` (token ids); ``None`` where it cannot be reused.

        Only for a Hugging Face causal LM (one that can generate) called on token ids:
        in an encoder every position sees every other, so nothing can be reused.
        """
        bridged = model.backend.name == "transformer_lens"
        hf = model.resolver.hf_module if bridged else model.module
        if not isinstance(base, Tensor) or hf is None or model.resolver.arch is None:
            return None
        if not (callable(getattr(hf, "can_generate", None)) and hf.can_generate()):
            return None
        with trace(model) as t:
            t.logits.save()
        with torch.no_grad():
            output = t.program.run(model, {"input_ids": base, "use_cache": True}).output
        cache = getattr(output, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_select_indices"):
            return None
        return cls(base, logits_of(output).detach(), cache)

    def inputs(self, start: int, n: int) -> dict[str, Any]:
        """Forward arguments for ``n`` copies of the batch, from position ``start`` on."""
        cache = copy.deepcopy(self.cache)
        cache.crop(start - self.ids.shape[1])  # a negative count: tokens to drop
        cache.batch_select_indices(torch.arange(self.ids.shape[0]).repeat(n))
        ids = self.ids[:, start:].repeat(n, 1)
        return {"input_ids": ids, "past_key_values": cache, "use_cache": True}


def _run_chunk(
    model: Model,
    base: Any,
    chunk: list[tuple[Any, int]],
    site: str,
    values: Mapping[Any, Tensor],
    metric: Metric,
    prefix: _Prefix | None,
) -> Tensor:
    """Run ``len(chunk)`` experiments as one pass; the metric of each.

    With ``prefix``, all experiments patch one position and the pass starts there.
    """
    n = len(chunk)
    start = chunk[0][1] if prefix is not None else 0
    inputs = prefix.inputs(start, n) if start > 0 else _repeat(base, n)
    batch = next(iter(values.values())).shape[0]
    by_site: dict[Any, list[tuple[int, int]]] = {}
    for e, (key, pos) in enumerate(chunk):
        by_site.setdefault(key, []).append((e, pos))
    with trace(model) as t:
        for key, experiments in by_site.items():
            rows = torch.cat([torch.arange(e * batch, (e + 1) * batch) for e, _ in experiments])
            if experiments[0][1] is None:  # every position at once
                _at(t, key, site)[rows] = torch.cat([values[key]] * len(experiments))
                continue
            pos = torch.tensor([p - start for _, p in experiments]).repeat_interleave(batch)
            value = torch.cat([values[key][:, p] for _, p in experiments])
            _at(t, key, site)[rows, pos] = value
    with torch.no_grad():
        logits = logits_of(t.program.run(model, inputs).output)
        if start > 0:  # the positions before the patch, as in the unpatched run
            logits = torch.cat([prefix.logits[:, :start].repeat(n, 1, 1), logits], dim=1)
        return torch.stack([
            torch.as_tensor(metric(logits[e * batch : (e + 1) * batch])).float().cpu()
            for e in range(n)
        ])  # fmt: skip


def _repeat(inputs: Any, n: int) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.repeat(n, *([1] * (inputs.dim() - 1)))
    if isinstance(inputs, Mapping):
        return {k: _repeat(v, n) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    raise TypeError(
        f"activation_patching takes token ids (a tensor [batch, pos]) or a dict of "
        f"tensors, got {type(inputs).__name__}"
    )

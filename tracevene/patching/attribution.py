"""Attribution patching: a gradient-based approximation of activation patching.

Activation patching runs one forward pass per patched cell. Attribution patching
(Nanda 2023; Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit
Discovery") replaces each experiment by its first-order Taylor approximation: the
effect of patching activation ``a`` from the source run into the base run is about
``(a_source - a_base) . dM/da``, the gradient taken on the base run. Every cell of
every site then costs the same: two forward passes and one backward pass in all.

tracevene records one program. At every patched site it writes
``site += alpha * (source_site - site)`` with ``alpha`` a zero tensor (one entry per
position, and per head for head sites) that requires grad: the write changes
nothing, and ``dM/dalpha`` is exactly the attribution of each cell, summed over the
batch and the feature dimensions (DSL spec, section 7).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError, ArgumentTypeError
from ..model import Model, as_model
from ..tracing.tracer import trace
from .activation import DIRECTIONS, Metric, input_shape, paired_inputs
from .outputs import scored
from .result import PatchResult
from .runner import sizes

LAYER_SITES = ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out")
HEAD_SITES = ("z", "q", "k", "v")
SITES = LAYER_SITES + HEAD_SITES


def attribution_patching(
    model: Model | torch.nn.Module,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    *,
    sites: str | Iterable[str] = ("resid_pre", "attn.out", "mlp.out", "z"),
    direction: str = "denoise",
) -> dict[str, PatchResult]:
    """Approximate ``activation_patching`` at every cell at once.

    With ``direction="denoise"`` the attribution of a cell is
    ``(a_clean - a_corrupted) . dM/da``, the gradient taken on the corrupted run; with
    ``"noise"``, ``(a_corrupted - a_clean) . dM/da`` on the clean run. It estimates
    ``activation_patching(...).values - metric(unpatched run)``; it is exact where
    the metric's input (the logits) is linear in the site, and otherwise good for small
    differences between the two runs. All sites cost two forward passes (one on CPU
    schedules as two; on an accelerator both runs share one batched pass) and one
    backward pass; the model's parameters get no gradient.

    Args:
        model: The model (with a site table: a supported Hugging Face family or a
            TransformerLens model).
        clean: Token ids ``[batch, pos]`` of the clean prompts, a dict of tensors
            (``input_ids``, ``attention_mask``), or text (``str`` / ``list[str]``,
            tokenised with padding by the model's tokenizer).
        corrupted: The corrupted prompts, of the same shape and padding.
        metric: ``metric(x) -> scalar`` on the whole batch, differentiable (torch
            operations only). ``x`` is the logits ``[batch, pos, vocab]`` where the
            model has them, otherwise the model's output (for a headless
            ``BertModel`` its ``BaseModelOutputWithPooling...``: read
            ``x.last_hidden_state``), as for ``activation_patching``. Positions are
            the padded batch's (``iv.last_token_positions`` under right padding).
        sites: Per-layer sites ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``,
            ``"attn.out"``, ``"mlp.out"`` (axes ``[layer, pos]``) and per-head sites
            ``"z"``, ``"q"``, ``"k"``, ``"v"`` (axes ``[layer, pos, head]``; ``"k"`` and
            ``"v"`` have the key-value heads).
        direction: ``"denoise"`` or ``"noise"``.

    Returns:
        One ``PatchResult`` per site, keyed by site name, labelled like
        ``activation_patching``'s.

    Raises:
        ArgumentError: An unknown site or direction, inputs of different shapes or
            padding, or a metric that is not a differentiable scalar.
    """
    model = as_model(model)
    names = _check_sites(sites)
    if direction not in DIRECTIONS:
        raise ArgumentError(f"direction={direction!r}: choose 'denoise' or 'noise'")
    n_layers = sizes(model, "attribution_patching").n_layers
    clean, corrupted = paired_inputs(model, clean, corrupted)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    n_pos = _n_pos(base, source)
    with torch.enable_grad():
        alphas = {name: _alphas(model, name, n_pos) for name in names}
        value = _scalar(metric(_run(model, base, source, alphas)))
        grads = torch.autograd.grad(value, [a for per_site in alphas.values() for a in per_site])
    return _results(names, grads, n_layers, direction)


def _check_sites(sites: str | Iterable[str]) -> list[str]:
    """The site names, without duplicates; ``ValueError`` for an unknown one."""
    names = list(dict.fromkeys([sites] if isinstance(sites, str) else sites))
    if not names:
        raise ArgumentError(f"sites is empty: give at least one of {', '.join(SITES)}")
    for name in names:
        if name not in SITES:
            close = difflib.get_close_matches(str(name), SITES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ArgumentError(
                f"unknown site {name!r} for attribution_patching{hint}: valid sites are "
                f"{', '.join(SITES)} (per-layer sites, then per-head sites)"
            )
    return names


def _n_pos(base: Any, source: Any) -> int:
    """The number of positions of the inputs (``paired_inputs`` checked their shapes)."""
    for inputs in (base, source):
        shape = input_shape(inputs)
        if shape is None:
            raise ArgumentTypeError(
                "attribution_patching takes token ids (a tensor [batch, pos]), a dict of "
                "tensors with a [batch, pos, ...] tensor in it, or text (str / list[str], "
                f"with a tokenizer), got {type(inputs).__name__}"
            )
    return shape[1]


def _alphas(model: Model, site: str, n_pos: int) -> list[Tensor]:
    """One zero coefficient tensor per layer: ``[pos, 1]``, or ``[pos, heads, 1]``."""
    n_layers, n_heads, n_kv_heads = sizes(model, "attribution_patching")
    shape: tuple[int, ...] = (n_pos, 1)
    if site in HEAD_SITES:
        shape = (n_pos, n_kv_heads if site in ("k", "v") else n_heads, 1)
    return [torch.zeros(shape, device=model.device, requires_grad=True) for _ in range(n_layers)]


def _run(model: Model, base: Any, source: Any, alphas: Mapping[str, list[Tensor]]) -> Any:
    """One program: base and source runs; every site moved by ``alpha`` towards the source.

    Returns what the metric scores: the base run's logits, or its output if it has none.
    """
    with trace(model) as t:
        src = t.source()
        for site, per_layer in alphas.items():
            name = f"attn.{site}" if site in HEAD_SITES else site
            for layer, alpha in enumerate(per_layer):
                here = t.site(name, layer)
                here += alpha * (src.site(name, layer) - here)
    return scored(t.program.run(model, base, [source]).output)


def _scalar(value: Any) -> Tensor:
    """The metric's value as a differentiable scalar tensor, or a clear error."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ArgumentError(
            f"metric(logits) must return a scalar tensor, got {shape}: reduce it over "
            "the batch (e.g. with .mean())"
        )
    if not value.requires_grad:
        raise ArgumentError(
            "metric(logits) does not depend on the logits through autograd: compute it "
            "from the logits with torch operations (no .item(), .detach(), numpy or "
            "torch.no_grad())"
        )
    return value.reshape(())


def _results(
    names: list[str], grads: tuple[Tensor, ...], n_layers: int, direction: str
) -> dict[str, PatchResult]:
    """Stack the per-layer gradients of each site into a labelled result."""
    out = {}
    for i, name in enumerate(names):
        per_layer = grads[i * n_layers : (i + 1) * n_layers]
        values = torch.stack([g.detach().squeeze(-1) for g in per_layer]).float().cpu()
        axes = ("layer", "pos", "head") if name in HEAD_SITES else ("layer", "pos")
        out[name] = PatchResult(values, axes, name, direction, "attribution patching")
    return out

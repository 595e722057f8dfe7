"""Causal tracing (Meng et al. 2022, ROME): noise chosen tokens, restore clean states.

Three runs of the same prompts: clean; corrupted, with Gaussian noise added to the
embeddings (the ``embed`` site) at chosen positions of each prompt; and restored, the
corrupted run with the clean value of one site put back at one position and one layer
(or a window of layers around it). ``causal_tracing`` gives the metric of every
restoration, layer x position, for each site asked for.

The noise is drawn once (``embedding_noise``) and the same noise is used in the
corrupted run and in every restoration, so that differences between cells are the
restored states' alone. Restorations are stacked experiments (``run_stacked``):
experiment ``e`` of a pass owns rows ``e * batch .. (e + 1) * batch``. In each pass the
noise is written first, then the restores, grouped by (site, layer) in the order the
experiments name them; the grid is layer-major; the corrupted run is a pass of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import ArgumentError, ArgumentTypeError
from ..model import Model, as_model
from ..tracing.tracer import trace
from .activation import Metric
from .outputs import scored
from .result import PatchResult
from .runner import check_per_pass, run_stacked, sizes
from .runner import rows as rows_of

SITES = ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out")
Cell = tuple[str, int, int]  # (site, layer, position) restored from the clean run


@dataclass
class CausalTrace:
    """What ``causal_tracing`` measured.

    Attributes:
        clean: The metric of the clean run.
        corrupted: The metric of the noised run, nothing restored.
        noise: The noise added at the noised positions ``[batch, k, d_model]``.
        results: For each site, the metric of every restoration ``[layer, pos]``.
    """

    clean: float
    corrupted: float
    noise: Float[Tensor, "batch k d_model"]
    results: dict[str, PatchResult]


def causal_tracing(
    model: Model | torch.nn.Module,
    inputs: Int[Tensor, "batch pos"],
    metric: Metric,
    noised: Int[Tensor, "batch k"],
    *,
    sites: Sequence[str] = ("resid_pre", "attn.out", "mlp.out"),
    window: int | Mapping[str, int] = 1,
    noise: Float[Tensor, "batch k d_model"] | None = None,
    noise_scale: float = 3.0,
    seed: int = 0,
    experiments_per_pass: int = 16,
    progress: bool = False,
) -> CausalTrace:
    """ROME's causal trace: the metric with each clean state restored in the noised run.

    Args:
        model: The model (an ``iv.Model`` or a module ``iv.wrap`` accepts).
        inputs: Clean token ids.
        metric: ``metric(logits [batch, pos, vocab]) -> scalar`` on one experiment's rows.
        noised: The positions of each prompt that get the noise.
        sites: Sites restored, each its own grid: ``"resid_pre"``, ``"resid_mid"``,
            ``"resid_post"``, ``"attn.out"``, ``"mlp.out"``.
        window: Layers restored together around each layer (ROME's window): one size
            for every site, or a size per site (sites not named: 1).
        noise: The noise; by default ``embedding_noise(model, inputs, noised, seed,
            noise_scale)``.
        noise_scale: Noise std as a multiple of the clean embeddings' std.
        seed: Seed of the noise.
        experiments_per_pass: How many restorations share one forward pass.
        progress: Show a progress bar.

    Returns:
        The clean and corrupted metrics, the noise, and a ``[layer, pos]`` result per site.

    Raises:
        ArgumentError: An unknown site, a window below 1, noise or positions of the
            wrong shape, or ``experiments_per_pass`` below 1.
    """
    model = as_model(model)
    sizes = _windows(sites, window)
    check_per_pass(experiments_per_pass)
    _check_positions(inputs, noised)
    if noise is None:
        noise = embedding_noise(model, inputs, noised, seed, noise_scale)
    _check_noise(model, noised, noise)
    state = (model, inputs, noised, noise)
    corrupted = float(_restore(state, {}, [[]], metric, 1, progress)[0])
    results = {site: _trace_site(state, site, sizes[site], metric, experiments_per_pass,
                                 progress) for site in sites}  # fmt: skip
    return CausalTrace(_clean_metric(model, inputs, metric), corrupted, noise, results)


def embedding_noise(
    model: Model, inputs: Int[Tensor, "batch pos"], noised: Int[Tensor, "batch k"],
    seed: int, scale: float = 3.0,
) -> Float[Tensor, "batch k d_model"]:  # fmt: skip
    """Gaussian noise for the noised positions, drawn once from ``seed`` (on the CPU).

    Its standard deviation is ``scale`` times that of the clean embeddings (``embed``)
    at the noised positions.
    """
    rows = torch.arange(inputs.shape[0])[:, None]
    with trace(model, inputs) as t:
        embeddings = t.embed[rows, noised].save()
    std = embeddings.value.detach().float().std().item()
    generator = torch.Generator().manual_seed(seed)
    return scale * std * torch.randn((*noised.shape, embeddings.value.shape[-1]),
                                     generator=generator)  # fmt: skip


def _trace_site(state, site: str, size: int, metric, per_pass: int, progress: bool):
    """One site's ``[layer, pos]`` grid of restorations."""
    model, inputs = state[0], state[1]
    n_layers = sizes(model, "causal_tracing").n_layers
    clean = {site: _clean_states(model, inputs, site)}
    values = _restore(state, clean, _grid(site, n_layers, inputs.shape[1], size), metric,
                      per_pass, progress)  # fmt: skip
    name = site if size == 1 else f"{site} (window {size})"
    return PatchResult(values.reshape(n_layers, inputs.shape[1]), ("layer", "pos"), name,
                       "denoise", "causal tracing")  # fmt: skip


def _clean_states(model: Model, inputs: Tensor, site: str) -> list[Tensor]:
    """The clean value of ``site`` in every layer ``[batch, pos, d_model]``, one pass."""
    n_layers = sizes(model, "causal_tracing").n_layers
    with trace(model, inputs) as t:
        saved = [t.site(site, layer).save() for layer in range(n_layers)]
    return [s.value.detach() for s in saved]


def _clean_metric(model: Model, inputs: Tensor, metric: Metric) -> float:
    with trace(model, inputs) as t:
        logits = t.logits.save()
    return metric(logits.value).item()


def _restore(state, clean, experiments, metric, per_pass: int, progress: bool) -> Tensor:
    """The metric of each experiment (a list of cells restored from ``clean``)."""
    batch = state[1].shape[0]
    return run_stacked(experiments, lambda chunk: _run_pass(state, clean, chunk), metric, batch,
                       experiments_per_pass=per_pass, progress=progress,
                       desc="causal tracing")  # fmt: skip


def _run_pass(state, clean, chunk: Sequence[Sequence[Cell]]) -> Any:
    """One forward pass of ``len(chunk)`` experiments: the noise, then the restores."""
    model, inputs, noised, noise = state
    n, count = inputs.shape[0], len(chunk)
    writes: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for e, cells in enumerate(chunk):
        for site, layer, pos in cells:
            writes.setdefault((site, layer), []).append((e, pos))
    with trace(model, inputs.repeat(count, 1)) as t:
        rows = torch.arange(n * count)[:, None]
        t.embed[rows, noised.repeat(count, 1)] += noise.repeat(count, 1, 1)
        for (site, layer), cells in writes.items():  # after the noise: restores win
            r = torch.cat([rows_of(e, n) for e, _ in cells])
            p = torch.tensor([p for _, p in cells]).repeat_interleave(n)
            t.site(site, layer)[r, p] = torch.cat([clean[site][layer][:, p] for _, p in cells])
        logits = t.logits.save()
    return scored(logits.value)


def _window(layer: int, size: int, n_layers: int) -> range:
    """The ``size`` layers around ``layer`` (ROME's window), clipped to the model."""
    return range(max(0, layer - size // 2), min(n_layers, layer - (-size // 2)))


def _grid(site: str, n_layers: int, n_pos: int, size: int = 1) -> list[list[Cell]]:
    """One experiment per (layer, position), layer-major; windows of ``size`` layers."""
    return [[(site, w, pos) for w in _window(layer, size, n_layers)]
            for layer in range(n_layers) for pos in range(n_pos)]  # fmt: skip


# -- arguments ----------------------------------------------------------------------------
def _windows(sites: Sequence[str], window: int | Mapping[str, int]) -> dict[str, int]:
    """The window of each site, checked."""
    for site in sites:
        if site not in SITES:
            raise ArgumentError(
                f"site {site!r} cannot be traced: choose from {', '.join(map(repr, SITES))}"
            )
    sizes = {s: window.get(s, 1) if isinstance(window, Mapping) else window for s in sites}
    for site, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ArgumentError(f"window {size!r} for {site!r}: give an int of at least 1 layer")
    return sizes


def _check_positions(inputs: Any, noised: Any) -> None:
    if not isinstance(inputs, Tensor) or inputs.dim() != 2:
        raise ArgumentTypeError(
            f"causal_tracing takes token ids, a LongTensor [batch, pos]; got "
            f"{type(inputs).__name__}: tokenise the prompts first"
        )
    if not isinstance(noised, Tensor) or noised.dim() != 2 or noised.shape[0] != len(inputs):
        raise ArgumentError(
            f"noised must be a LongTensor [batch, k] = [{len(inputs)}, k] of positions to "
            f"noise; got {getattr(noised, 'shape', type(noised).__name__)}"
        )
    if noised.numel() and not 0 <= int(noised.min()) <= int(noised.max()) < inputs.shape[1]:
        raise ArgumentError(
            f"noised positions must be in 0..{inputs.shape[1] - 1}; got "
            f"{int(noised.min())}..{int(noised.max())}"
        )


def _check_noise(model: Model, noised: Tensor, noise: Any) -> None:
    want = (*noised.shape, model.d_model)
    if not isinstance(noise, Tensor) or tuple(noise.shape) != want:
        raise ArgumentError(
            f"noise must be a tensor of shape {want} ([batch, k, d_model]); got "
            f"{tuple(getattr(noise, 'shape', ()))}: leave noise=None to draw it"
        )

"""Training and evaluating the interventions of a program: ``iv.train`` and ``iv.evaluate``.

A batch is a dict with the base run's inputs under ``"base"``, the sources' under
``"sources"`` (a list, one per ``t.source()``; ``"source"`` for a single one),
counterfactual labels under ``"labels"``, and a value for each placeholder of the
program (``t.arg(name)``) under its name. Any iterable of such dicts works, including
a ``torch.utils.data.DataLoader``.

The default loss and metric read the logits at the last position, which is padding
for the shorter prompts of a right-padded batch: a batch whose base is right-padded
(text tokenised on the right, or an ``attention_mask`` ending in 0) is refused with
them. Pad on the left, or read each prompt's last token in ``loss_fn`` / ``metric_fn``
(``position=iv.last_token_positions(inputs)``, e.g. through a placeholder).
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import metrics
from .errors import ArgumentError, ArgumentTypeError, MissingKeyError
from .ir.program import Program
from .model import Model, as_model
from .result import Result
from .runtime.cache import SourceCache
from .runtime.inputs import last_token_positions, tokenize

LossFn = Callable[[Result, Mapping[str, Any]], Tensor]
MetricFn = Callable[[Result, Mapping[str, Any]], Tensor]
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class History:
    """What ``iv.train`` did.

    Attributes:
        loss: Training loss of every optimizer step (mean over its batches).
        metric: Mean training metric of each epoch (when ``metric_fn`` was given).
        eval: ``iv.evaluate`` on ``eval_data`` after each epoch (when given).
        temperature: Temperature at each optimizer step (annealed interventions only).
    """

    loss: list[float] = field(default_factory=list)
    metric: list[float] = field(default_factory=list)
    eval: list[float] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)


def default_loss(result: Result, batch: Mapping[str, Any]) -> Tensor:
    """Cross-entropy of ``batch["labels"]`` at the last position (the DAS loss).

    ``iv.train`` refuses a right-padded base with it (the last position is padding).
    """
    return metrics.cross_entropy(result, _labels(batch)).mean()


def default_metric(result: Result, batch: Mapping[str, Any]) -> Tensor:
    """Interchange-intervention accuracy against ``batch["labels"]`` at the last position.

    ``iv.train`` and ``iv.evaluate`` refuse a right-padded base with it.
    """
    return metrics.iia(result, _labels(batch))


def train(
    program: Program,
    model: Model | nn.Module,
    data: Iterable[Mapping[str, Any]],
    loss_fn: LossFn | None = None,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: str | Callable[..., torch.optim.Optimizer] = "adam",
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    grad_accum: int = 1,
    max_grad_norm: float | None = None,
    temperature: str | tuple[float, float] | None = "auto",
    metric_fn: MetricFn | None = None,
    eval_data: Iterable[Mapping[str, Any]] | None = None,
    seed: int | None = 0,
    progress: bool = True,
    schedule: str = "auto",
    forward_kwargs: Mapping[str, Any] | None = None,
    cache_sources: bool | None = None,
) -> History:
    """Train the parameters of a program's intervention modules (and nothing else).

    The model's own parameters stay frozen; source runs need no gradients. Runs on
    any backend, and repeats exactly for a given ``seed`` (which seeds Python, NumPy
    and torch, so a shuffling ``DataLoader`` repeats too).

    Args:
        program: A program whose ``call_module`` nodes hold the trainable interventions.
        model: The model (an ``iv.Model``, or a module, wrapped as by ``iv.wrap``).
        data: Batches (dicts, see the module docstring); iterated once per epoch.
        loss_fn: ``loss_fn(result, batch) -> scalar``; default: cross-entropy of
            ``batch["labels"]`` at the last position (left padding only).
        epochs: Passes over ``data``.
        lr: Peak learning rate.
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, or ``f(params, lr=...) -> Optimizer``.
        lr_schedule: ``"constant"``, ``"linear"`` (decay to 0) or ``"cosine"``, after
            ``warmup_steps`` of linear warm-up.
        warmup_steps: Optimizer steps of linear warm-up.
        grad_accum: Batches whose gradients are accumulated per optimizer step (their
            mean loss; a shorter last step of an epoch takes the mean of its own batches).
        max_grad_norm: Clip the gradient norm to this (``None``: no clipping).
        temperature: ``"auto"`` anneals every intervention with a ``temperature``
            buffer along its ``temperature_schedule`` (geometrically, over all steps);
            ``(start, end)`` sets the schedule for all; ``None`` leaves them alone.
        metric_fn: ``metric_fn(result, batch) -> per-example values`` shown in the
            progress bar and averaged per epoch (e.g. ``default_metric``).
        eval_data: Batches evaluated with ``metric_fn`` (default IIA) after each epoch.
        seed: Seed set before training (``None``: leave the random state alone).
        progress: Show a progress bar with the loss (and the metric).
        schedule: How runs are scheduled (see ``iv.Program.run``).
        forward_kwargs: Extra keyword arguments for every forward call. With the
            default loss and metric (which read the last position only), a model whose
            forward takes ``logits_to_keep`` gets ``logits_to_keep=1`` unless the
            program reads or writes ``t.logits``: logits are computed for the last
            position only.
        cache_sources: Keep what clean source passes hand on to the base (e.g. the
            source's activation at the intervened site), keyed by the sources' inputs,
            and skip those passes when the same sources come back in a later epoch.
            Costs the memory of those values for the whole dataset. Default: on when
            ``epochs > 1``.

    Returns:
        The loss of every step, and per-epoch metrics.

    Example:
        ```python
        import torch
        import tracevene as iv

        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        rot = iv.RotatedSpace(4, 1)
        with iv.trace(net) as t:
            src = t.source()
            t.module("0").output = rot(t.module("0").output, src.module("0").output)
        x, y = torch.randn(64, 4), torch.randn(64, 4)
        data = [{"base": x[i:i + 16], "source": y[i:i + 16],
                 "labels": net(y[i:i + 16]).argmax(-1)} for i in range(0, 64, 16)]
        history = iv.train(t.program, net, data, epochs=2, lr=1e-2, progress=False)
        print(len(history.loss), iv.evaluate(t.program, net, data, progress=False))
        ```
    """
    model = as_model(model)
    params = _trainable(program)
    _check_settings(epochs, grad_accum, lr_schedule, optimizer)
    if seed is not None:
        _seed(seed)
    steps = _total_steps(data, epochs, grad_accum)
    opt = _optimizer(optimizer, params, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(lr_schedule, warmup_steps, steps))
    annealed = _annealed(program, temperature, steps)
    history = History()
    cache = SourceCache() if (epochs > 1 if cache_sources is None else cache_sources) else None
    last_only = loss_fn is None and metric_fn in (None, default_metric)
    forward_kwargs = _forward_kwargs(program, model, forward_kwargs, last_only)
    reads_last = loss_fn in (None, default_loss) or metric_fn is default_metric
    run = _runner(program, model, schedule, forward_kwargs, cache, reads_last)
    modes = _set_train_mode(program, True)
    try:
        for epoch in range(epochs):
            _epoch(
                run,
                data,
                loss_fn or default_loss,
                metric_fn,
                params,
                opt,
                sched,
                annealed,
                grad_accum,
                max_grad_norm,
                history,
                progress,
                f"epoch {epoch + 1}/{epochs}",
            )
            if eval_data is not None:
                history.eval.append(
                    evaluate(program, model, eval_data, metric_fn, schedule=schedule,
                             progress=False, forward_kwargs=forward_kwargs))  # fmt: skip
    finally:
        _restore_modes(modes)
    return history


def evaluate(
    program: Program,
    model: Model | nn.Module,
    data: Iterable[Mapping[str, Any]],
    metric_fn: MetricFn | None = None,
    *,
    schedule: str = "auto",
    progress: bool = True,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> float:
    """The mean of ``metric_fn`` over every example of ``data``, without gradients.

    Args:
        program: The program to evaluate.
        model: The model.
        data: Batches (dicts, see the module docstring).
        metric_fn: ``metric_fn(result, batch) -> per-example values`` (or one value
            per batch, weighted by the batch size); default: IIA against
            ``batch["labels"]`` at the last position (left padding only).
        schedule: How runs are scheduled (see ``iv.Program.run``).
        progress: Show a progress bar with the running mean.
        forward_kwargs: Extra keyword arguments for every forward call (with the
            default metric, ``logits_to_keep=1`` is added as in ``iv.train``).

    Raises:
        ArgumentError: ``data`` is empty, or the default metric meets a right-padded
            base (its last position is padding).
    """
    model = as_model(model)
    metric_fn = metric_fn or default_metric
    last_only = metric_fn is default_metric
    kwargs = _forward_kwargs(program, model, forward_kwargs, last_only)
    run = _runner(program, model, schedule, kwargs, reads_last=last_only)
    total, count = 0.0, 0
    modes = _set_train_mode(program, False)
    try:
        with torch.no_grad(), _bar(data, "evaluate", progress) as bar:
            for batch in data:
                value = torch.as_tensor(metric_fn(run(batch), batch)).detach().double()
                n = value.numel() if value.dim() else _batch_size(batch)
                total += value.sum().item() if value.dim() else value.item() * n
                count += n
                bar.update(1)
                bar.set_postfix(metric=f"{total / count:.4f}")
    finally:
        _restore_modes(modes)
    if count == 0:
        raise ArgumentError("evaluate() got no batches: data is empty; pass at least one batch")
    return total / count


# -- one epoch -------------------------------------------------------------------------
def _epoch(run, data, loss_fn, metric_fn, params, opt, sched, annealed, grad_accum,
           max_grad_norm, history, progress, desc) -> None:  # fmt: skip
    metric_sum, metric_n, pending, losses = 0.0, 0, 0, []
    opt.zero_grad(set_to_none=True)
    with _bar(data, desc, progress) as bar:
        for batch in data:
            if pending == 0:  # the first batch of an optimizer step
                _anneal(annealed, len(history.loss), history)
            loss, m = _backward(run, batch, loss_fn, metric_fn, grad_accum)
            losses.append(loss)
            pending += 1
            if m is not None:
                metric_sum, metric_n = metric_sum + m.sum().item(), metric_n + max(m.numel(), 1)
            if pending == grad_accum:
                _step(params, opt, sched, max_grad_norm, history, losses)
                pending, losses = 0, []
            bar.update(1)
            bar.set_postfix(_postfix(history, metric_sum, metric_n))
    if pending:  # a short last step: its gradient is the mean over its own batches
        _scale_grads(params, grad_accum / pending)
        _step(params, opt, sched, max_grad_norm, history, losses)
    if metric_fn is not None and metric_n:
        history.metric.append(metric_sum / metric_n)


def _backward(run, batch, loss_fn, metric_fn, grad_accum) -> tuple[float, Tensor | None]:  # noqa: ANN001
    """Run one batch and accumulate its gradient; return its loss and metric values.

    The result (with the model's output, e.g. full logits) is dropped before the
    backward pass, so the logits and their gradient are never alive together.
    """
    result = run(batch)
    loss = loss_fn(result, batch)
    _check_loss(loss)
    metric = None
    if metric_fn is not None:
        with torch.no_grad():
            metric = torch.as_tensor(metric_fn(result, batch)).double()
    del result  # the output (full logits) need not live through the backward pass
    (loss / grad_accum).backward()
    return loss.item(), metric


def _step(params, opt, sched, max_grad_norm, history, losses) -> None:  # noqa: ANN001
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    history.loss.append(sum(losses) / len(losses))


def _scale_grads(params: list[nn.Parameter], factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


def _bar(data: Any, desc: str, progress: bool) -> tqdm:
    """A progress bar for ``data`` that the caller advances.

    It never iterates ``data`` itself: ``tqdm.auto``'s bar calls ``iter(data)`` on
    construction, which would start a DataLoader (and its workers) twice per epoch.
    """
    try:
        total = len(data)
    except TypeError:
        total = None
    return tqdm(total=total, desc=desc, disable=not progress)


def _postfix(history: History, metric_sum: float, metric_n: int) -> dict[str, str]:
    out = {"loss": f"{history.loss[-1]:.4f}"} if history.loss else {}
    if metric_n:
        out["metric"] = f"{metric_sum / metric_n:.4f}"
    return out


# -- runs ------------------------------------------------------------------------------
def _runner(  # noqa: ANN202
    program: Program,
    model: Model,
    schedule: str,
    forward_kwargs: Any,
    cache: Any = None,
    reads_last: bool = False,
):
    """``batch -> Result`` for this program and model.

    With ``reads_last`` (the default loss or metric, which read position -1) a
    right-padded base is refused.
    """

    def run(batch: Mapping[str, Any]) -> Result:
        base, sources, args = _unpack(program, batch)
        if reads_last:
            if model.tokenizer is not None:
                base = tokenize(model, base)  # once: the run takes the tokenized batch
            _check_last_position(base)
        return program.run(model, base, sources, schedule=schedule, source_cache=cache,
                           forward_kwargs=forward_kwargs, **args)  # fmt: skip

    return run


def _forward_kwargs(
    program: Program, model: Model, forward_kwargs: Mapping[str, Any] | None, last_only: bool
) -> dict[str, Any]:
    """``forward_kwargs``, plus ``logits_to_keep=1`` when only the last logits are read.

    That holds with the default loss and metric on a model whose forward accepts
    ``logits_to_keep`` (Hugging Face causal LMs), if the program itself neither reads
    nor writes the logits: the unembedding then runs on the last position only, in the
    forward and the backward pass.
    """
    kwargs = dict(forward_kwargs or {})
    touches_logits = any(n.op in ("read", "write") and n.target == "logits" for n in program.nodes)
    if not last_only or touches_logits or "logits_to_keep" in kwargs:
        return kwargs
    try:
        accepts = "logits_to_keep" in inspect.signature(model.module.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    return {**kwargs, "logits_to_keep": 1} if accepts else kwargs


def _unpack(program: Program, batch: Any) -> tuple[Any, list[Any], dict[str, Any]]:
    if not isinstance(batch, Mapping) or "base" not in batch:
        raise ArgumentTypeError(
            f"each batch must be a dict with the base inputs under 'base' (and 'sources' "
            f"or 'source', 'labels', placeholders); got {_describe(batch)}"
        )
    if "sources" in batch and "source" in batch:
        raise ArgumentError("a batch has both 'sources' and 'source': use one of them")
    sources = list(batch["sources"]) if "sources" in batch else (
        [batch["source"]] if "source" in batch else [])  # fmt: skip
    missing = [a for a in program.args if a not in batch]
    if missing:
        raise MissingKeyError(
            f"the program needs placeholder(s) {missing}, which the batch lacks (its keys: "
            f"{sorted(batch)}); add them to every batch under those names."
        )
    return batch["base"], sources, {a: batch[a] for a in program.args}


def _check_last_position(inputs: Any) -> None:
    """Refuse a right-padded base: position -1 of its shorter prompts is padding."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    mask = None if mask is None else torch.as_tensor(mask)
    if mask is None or mask.dim() != 2:
        return
    rows = (last_token_positions(mask) != mask.shape[1] - 1).nonzero().flatten().tolist()
    if rows:
        raise ArgumentError(
            f"the default loss and metric read the logits at the last position, but the "
            f"batch's base is right-padded: row(s) {rows} end in padding (attention_mask 0 "
            "at the last position), so position -1 is padding there, not the prompt's last "
            "token. Pad on the left (tokenizer.padding_side = 'left'), or pass loss_fn / "
            "metric_fn that read each prompt's last token, e.g. iv.metrics.cross_entropy("
            "result, batch['labels'], position=batch['last']) with batch['last'] = "
            "iv.last_token_positions(tokenized base)."
        )


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(batch)}"
    return f"a {type(batch).__name__}"


def _labels(batch: Mapping[str, Any]) -> Tensor:
    if "labels" not in batch:
        raise MissingKeyError(
            f"the default loss and metric compare with batch['labels'], which this batch "
            f"lacks (keys: {sorted(batch)}); add labels or pass loss_fn / metric_fn."
        )
    return torch.as_tensor(batch["labels"])


def _batch_size(batch: Mapping[str, Any]) -> int:
    base = batch["base"]
    if isinstance(base, Mapping):
        base = next((v for v in base.values() if isinstance(v, Tensor)), None)
    return base.shape[0] if isinstance(base, Tensor) and base.dim() else 1


# -- settings --------------------------------------------------------------------------
def _trainable(program: Program) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in program.modules.values():
        for p in module.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    if not seen:
        raise ArgumentError(
            "this program has no trainable parameters: call a trainable intervention "
            "(e.g. iv.RotatedSpace(d, k)) on traced values inside the trace block."
        )
    return list(seen.values())


def _check_settings(epochs: int, grad_accum: int, lr_schedule: str, optimizer: Any) -> None:
    if epochs < 1 or grad_accum < 1:
        raise ArgumentError(f"epochs={epochs} and grad_accum={grad_accum} must be at least 1")
    if lr_schedule not in LR_SCHEDULES:
        raise ArgumentError(f"lr_schedule={lr_schedule!r}: choose one of {LR_SCHEDULES}")
    if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
        raise ArgumentError(
            f"optimizer={optimizer!r}: choose one of {tuple(OPTIMIZERS)}, or pass a "
            "function params -> torch.optim.Optimizer"
        )


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _total_steps(data: Any, epochs: int, grad_accum: int) -> int | None:
    if isinstance(data, Iterator):  # not iter(data) is data: that starts a DataLoader's workers
        if epochs > 1:
            raise ArgumentTypeError(
                "data is a one-shot iterator, but training runs more than one epoch: pass "
                "a list, a Dataset-backed DataLoader, or any re-iterable collection."
            )
        return None
    try:
        return epochs * math.ceil(len(data) / grad_accum)  # type: ignore[arg-type]
    except TypeError:
        return None


def _optimizer(optimizer: Any, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    make = OPTIMIZERS[optimizer] if isinstance(optimizer, str) else optimizer
    return make(params, lr=lr)


def _lr_factor(kind: str, warmup: int, steps: int | None) -> Callable[[int], float]:
    if kind != "constant" and steps is None:
        raise ArgumentTypeError(
            f"lr_schedule={kind!r} needs the number of steps, but data has no len(): pass "
            "a list or a DataLoader, or use lr_schedule='constant'."
        )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = min(1.0, (step - warmup) / max(1, (steps or 1) - warmup))
        if kind == "linear":
            return 1.0 - frac
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    return factor


def _annealed(
    program: Program, temperature: Any, steps: int | None
) -> list[tuple[nn.Module, float, float, int]]:
    """``(module, start, end, steps)`` for each intervention whose temperature is annealed."""
    if temperature is None:
        return []
    if temperature != "auto" and not (isinstance(temperature, tuple) and len(temperature) == 2):
        raise ArgumentError(f"temperature={temperature!r}: use 'auto', (start, end) or None")
    out = []
    for module in {id(m): m for m in program.modules.values()}.values():
        schedule = getattr(module, "temperature_schedule", None)
        if not callable(getattr(module, "set_temperature", None)) or schedule is None:
            continue
        start, end = schedule if temperature == "auto" else temperature
        if steps is None:
            raise ArgumentTypeError(
                f"annealing the temperature of {type(module).__name__} needs the number of "
                "steps, but data has no len(): pass a list or a DataLoader, or "
                "temperature=None to keep the temperature fixed."
            )
        out.append((module, float(start), float(end), steps))
    return out


def _anneal(annealed: list, step: int, history: History) -> None:
    for module, start, end, steps in annealed:
        frac = min(1.0, step / max(1, steps - 1))
        module.set_temperature(start * (end / start) ** frac)
    if annealed:
        history.temperature.append(float(annealed[0][0].temperature))


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ArgumentError(f"loss_fn must return a scalar tensor, got {shape}; take .mean()")
    if not loss.requires_grad:
        raise ArgumentError(
            "the loss does not depend on any trainable intervention: make sure the "
            "program writes an intervention's output into the model, and that loss_fn "
            "reads the result (result.output or a save) rather than a detached value."
        )


def _set_train_mode(program: Program, mode: bool) -> list[tuple[nn.Module, bool]]:
    modules = {id(m): m for m in program.modules.values()}.values()
    old = [(m, m.training) for m in modules]
    for m in modules:
        m.train(mode)
    return old


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, mode in modes:
        m.train(mode)

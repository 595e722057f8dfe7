"""Choosing the next token in ``iv.generate``: greedy, or sampled.

Sampling follows transformers' default logits-processor order, step for step: the
last position's logits in float32, divided by ``temperature``; then top-k (every
logit below the k-th largest set to ``-inf``, ties with it kept); then top-p (the
smallest set of most likely tokens whose probability reaches ``top_p``, computed as
transformers' ``TopPLogitsWarper`` does, the most likely token always kept); then
``softmax`` and one ``torch.multinomial`` draw per row with the generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import ArgumentError, ArgumentTypeError

__all__ = ["Sampler", "sampler"]


@dataclass(frozen=True)
class Sampler:
    """How to pick the next token from logits ``[batch, vocab]``.

    Attributes:
        sample: False for greedy decoding (argmax), True to sample.
        temperature: Divides the logits before sampling (> 0).
        top_k: Keep the ``top_k`` most likely tokens, or ``None`` for all.
        top_p: Keep the most likely tokens whose probability reaches ``top_p``
            (``1.0`` keeps all).
        generator: The random generator of the draws; ``None`` uses torch's global one.
    """

    sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        """The next token of every row, ``[batch]``, from the logits ``[batch, vocab]``."""
        if not self.sample:
            return logits.argmax(-1)
        scores = logits.to(dtype=torch.float32, copy=True) / self.temperature
        if self.top_k is not None:
            scores = top_k_filter(scores, self.top_k)
        if self.top_p < 1.0:
            scores = top_p_filter(scores, self.top_p)
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)


def top_k_filter(scores: Tensor, k: int) -> Tensor:
    """``scores`` with every value below the row's k-th largest set to ``-inf``."""
    kth = torch.topk(scores, min(k, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill(scores < kth, -math.inf)


def top_p_filter(scores: Tensor, p: float) -> Tensor:
    """``scores`` with the least likely tokens outside the top-``p`` mass set to ``-inf``."""
    ordered, order = torch.sort(scores, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p)
    drop[..., -1:] = False  # the most likely token always stays
    return scores.masked_fill(drop.scatter(1, order, drop), -math.inf)


def sampler(
    do_sample: bool,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    generator: torch.Generator | None,
    device: torch.device,
) -> Sampler:
    """The validated sampler of ``iv.generate``'s arguments (see its docstring)."""
    if not isinstance(do_sample, bool):
        raise ArgumentTypeError(f"do_sample={do_sample!r}: pass True (sample) or False (greedy).")
    given = {
        name: value
        for name, value in [
            ("temperature", temperature),
            ("top_k", top_k),
            ("top_p", top_p),
            ("seed", seed),
            ("generator", generator),
        ]
        if value is not None
    }
    if not do_sample:
        if given:
            raise ArgumentError(
                f"{', '.join(f'{k}={v!r}' for k, v in given.items())}: sampling arguments, "
                "but do_sample=False decodes greedily: pass do_sample=True, or drop them."
            )
        return Sampler()
    return Sampler(
        sample=True,
        temperature=_temperature(temperature),
        top_k=_top_k(top_k),
        top_p=_top_p(top_p),
        generator=_generator(seed, generator, device),
    )


def _temperature(value: Any) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(
            f"temperature={value!r}: pass a float > 0 (1.0 leaves logits as they are)."
        )
    if not (value > 0 and math.isfinite(value)):
        raise ArgumentError(
            f"temperature={value!r}: must be a finite float > 0 (below 1 sharpens, above 1 "
            "flattens the distribution). For greedy decoding pass do_sample=False."
        )
    return float(value)


def _top_k(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"top_k={value!r}: pass an int >= 1, or None to keep every token.")
    if value < 1:
        raise ArgumentError(
            f"top_k={value!r}: must be an int >= 1 (the number of most likely tokens kept), "
            "or None to keep every token."
        )
    return value


def _top_p(value: Any) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"top_p={value!r}: pass a float in (0, 1] (1.0 keeps every token).")
    if not 0 < value <= 1:
        raise ArgumentError(
            f"top_p={value!r}: must lie in (0, 1], the probability mass of the most likely "
            "tokens kept (1.0 keeps every token)."
        )
    return float(value)


def _generator(seed: Any, generator: Any, device: torch.device) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ArgumentError(
            "pass seed= or generator=, not both: a seed builds a fresh generator, "
            "torch.Generator(device).manual_seed(seed)."
        )
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ArgumentTypeError(
                f"seed={seed!r}: pass an int, or a torch.Generator as generator=."
            )
        return torch.Generator(device=device).manual_seed(seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(
            f"generator={generator!r}: pass a torch.Generator, or an int seed as seed=."
        )
    if generator is not None and generator.device.type != torch.device(device).type:
        raise ArgumentError(
            f"generator is on {generator.device} but the model's logits are on {device}: "
            f"build it there, torch.Generator(device={str(device)!r})."
        )
    return generator

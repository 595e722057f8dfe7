"""What the benchmark scripts share: the machine report, the model, the programs.

Imported by ``overhead.py`` and ``backends.py`` (run as scripts from a checkout).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import tracevene as iv  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()
EPS32 = torch.finfo(torch.float32).eps


def err_ulps(got: torch.Tensor, want: torch.Tensor, scale: float | None = None) -> float:
    """Largest ``|got - want|`` in float32 ulps of ``scale`` (default: the largest ``|want|``).

    The unit tests/numerics.py judges comparisons in: variants that compute the same
    thing through other kernels differ by a few ulps at the magnitudes involved.
    """
    want = torch.as_tensor(want).detach().double()
    got = torch.as_tensor(got).detach().double()
    if scale is None:
        scale = want.abs().max().item()
    return (got - want).abs().max().item() / (EPS32 * max(scale, torch.finfo().tiny))


FULL = dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, batch=8, seq=32)
QUICK = dict(n_layer=4, n_embd=64, n_head=4, vocab=1000, batch=2, seq=8)


# -- the machine ---------------------------------------------------------------------
def machine(packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """What the figures were measured on (plus the versions of ``packages``)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "default_threads": torch.get_num_threads() == DEFAULT_THREADS,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(load) if load else None,
        **{name: _version(name) for name in packages},
    }


def _version(name: str) -> str:
    try:
        return version(name.replace("_", "-"))
    except PackageNotFoundError:
        return "not installed"


# -- the model and the programs ------------------------------------------------------
def build_model(size: dict[str, int], device: str = "cpu") -> nn.Module:
    """A random GPT-2 in eval mode, float32 (seeded)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=size["n_layer"], n_embd=size["n_embd"], n_head=size["n_head"],
        vocab_size=size["vocab"], n_positions=max(1024, size["seq"]),
        bos_token_id=size["vocab"] - 1, eos_token_id=size["vocab"] - 1,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval().to(device=device, dtype=torch.float32)


def record_save_only(model: iv.Model, layer: int) -> iv.Program:
    """Save the residual stream after ``layer`` and the logits."""
    with iv.trace(model) as t:
        t.layer[layer].resid_post.save("resid")
        t.logits.save("logits")
    return t.program


def record_interchange(model: iv.Model, layer: int) -> iv.Program:
    """Base's residual stream after ``layer`` replaced by the source's (all positions)."""
    with iv.trace(model) as t:
        src = t.source()
        t.layer[layer].resid_post = src.layer[layer].resid_post
        t.logits.save("logits")
    return t.program


def first(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def with_first(output: Any, new: torch.Tensor) -> Any:
    return new if isinstance(output, torch.Tensor) else (new, *output[1:])


# -- timing ----------------------------------------------------------------------------
CLOCKS = ("wall", "cpu")  # time.perf_counter, time.process_time (all threads of this process)


def timer(device: str) -> Callable[[Callable[[], Any]], tuple[float, float]]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn: Callable[[], Any]) -> tuple[float, float]:
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu

    return timed


def interleaved(
    variants: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each variant, by clock; the order rotates every repeat."""
    timed = timer(device)
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names} for c in CLOCKS}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            for clock, seconds in zip(CLOCKS, timed(variants[name]), strict=True):
                samples[clock][name].append(seconds)
    return samples

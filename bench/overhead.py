"""Overhead of tracevene's torch backend against plain PyTorch, in one run.

Measures, on a randomly initialised GPT-2 (12 layers, d_model 768, 12 heads,
vocab 50257; eval mode, float32) at batch 8 x 32 tokens:

* ``plain forward``: ``model(input_ids=ids, use_cache=False)`` under ``torch.no_grad()``
  (the same forward call tracevene makes), the unit every ratio is given in;
* ``save-only program``: a recorded program that saves ``t.layer[6].resid_post`` and
  ``t.logits``, run with ``program.run(model, base)``; target: at most 5% slower
  than the plain forward;
* ``interchange, by hand``: the peer, written with plain forward hooks: a full
  forward on the source whose hook on block 6 keeps its output, then a full
  forward on the base whose hook on block 6 returns the kept tensor;
* ``interchange program``: the same intervention recorded as a program
  (``t.layer[6].resid_post = src.layer[6].resid_post``, logits saved), run with
  ``program.run(model, base, [source])`` (schedule ``"auto"``: on CPU the source runs
  first and stops after layer 6); target: at least 1.25x faster than by hand;
* ``interchange program, batched``: the same with ``schedule="batched"`` (base and
  source in one forward of twice the batch), for information only;
* ``record program``: the with-block without inputs plus ``t.program``.

The variants are interleaved (their order rotates every repeat, so slow drift of the
machine hits them all alike), after warm-up runs; times are medians over the
repeats and ratios are medians over the repeats of the ratio within a repeat, of
wall-clock time (``time.perf_counter``) and of this process's CPU time
(``time.process_time``, all threads). CPU time is much less disturbed by other
processes on a busy machine; with one torch thread (``--threads 1``) it is
nearly immune to them. On CUDA only the wall-clock figures mean anything.

Every variant runs without autograd: the peers under ``torch.no_grad()``,
tracevene by itself (it disables autograd when no trainable module is involved).

Usage::

    python bench/overhead.py              # the full benchmark (a few minutes on CPU)
    python bench/overhead.py --quick      # smoke run: tiny model, 2 repeats
    python bench/overhead.py --json out.json

The exit status is 0 unless ``--strict`` is given and a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch  # noqa: E402
from common import (
    CLOCKS,
    FULL,
    QUICK,
    build_model,
    err_ulps,
    first,
    interleaved,
    iv,
    machine,
    record_interchange,
    record_save_only,
    timer,
    with_first,
)
from torch import nn  # noqa: E402

SAVE_MAX_RATIO = 1.05  # save-only program: at most 5% slower than a plain forward
INTERCHANGE_MIN_SPEEDUP = 1.25  # interchange program vs the same by hand


def interchange_by_hand(
    hf: nn.Module, block: nn.Module, base: torch.Tensor, source: torch.Tensor
) -> torch.Tensor:
    """The peer: two full forwards with plain forward hooks (no tracevene)."""
    kept: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        kept.append(first(output))

    def replace(module: nn.Module, args: Any, output: Any) -> Any:
        return with_first(output, kept[0])

    with torch.no_grad():
        handle = block.register_forward_hook(keep)
        try:
            hf(input_ids=source, use_cache=False)
        finally:
            handle.remove()
        handle = block.register_forward_hook(replace)
        try:
            return hf(input_ids=base, use_cache=False).logits
        finally:
            handle.remove()


# -- timing --------------------------------------------------------------------------
def check_outputs(
    plain: torch.Tensor, save_only: Any, by_hand: torch.Tensor, program: torch.Tensor,
    batched: torch.Tensor, resid: torch.Tensor,
) -> dict[str, float]:  # fmt: skip
    """Largest differences between what the variants compute, in float32 ulps of the
    reference's magnitude (sanity check)."""
    diff = err_ulps

    return {
        "save_only_logits_vs_plain": diff(save_only["logits"], plain),
        "save_only_resid_vs_hook": diff(save_only["resid"], resid),
        "interchange_program_vs_by_hand": diff(program, by_hand),
        "interchange_batched_vs_by_hand": diff(batched, by_hand),
    }


# -- the benchmark -------------------------------------------------------------------
def run(quick: bool, repeats: int, warmup: int, record_repeats: int, device: str) -> dict:
    """Measure everything; returns the figures (as written by ``--json``)."""
    size = QUICK if quick else FULL
    layer = size["n_layer"] // 2
    info = machine()
    hf = build_model(size, device)
    model = iv.wrap(hf, backend="torch")
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen)
    source = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen)
    base, source = base.to(device), source.to(device)
    block = hf.transformer.h[layer]  # t.layer[layer].resid_post is this block's output

    save_only = record_save_only(model, layer)
    interchange = record_interchange(model, layer)

    def plain() -> Any:
        with torch.no_grad():
            return hf(input_ids=base, use_cache=False)

    variants: dict[str, Callable[[], Any]] = {
        PLAIN: plain,
        SAVE: lambda: save_only.run(model, base),
        BY_HAND: lambda: interchange_by_hand(hf, block, base, source),
        AUTO: lambda: interchange.run(model, base, [source]),
        BATCHED: lambda: interchange.run(model, base, [source], schedule="batched"),
    }

    # Sanity: the variants compute the same numbers (and tell us the plans).
    kept: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda m, a, o: kept.append(first(o)))
    try:
        plain_logits = plain().logits
    finally:
        handle.remove()
    auto = interchange.run(model, base, [source])
    batched = interchange.run(model, base, [source], schedule="batched")
    diffs = check_outputs(
        plain_logits, save_only.run(model, base), interchange_by_hand(hf, block, base, source),
        auto["logits"], batched["logits"], kept[0],
    )  # fmt: skip

    samples = interleaved(variants, repeats, warmup, device)
    timed = timer(device)
    for _ in range(record_repeats):
        for clock, seconds in zip(
            CLOCKS, timed(lambda: record_interchange(model, layer)), strict=True
        ):
            samples[clock].setdefault(RECORD, []).append(seconds)

    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "config": {
            **size,
            "layer": layer,
            "device": device,
            "dtype": "float32",
            "attn_implementation": hf.config._attn_implementation,
            "repeats": repeats,
            "warmup": warmup,
            "record_repeats": record_repeats,
            "quick": quick,
        },
        "machine": info,
        "plans": {
            SAVE: save_only.run(model, base).plan.describe(),
            AUTO: auto.plan.describe(),
            BATCHED: batched.plan.describe(),
        },
        "max_err_ulps": diffs,
        **{clock: summarise(samples[clock]) for clock in CLOCKS},
    }


RECORD = "record program (interchange)"
PLAIN, SAVE, BY_HAND = "plain forward", "save-only program", "interchange, by hand (2 forwards)"
AUTO, BATCHED = "interchange program (auto)", "interchange program (batched)"


def summarise(samples: dict[str, list[float]]) -> dict[str, Any]:
    """Medians, ratios and the targets for one clock.

    Ratios are medians over the repeats of the ratio within one repeat (``variant_i /
    plain_i``): a machine whose speed changes from one repeat to the next (other
    processes, frequency) moves both sides of a ratio alike, so these are far steadier
    than a ratio of two medians (also given, as ``ratio_of_medians``).
    """
    med = {k: statistics.median(v) for k, v in samples.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))

    ratio = {k: paired(k, PLAIN) for k in samples if k != RECORD}
    ratio[RECORD] = med[RECORD] / med[PLAIN]
    save_ratio = ratio[SAVE]
    speedup = paired(BY_HAND, AUTO)
    return {
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "ratio_vs_plain": ratio,
        "ratio_of_medians": {k: v / med[PLAIN] for k, v in med.items()},
        "min_ms": {k: min(v) * 1e3 for k, v in samples.items()},
        "samples_ms": {k: [x * 1e3 for x in v] for k, v in samples.items()},
        "targets": {
            "save_only_max_ratio": SAVE_MAX_RATIO,
            "save_only_ratio": save_ratio,
            "save_only_pass": save_ratio <= SAVE_MAX_RATIO,
            "interchange_min_speedup_vs_by_hand": INTERCHANGE_MIN_SPEEDUP,
            "interchange_speedup_vs_by_hand": speedup,
            "interchange_pass": speedup >= INTERCHANGE_MIN_SPEEDUP,
            "interchange_batched_speedup_vs_by_hand": paired(BY_HAND, BATCHED),
        },
    }


def table(fig: dict) -> str:
    """The figures as a Markdown table (also printed): wall-clock and CPU-time medians."""
    ok = {True: "PASS", False: "FAIL"}

    def results(name: str, clock: str) -> str:
        tg = fig[clock]["targets"]
        if name == SAVE:
            return f"{(tg['save_only_ratio'] - 1) * 100:+.1f}% {ok[tg['save_only_pass']]}"
        if name == AUTO:
            speedup = tg["interchange_speedup_vs_by_hand"]
            return f"{speedup:.2f}x faster {ok[tg['interchange_pass']]}"
        if name == BATCHED:
            return f"{tg['interchange_batched_speedup_vs_by_hand']:.2f}x faster"
        return ""

    targets = {
        SAVE: f"<= {SAVE_MAX_RATIO:.2f}x plain",
        AUTO: f">= {INTERCHANGE_MIN_SPEEDUP:.2f}x faster than by hand",
        BATCHED: "(information)",
        RECORD: "(information)",
    }
    lines = [
        "| variant | wall ms | x plain | CPU ms | x plain | target | wall: result | CPU: result |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for name in (PLAIN, SAVE, BY_HAND, AUTO, BATCHED, RECORD):
        cells = [name]
        for clock in CLOCKS:
            cells += [
                f"{fig[clock]['median_ms'][name]:.2f}",
                f"{fig[clock]['ratio_vs_plain'][name]:.3f}",
            ]
        cells += [targets.get(name, ""), results(name, "wall"), results(name, "cpu")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(fig: dict) -> str:
    """Everything a reader needs: the machine, the setup, the table."""
    m, c = fig["machine"], fig["config"]
    load = lambda x: ", ".join(f"{v:.2f}" for v in x) if x else "n/a"  # noqa: E731
    head = [
        f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs), torch {m['torch']} "
        f"({m['torch_threads']} threads{', the default' * m['default_threads']}), "
        f"transformers {m['transformers']}, Python {m['python']}",
        f"load average: {load(m['load_average_at_start'])} at start, "
        f"{load(m['load_average_at_end'])} at end",
        f"model: random GPT-2, {c['n_layer']} layers, d_model {c['n_embd']}, {c['n_head']} "
        f"heads, vocab {c['vocab']}, {c['dtype']}, attention {c['attn_implementation']}, "
        f"on {c['device']}; batch {c['batch']} x {c['seq']} tokens; site layer[{c['layer']}]",
        f"timing: {c['warmup']} warm-up round(s), median of {c['repeats']} interleaved "
        f"repeats ({c['record_repeats']} for recording); wall = time.perf_counter, "
        "CPU = time.process_time (all threads of this process); 'x plain' and the "
        "results are medians of per-repeat ratios" + ("  [QUICK SMOKE RUN]" * c["quick"]),
        "plans: " + "; ".join(f"{k}: {v.replace(chr(10), ', ')}" for k, v in fig["plans"].items()),
        "max difference between variants, in float32 ulps of the reference's magnitude: "
        + ", ".join(f"{k} {v:.2g}" for k, v in fig["max_err_ulps"].items()),
        "",
        table(fig),
    ]
    return "\n".join(head)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 repeats (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="write the figures to PATH")
    parser.add_argument("--repeats", type=int, help="timed repeats per variant (default 15)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 2)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads(N) (default: torch's default)"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    fig = run(args.quick, repeats, warmup, 5 if args.quick else 100, args.device)
    print(report(fig))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    tg = fig["wall"]["targets"]
    missed = not (tg["save_only_pass"] and tg["interchange_pass"])
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())

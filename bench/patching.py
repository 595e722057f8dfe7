"""Activation patching sweep: tracevene against TransformerLens's own helper.

The same full layer x position sweep of ``resid_pre`` (denoising: each cell of the
corrupted run replaced by the clean run's value, one cell per experiment) with
``iv.patching.activation_patching`` and with TransformerLens's
``patching.get_act_patch_resid_pre`` on a TransformerBridge over the same random
GPT-2, in one run; medians of interleaved repeats and their paired ratio.

Run from a checkout: ``python bench/patching.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings

from common import FULL, QUICK, build_model, err_ulps, interleaved, iv, machine, torch

TARGET = 5.0  # issue 5: at least 5x faster than TransformerLens's helper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 repeat (smoke run)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--repeats", type=int, help="timed repeats (default 3; quick: 1)")
    parser.add_argument("--seq", type=int, help="tokens per prompt (default 16)")
    args = parser.parse_args()
    size = dict(QUICK if args.quick else FULL, batch=1, seq=args.seq or (8 if args.quick else 16))
    repeats = args.repeats or (1 if args.quick else 3)
    warnings.simplefilter("ignore")
    from transformer_lens import patching

    hf = build_model(size)
    model = iv.wrap(hf, backend="torch")
    bridge = iv.wrap(hf, backend="transformer_lens").module
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=g)
    corrupted = clean.clone()
    corrupted[:, size["seq"] // 4] = (corrupted[:, size["seq"] // 4] + 1) % size["vocab"]
    answer, other = 5, 7

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, answer] - logits[:, -1, other]).mean()

    _, cache = bridge.run_with_cache(clean)
    results: dict[str, torch.Tensor] = {}

    def ours() -> None:
        results["tracevene"] = iv.patching.activation_patching(
            model, clean, corrupted, metric, progress=False
        ).values

    def theirs() -> None:
        with torch.no_grad():
            results["transformer_lens"] = patching.get_act_patch_resid_pre(
                bridge, corrupted, cache, metric
            ).float()

    variants = {"tracevene": ours, "transformer_lens": theirs}
    samples = interleaved(variants, repeats, 0 if args.quick else 1, "cpu")
    with torch.no_grad():  # the metric is a difference of logits: it rounds at their size
        results["logit_magnitude"] = hf(clean).logits.abs().max().item()
    report(size, samples, results, args.json, args.quick)


def report(size: dict, samples: dict, results: dict, path: str | None, quick: bool) -> None:
    """Print the machine, the table and the check; write the JSON."""
    info = machine(("transformer_lens",))
    diff = (results["tracevene"] - results["transformer_lens"]).abs().max().item()
    ulps = err_ulps(results["tracevene"], results["transformer_lens"], results["logit_magnitude"])
    figures = {"machine": info, "config": {**size, "quick": quick}}
    print(f"machine: {info['cpu']}, torch {info['torch']} ({info['torch_threads']} threads), "
          f"transformer_lens {info['transformer_lens']}; "
          f"load average {info['load_average_at_start']}")  # fmt: skip
    print(f"model: random GPT-2, {size['n_layer']} layers, d {size['n_embd']}, vocab "
          f"{size['vocab']}; prompt {size['batch']} x {size['seq']}; sweep resid_pre, "
          f"{size['n_layer'] * size['seq']} cells")  # fmt: skip
    print(
        f"same numbers: largest |difference| {diff:.1e} ({ulps:.2g} float32 ulps of the logits)\n"
    )
    print("| variant | wall s | CPU s | x TransformerLens (wall) | x TransformerLens (CPU) |")
    print("|---|---:|---:|---:|---:|")
    for clock in ("wall", "cpu"):
        s = samples[clock]
        figures[clock] = {
            "median_s": {k: statistics.median(v) for k, v in s.items()},
            "speedup": statistics.median(
                t / o for o, t in zip(s["tracevene"], s["transformer_lens"], strict=True)
            ),
        }
    for name in ("tracevene", "transformer_lens"):
        w, c = figures["wall"]["median_s"][name], figures["cpu"]["median_s"][name]
        ratio = (f"{figures['wall']['speedup']:.2f}", f"{figures['cpu']['speedup']:.2f}")
        cells = ratio if name == "tracevene" else ("1.00", "1.00")
        print(f"| {name} | {w:.2f} | {c:.2f} | {cells[0]} | {cells[1]} |")
    ok = figures["wall"]["speedup"] >= TARGET
    print(f"\ntarget: >= {TARGET}x TransformerLens's helper (wall): {'PASS' if ok else 'FAIL'}")
    figures["max_abs_diff"] = diff
    figures["max_err_ulps"] = ulps
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()

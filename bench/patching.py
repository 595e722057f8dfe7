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
from typing import Any

from common import FULL, QUICK, build_model, err_ulps, interleaved, iv, machine, torch

#: issue 12: the resid_pre sweep at least 10x faster than TransformerLens's helper, the
#: head sweep (every position at once) at least 5x
SWEEPS = {
    "resid_pre": (dict(site="resid_pre"), "get_act_patch_resid_pre", 10.0),
    "head_out_all_pos": (dict(site="z", heads=True, positions="all"),
                         "get_act_patch_attn_head_out_all_pos", 5.0),
}  # fmt: skip


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

    def ours(sweep: str) -> Any:
        def run() -> None:
            results[f"tracevene {sweep}"] = iv.patching.activation_patching(
                model, clean, corrupted, metric, progress=False, **SWEEPS[sweep][0]
            ).values

        return run

    def theirs(sweep: str) -> Any:
        def run() -> None:
            with torch.no_grad():
                helper = getattr(patching, SWEEPS[sweep][1])
                results[f"transformer_lens {sweep}"] = helper(bridge, corrupted, cache,
                                                              metric).float()  # fmt: skip

        return run

    variants = {f"{who} {sweep}": make(sweep) for sweep in SWEEPS
                for who, make in (("tracevene", ours), ("transformer_lens", theirs))}  # fmt: skip
    samples = interleaved(variants, repeats, 0 if args.quick else 1, "cpu")
    with torch.no_grad():  # the metric is a difference of logits: it rounds at their size
        results["logit_magnitude"] = hf(clean).logits.abs().max().item()
    report(size, samples, results, args.json, args.quick)


def report(size: dict, samples: dict, results: dict, path: str | None, quick: bool) -> None:
    """Print the machine, the table and the checks; write the JSON."""
    info = machine(("transformer_lens",))
    figures: dict[str, Any] = {"machine": info, "config": {**size, "quick": quick}}
    print(f"machine: {info['cpu']}, torch {info['torch']} ({info['torch_threads']} threads), "
          f"transformer_lens {info['transformer_lens']}; "
          f"load average {info['load_average_at_start']}")  # fmt: skip
    print(f"model: random GPT-2, {size['n_layer']} layers, d {size['n_embd']}, vocab "
          f"{size['vocab']}; prompt {size['batch']} x {size['seq']}\n")  # fmt: skip
    print("| sweep | variant | wall s | CPU s | x TransformerLens (wall) | x TransformerLens (CPU) "
          "| largest difference |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for sweep, (_, helper, target) in SWEEPS.items():
        a, b = results[f"tracevene {sweep}"], results[f"transformer_lens {sweep}"]
        fig = {"helper": helper, "target": target,
               "max_abs_diff": (a - b).abs().max().item(),
               "max_err_ulps": err_ulps(a, b, results["logit_magnitude"])}  # fmt: skip
        for clock in ("wall", "cpu"):
            s = samples[clock]
            ours, theirs = s[f"tracevene {sweep}"], s[f"transformer_lens {sweep}"]
            ratios = [t / o for o, t in zip(ours, theirs, strict=True)]
            fig[clock] = {"median_s": {"tracevene": statistics.median(ours),
                                       "transformer_lens": statistics.median(theirs)},
                          "speedup": statistics.median(ratios)}  # fmt: skip
        figures[sweep] = fig
        for name in ("tracevene", "transformer_lens"):
            w, c = fig["wall"]["median_s"][name], fig["cpu"]["median_s"][name]
            ratio = (f"{fig['wall']['speedup']:.2f}", f"{fig['cpu']['speedup']:.2f}")
            cells = ratio if name == "tracevene" else ("1.00", "1.00")
            diff = f"{fig['max_abs_diff']:.1e}" if name == "tracevene" else ""
            print(f"| {sweep} | {name} | {w:.2f} | {c:.2f} | {cells[0]} | {cells[1]} | {diff} |")
    print()
    for sweep, fig in ((k, figures[k]) for k in SWEEPS):
        ok = fig["wall"]["speedup"] >= fig["target"]
        print(f"target {sweep}: >= {fig['target']}x TransformerLens's {fig['helper']} (wall): "
              f"{'PASS' if ok else 'FAIL'}; same numbers: {fig['max_err_ulps']:.2g} float32 ulps "
              f"of the logits")  # fmt: skip
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()

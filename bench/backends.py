"""tracevene on each backend against the same intervention written by hand, and pyvene.

Measures, in one run, on a randomly initialised GPT-2 (12 layers, d_model 768, 12 heads,
vocab 50257; eval mode, float32, CPU) at batch 8 x 32 tokens, for each backend
(``torch``, ``nnsight``, ``transformer_lens``):

* ``save-only``: a recorded program that saves ``t.layer[6].resid_post`` and
  ``t.logits``, run with ``program.run(model, base)``, against the same two reads
  written directly in the engine: plain forward hooks (torch), one ``nnsight.NNsight``
  trace saving ``transformer.h[6].output`` and ``output.logits`` (nnsight), one
  ``bridge.run_with_hooks`` with a forward hook on ``blocks.6.hook_resid_post``
  (TransformerLens);
* ``interchange``: a recorded program ``t.layer[6].resid_post = src.layer[6].resid_post``
  (all positions, logits saved), run with ``program.run(model, base, [source])`` (schedule
  ``"auto"``: on CPU the source pass runs first and stops after layer 6), against the
  same written by hand in the engine the way tracevene schedules it: a source run that
  keeps block 6's output and stops there (torch: the hook raises; nnsight:
  ``tracer.stop()``; TransformerLens: ``stop_at_layer=7``), then a base run whose hook
  returns the kept tensor. A naive hand-written version (two full runs, no early stop)
  is timed too, for information.
* ``pyvene``: pyvene's ``IntervenableModel`` with one ``VanillaIntervention`` on layer
  6's ``"block_output"`` (all positions: ``unit_locations=None``) on the Hugging Face
  model, the peer every interchange is also compared with.

Each engine runs on its own copy of the same weights (``copy.deepcopy``), so what one
engine attaches to a model (nnsight's envoys, the TransformerLens bridge's rewiring)
cannot slow another: torch backend, torch by hand and pyvene share the original
(neither leaves anything on it between calls); the nnsight backend and raw nnsight
get one copy each; the TransformerLens backend builds its bridge on a private copy
and the hand-written TransformerLens code uses that same bridge (``model.module``).

Every variant runs without autograd: the hand-written ones and pyvene under
``torch.no_grad()``, tracevene by itself (it disables autograd when no trainable module
is involved). The variants are interleaved (their order rotates every repeat), after
warm-up rounds; times are medians over the repeats, ratios are medians over the
repeats of the ratio within one repeat, of wall-clock time (``time.perf_counter``) and
of this process's CPU time (``time.process_time``, all threads). Targets: each
tracevene program at most 1.05x its engine's hand-written version, and every
tracevene interchange faster than pyvene's.

Usage::

    python bench/backends.py              # the full benchmark (a few minutes on CPU)
    python bench/backends.py --quick      # smoke run: tiny model, 2 repeats
    python bench/backends.py --json out.json

The exit status is 0 unless ``--strict`` is given and a target is missed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import warnings
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
    with_first,
)
from torch import nn  # noqa: E402

MAX_RATIO_VS_HAND = 1.05  # a tracevene program: at most 5% slower than by hand

BACKENDS = ("torch", "nnsight", "transformer_lens")
SAVE_IV, SAVE_HAND = "save-only, tracevene", "save-only, by hand"
X_IV, X_HAND = "interchange, tracevene", "interchange, by hand (early stop)"
X_NAIVE = "interchange, by hand (2 full runs)"
VARIANTS = (SAVE_IV, SAVE_HAND, X_IV, X_HAND, X_NAIVE)
PYVENE = ("pyvene", "interchange, IntervenableModel")


def key(backend: str, variant: str) -> str:
    return f"{backend} | {variant}"


PYVENE_KEY = key(*PYVENE)


# -- by hand: plain torch forward hooks ----------------------------------------------
class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def torch_save_only(hf: nn.Module, block: nn.Module, base: torch.Tensor) -> dict:
    kept: list[torch.Tensor] = []
    with torch.no_grad():
        handle = block.register_forward_hook(lambda m, a, o: kept.append(first(o)))
        try:
            logits = hf(input_ids=base, use_cache=False).logits
        finally:
            handle.remove()
    return {"resid": kept[0], "logits": logits}


def torch_interchange(
    hf: nn.Module, block: nn.Module, base: torch.Tensor, source: torch.Tensor, stop: bool
) -> torch.Tensor:
    kept: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        kept.append(first(output))
        if stop:
            raise _Stop

    def replace(module: nn.Module, args: Any, output: Any) -> Any:
        return with_first(output, kept[0])

    with torch.no_grad():
        handle = block.register_forward_hook(keep)
        try:
            hf(input_ids=source, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        handle = block.register_forward_hook(replace)
        try:
            return hf(input_ids=base, use_cache=False).logits
        finally:
            handle.remove()


# -- by hand: nnsight ----------------------------------------------------------------
def nnsight_save_only(nm: Any, layer: int, base: torch.Tensor) -> dict:
    with torch.no_grad():
        with nm.trace(base, use_cache=False):
            resid = nm.transformer.h[layer].output.save()
            logits = nm.output.logits.save()
    return {"resid": first(resid), "logits": logits}


def nnsight_interchange(
    nm: Any, layer: int, base: torch.Tensor, source: torch.Tensor, stop: bool
) -> torch.Tensor:
    with torch.no_grad():
        with nm.trace(source, use_cache=False) as tracer:
            kept = nm.transformer.h[layer].output.save()
            if stop:
                tracer.stop()
        with nm.trace(base, use_cache=False):
            nm.transformer.h[layer].output = kept
            logits = nm.output.logits.save()
    return logits


# -- by hand: TransformerLens ----------------------------------------------------------
def lens_save_only(bridge: Any, layer: int, base: torch.Tensor) -> dict:
    kept: list[torch.Tensor] = []

    def keep(x: torch.Tensor, hook: Any) -> None:
        kept.append(x)

    with torch.no_grad():
        logits = bridge.run_with_hooks(
            base, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", keep)], use_cache=False
        )
    return {"resid": kept[0], "logits": logits}


def lens_interchange(
    bridge: Any, layer: int, base: torch.Tensor, source: torch.Tensor, stop: bool
) -> torch.Tensor:
    kept: list[torch.Tensor] = []
    name = f"blocks.{layer}.hook_resid_post"

    def keep(x: torch.Tensor, hook: Any) -> None:
        kept.append(x)

    def replace(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return kept[0]

    with torch.no_grad():
        bridge.run_with_hooks(
            source, fwd_hooks=[(name, keep)], stop_at_layer=layer + 1 if stop else None,
            use_cache=False,
        )  # fmt: skip
        return bridge.run_with_hooks(base, fwd_hooks=[(name, replace)], use_cache=False)


# -- pyvene --------------------------------------------------------------------------
def pyvene_model(hf: nn.Module, layer: int) -> Any:
    import pyvene as pv

    config = pv.IntervenableConfig(
        representations=[pv.RepresentationConfig(layer, "block_output")],
        intervention_types=pv.VanillaIntervention,
    )
    return pv.IntervenableModel(config, model=hf)


def pyvene_interchange(pvm: Any, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, out = pvm(base={"input_ids": base}, sources=[{"input_ids": source}], use_cache=False)
    return out.logits


# -- timing --------------------------------------------------------------------------
# -- the benchmark -------------------------------------------------------------------
def run(quick: bool, repeats: int, warmup: int) -> dict:
    """Measure everything; returns the figures (as written by ``--json``)."""
    import nnsight

    size = QUICK if quick else FULL
    layer = size["n_layer"] // 2
    info = machine(("nnsight", "transformer_lens", "pyvene"))
    hf = build_model(size)
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen)
    source = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen)

    models = {
        "torch": iv.wrap(hf, backend="torch"),
        "nnsight": iv.wrap(copy.deepcopy(hf), backend="nnsight"),
        "transformer_lens": iv.wrap(copy.deepcopy(hf), backend="transformer_lens"),
    }
    nm = nnsight.NNsight(copy.deepcopy(hf))
    bridge = models["transformer_lens"].module  # the bridge tracevene itself runs
    block = hf.transformer.h[layer]  # t.layer[layer].resid_post is this block's output
    pvm = pyvene_model(hf, layer)
    programs = {
        b: (record_save_only(m, layer), record_interchange(m, layer)) for b, m in models.items()
    }

    def iv_save(b: str) -> Callable[[], Any]:
        return lambda: programs[b][0].run(models[b], base)

    def iv_x(b: str) -> Callable[[], Any]:
        return lambda: programs[b][1].run(models[b], base, [source])

    variants: dict[str, Callable[[], Any]] = {
        key("torch", SAVE_IV): iv_save("torch"),
        key("torch", SAVE_HAND): lambda: torch_save_only(hf, block, base),
        key("torch", X_IV): iv_x("torch"),
        key("torch", X_HAND): lambda: torch_interchange(hf, block, base, source, True),
        key("torch", X_NAIVE): lambda: torch_interchange(hf, block, base, source, False),
        key("nnsight", SAVE_IV): iv_save("nnsight"),
        key("nnsight", SAVE_HAND): lambda: nnsight_save_only(nm, layer, base),
        key("nnsight", X_IV): iv_x("nnsight"),
        key("nnsight", X_HAND): lambda: nnsight_interchange(nm, layer, base, source, True),
        key("nnsight", X_NAIVE): lambda: nnsight_interchange(nm, layer, base, source, False),
        key("transformer_lens", SAVE_IV): iv_save("transformer_lens"),
        key("transformer_lens", SAVE_HAND): lambda: lens_save_only(bridge, layer, base),
        key("transformer_lens", X_IV): iv_x("transformer_lens"),
        key("transformer_lens", X_HAND): lambda: lens_interchange(
            bridge, layer, base, source, True
        ),
        key("transformer_lens", X_NAIVE): lambda: lens_interchange(
            bridge, layer, base, source, False
        ),
        PYVENE_KEY: lambda: pyvene_interchange(pvm, base, source),
    }

    # Sanity: every variant computes the same numbers (and the plans tracevene chose).
    out = {name: fn() for name, fn in variants.items()}
    diffs = check_outputs(out)
    plans = {
        key(b, v): out[key(b, v)].plan.describe().replace("\n", ", ")
        for b in BACKENDS
        for v in (SAVE_IV, X_IV)
    }
    del out

    samples = interleaved(variants, repeats, warmup, "cpu")
    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "config": {
            **size,
            "layer": layer,
            "device": "cpu",
            "dtype": "float32",
            "attn_implementation": hf.config._attn_implementation,
            "repeats": repeats,
            "warmup": warmup,
            "quick": quick,
        },
        "machine": info,
        "plans": plans,
        "max_err_ulps": diffs,
        **{clock: summarise(samples[clock]) for clock in CLOCKS},
    }


def check_outputs(out: dict[str, Any]) -> dict[str, float]:
    """Largest differences from torch-by-hand, in float32 ulps of the reference's
    magnitude (sanity check, not timing)."""
    diff = err_ulps

    ref_save = out[key("torch", SAVE_HAND)]
    ref_x = out[key("torch", X_HAND)]
    diffs: dict[str, float] = {}
    for b in BACKENDS:
        for v in (SAVE_IV, SAVE_HAND):
            got = out[key(b, v)]
            diffs[f"{key(b, v)}: resid"] = diff(got["resid"], ref_save["resid"])
            diffs[f"{key(b, v)}: logits"] = diff(got["logits"], ref_save["logits"])
        for v in (X_IV, X_HAND, X_NAIVE):
            got = out[key(b, v)]
            diffs[f"{key(b, v)}: logits"] = diff(got["logits"] if v == X_IV else got, ref_x)
    diffs[f"{PYVENE_KEY}: logits"] = diff(out[PYVENE_KEY], ref_x)
    diffs.pop(f"{key('torch', SAVE_HAND)}: resid")
    diffs.pop(f"{key('torch', SAVE_HAND)}: logits")
    diffs.pop(f"{key('torch', X_HAND)}: logits")
    return diffs


def reference(name: str) -> str | None:
    """The hand-written variant a tracevene variant is compared with."""
    backend, variant = name.split(" | ")
    if variant == SAVE_IV:
        return key(backend, SAVE_HAND)
    if variant in (X_IV, X_NAIVE):
        return key(backend, X_HAND)
    return None


def summarise(samples: dict[str, list[float]]) -> dict[str, Any]:
    """Medians and paired ratios (median over repeats of the within-repeat ratio)."""
    med = {k: statistics.median(v) for k, v in samples.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))

    vs_hand = {k: paired(k, ref) for k in samples if (ref := reference(k))}
    vs_pyvene = {
        k: paired(k, PYVENE_KEY) for k in samples if "interchange" in k and k != PYVENE_KEY
    }
    targets = {}
    for b in BACKENDS:
        for v in (SAVE_IV, X_IV):
            targets[f"{key(b, v)}: <= {MAX_RATIO_VS_HAND}x by hand"] = (
                vs_hand[key(b, v)] <= MAX_RATIO_VS_HAND
            )
        targets[f"{key(b, X_IV)}: faster than pyvene"] = vs_pyvene[key(b, X_IV)] < 1.0
    return {
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "ratio_vs_hand": vs_hand,
        "ratio_vs_pyvene": vs_pyvene,
        "min_ms": {k: min(v) * 1e3 for k, v in samples.items()},
        "samples_ms": {k: [x * 1e3 for x in v] for k, v in samples.items()},
        "targets": targets,
    }


def table(fig: dict) -> str:
    """The figures as a Markdown table (also printed)."""
    w, c = fig["wall"], fig["cpu"]

    def verdict(name: str) -> str:
        backend, variant = name.split(" | ")
        if variant == SAVE_IV:
            ok = w["ratio_vs_hand"][name] <= MAX_RATIO_VS_HAND
            return f"<= {MAX_RATIO_VS_HAND:.2f}x hand: {'PASS' if ok else 'FAIL'}"
        if variant == X_IV:
            ok_hand = w["ratio_vs_hand"][name] <= MAX_RATIO_VS_HAND
            ok_pv = w["ratio_vs_pyvene"][name] < 1.0
            return (
                f"<= {MAX_RATIO_VS_HAND:.2f}x hand: {'PASS' if ok_hand else 'FAIL'}; "
                f"< pyvene: {'PASS' if ok_pv else 'FAIL'}"
            )
        return ""

    def ratio(d: dict, name: str) -> str:
        return f"{d[name]:.3f}" if name in d else ""

    lines = [
        "| backend | variant | wall ms | CPU ms | x hand (wall) | x hand (CPU) "
        "| x pyvene (wall) | x pyvene (CPU) | target (wall) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    names = [key(b, v) for b in BACKENDS for v in VARIANTS] + [PYVENE_KEY]
    for name in names:
        backend, variant = name.split(" | ")
        cells = [
            backend, variant,
            f"{w['median_ms'][name]:.2f}", f"{c['median_ms'][name]:.2f}",
            ratio(w["ratio_vs_hand"], name), ratio(c["ratio_vs_hand"], name),
            ratio(w["ratio_vs_pyvene"], name), ratio(c["ratio_vs_pyvene"], name),
            verdict(name),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(fig: dict) -> str:
    """Everything a reader needs: the machine, the setup, the table."""
    m, c = fig["machine"], fig["config"]
    load = lambda x: ", ".join(f"{v:.2f}" for v in x) if x else "n/a"  # noqa: E731
    head = [
        f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs), torch {m['torch']} "
        f"({m['torch_threads']} threads{', the default' * m['default_threads']}), "
        f"transformers {m['transformers']}, nnsight {m['nnsight']}, transformer-lens "
        f"{m['transformer_lens']}, pyvene {m['pyvene']}, Python {m['python']}",
        f"load average: {load(m['load_average_at_start'])} at start, "
        f"{load(m['load_average_at_end'])} at end",
        f"model: random GPT-2, {c['n_layer']} layers, d_model {c['n_embd']}, {c['n_head']} "
        f"heads, vocab {c['vocab']}, {c['dtype']}, attention {c['attn_implementation']}, "
        f"on {c['device']}; batch {c['batch']} x {c['seq']} tokens; site layer[{c['layer']}]",
        f"timing: {c['warmup']} warm-up round(s), median of {c['repeats']} interleaved "
        "repeats; wall = time.perf_counter, CPU = time.process_time (all threads of this "
        "process); 'x hand' and 'x pyvene' are medians of per-repeat ratios; 'x hand' is "
        "against the same backend's hand-written early-stop version"
        + ("  [QUICK SMOKE RUN]" * c["quick"]),
        "plans: " + "; ".join(f"{k}: {v}" for k, v in fig["plans"].items()),
        "max difference from torch by hand, in float32 ulps of the reference's magnitude: "
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
    parser.add_argument("--repeats", type=int, help="timed repeats per variant (default 7)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 2)")
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads(N) (default: torch's default)"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # engines' deprecation chatter, not figures
        fig = run(args.quick, repeats, warmup)
    print(report(fig))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    missed = not all(fig["wall"]["targets"].values())
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())

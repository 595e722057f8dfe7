"""Activation patching on IOI: which activations carry the indirect object's name?

Method. Each clean IOI prompt ("When Mary and John went to the store, John gave a
drink to" -> Mary) has an ABC-corrupted twin with three other names in the IO, S1
and S2 slots, which carries no information about the answer. All prompts come from
one template, so every prompt has its names, and its END token, at the same
positions. The metric is the logit difference logit(IO) - logit(S) at END, averaged
over the prompts and normalised so that 0 is the corrupted run and 1 the clean run:

    metric = (logit_diff(patched) - logit_diff(corrupted))
             / (logit_diff(clean) - logit_diff(corrupted))

A sweep patches one cell at a time with ``tracevene.patching.activation_patching``,
many cells per forward pass. Two directions:

- denoise: run the corrupted prompts with one cell taken from the clean run. A cell
  near 1 is *sufficient* to bring back the answer.
- noise: run the clean prompts with one cell taken from the corrupted run. A cell
  near 0 is *necessary*: losing it loses the answer.

Sweeps: ``resid_pre``, ``attn.out`` and ``mlp.out`` (layer x position), and the
per-head output ``z`` (layer x head): patched at all positions at once, and at
chosen positions (``--head-positions``, default S2 and END) read off a layer x
position x head sweep. Heads are patched jointly at all positions rather than summing
per-position effects, which need not add up.

What to expect. On the bundled ``models/ioi`` (4 layers x 4 heads, attention only; its
MLP weights are zero), each of these is checked by the verdict that ends a run:

- the model answers: clean accuracy >= 0.95;
- the END token's own embedding holds no name: denoising resid_pre at END in layer 0
  gives |metric| < 0.01;
- the name starts at IO: denoising resid_pre at IO in layer 0 gives >= 0.5;
- from layer 2 on the answer sits at END: denoising resid_pre at END in layers 2 and
  3 gives >= 0.95;
- one head moves most of it: head 0.1 (patched at all positions) is the strongest
  head when denoising, gives >= 0.5 denoised and leaves <= 0.2 noised;
- no head's output at S2 matters: noising any head at S2 leaves >= 0.95;
- the MLPs do nothing: no mlp.out cell moves the metric by more than 1e-4.

On GPT-2 small, Wang et al. 2023 find the name movers 9.9, 9.6, 10.0 and the
S-inhibition heads 7.3, 7.9, 8.6, 8.10 (the paper's numbers, not checked here). A tiny
model trained on IOI solves the task its own way: judge it by behaviour, not by
GPT-2's head numbers. With another --model the recipe states no expectations.

Run:
    python recipes/activation_patching.py [--smoke] [--n 32] [--template 0]
        [--model ioi | /path/to/gpt2] [--backend torch|nnsight|transformer_lens] [--out out]

The default model is the bundled ``models/ioi`` (offline). With ``--model
/path/to/gpt2`` (a local Hugging Face directory) the same sweeps run on GPT-2 small.
Prints the clean and corrupted logit differences, a table of the strongest cells of
every sweep and the verdict, saves one heatmap per sweep and direction into
``--out``, and exits with status 1 if an expectation fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import common
import torch
from torch import Tensor

import tracevene as iv
from tracevene.patching import PatchResult, activation_patching
from tracevene.tasks import ioi

SITES = ("resid_pre", "attn.out", "mlp.out")
DIRECTIONS = ("denoise", "noise")
ROLES = ("IO", "S1", "S1+1", "S2", "END")
MIN_EFFECT = 0.005  # smaller effects are not listed as "strongest"
Metric = Callable[[Tensor], Tensor]


def parse_args(argv: list[str] | None = None) -> Any:
    """The common recipe options plus this recipe's own."""
    p = common.parser(__doc__, default_model="ioi")
    p.add_argument("--n", type=int, default=32, help="prompts (default: 32; --smoke: 8)")
    p.add_argument(
        "--template", type=int, default=0,
        help=f"index into ioi.TEMPLATES, 0..{len(ioi.TEMPLATES) - 1} (default: 0)",
    )  # fmt: skip
    p.add_argument(
        "--head-positions", default="S2,END",
        help=f"positions (roles among {', '.join(ROLES)}) of the per-position head "
        "heatmaps (default: S2,END)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=3, help="strongest cells per sweep (default: 3)")
    p.add_argument("--per-pass", type=int, default=16, help="experiments per forward pass")
    args = p.parse_args(argv)
    if not 0 <= args.template < len(ioi.TEMPLATES):
        p.error(f"--template {args.template}: choose 0..{len(ioi.TEMPLATES) - 1}")
    args.head_positions = [r.strip() for r in args.head_positions.split(",") if r.strip()]
    for role in args.head_positions:
        if role not in ROLES:
            p.error(f"--head-positions: {role!r} is not a role; choose among {', '.join(ROLES)}")
    return args


# -- data and metric ------------------------------------------------------------------------
def dataset(tokenizer: Any, n: int, template: int, seed: int) -> ioi.Dataset:
    """``n`` clean / ABC prompts of one template (so all share their positions)."""
    if tokenizer is None:
        raise SystemExit("this recipe needs a model directory with a tokenizer (--model)")
    ds = ioi.make_dataset(tokenizer, n=n, seed=seed, templates=[ioi.TEMPLATES[template]])
    for role, pos in ds.pos.items():  # one template: one position per role
        assert (pos == pos[0]).all(), f"{role} positions differ across prompts"
    return ds


def logits_of(model: iv.Model, ids: Tensor) -> Tensor:
    """The model's logits on ``ids`` (a plain forward pass through the backend)."""
    with iv.trace(model, ids) as t:
        logits = t.logits.save()
    return logits.value.detach()


def normalised_logit_diff(ds: ioi.Dataset, clean: float, corrupted: float) -> Metric:
    """``logits -> (mean logit diff - corrupted) / (clean - corrupted)``."""
    if abs(clean - corrupted) < 1e-6:
        raise SystemExit(
            f"the clean and corrupted logit differences are equal ({clean:.4f}): the model "
            "does not tell the prompts apart, so there is nothing to normalise by."
        )
    return lambda logits: (ioi.logit_diff(logits, ds).mean() - corrupted) / (clean - corrupted)


def position_labels(tokenizer: Any, ds: ioi.Dataset) -> list[str]:
    """``"3 Mary/IO"``-style labels of the positions of the first prompt."""
    roles = {int(pos[0]): role for role, pos in ds.pos.items()}
    tokens = tokenizer.convert_ids_to_tokens(ds.clean[0].tolist())
    labels = [f"{p} {tok.lstrip('Ġ')}" for p, tok in enumerate(tokens)]
    return [f"{lab}/{roles[p]}" if p in roles else lab for p, lab in enumerate(labels)]


# -- sweeps ----------------------------------------------------------------------------------
def run_sweeps(
    model: iv.Model,
    ds: ioi.Dataset,
    metric: Metric,
    head_positions: Sequence[str] = ("S2", "END"),
    experiments_per_pass: int = 16,
) -> dict[str, PatchResult]:
    """Every sweep in both directions, keyed ``"<direction> <site>"``.

    Keys: ``resid_pre``, ``attn.out``, ``mlp.out`` ([layer, pos]), ``z`` ([layer, pos,
    head]), ``z@all`` ([layer, head], all positions at once) and ``z@<role>``
    ([layer, head] at one role's position, sliced from ``z``).
    """
    results: dict[str, PatchResult] = {}
    kw = {"experiments_per_pass": experiments_per_pass, "progress": False}
    for direction in DIRECTIONS:
        for site in SITES:
            results[f"{direction} {site}"] = activation_patching(
                model, ds.clean, ds.corrupted, metric, site=site, direction=direction, **kw
            )
        by_pos = activation_patching(
            model, ds.clean, ds.corrupted, metric, site="z", heads=True, direction=direction, **kw
        )
        results[f"{direction} z"] = by_pos
        results[f"{direction} z@all"] = activation_patching(
            model,
            ds.clean,
            ds.corrupted,
            metric,
            site="z",
            heads=True,
            direction=direction,
            positions="all",
            **kw,
        )
        for role in head_positions:
            pos = int(ds.pos[role][0])
            values = by_pos.values[:, pos]  # [layer, head]
            results[f"{direction} z@{role}"] = PatchResult(
                values, ("layer", "head"), f"z at {role} (pos {pos})", direction
            )
    return results


# -- reporting --------------------------------------------------------------------------------
def strongest(
    results: dict[str, PatchResult], labels: Sequence[str], top: int
) -> list[dict[str, Any]]:
    """The ``top`` cells of every [layer, pos] and [layer, head] sweep, largest effect first.

    The effect of a cell is its metric when denoising and 1 - metric when noising;
    cells whose effect is below ``MIN_EFFECT`` are left out.
    """
    rows = []
    for key, res in results.items():
        if res.values.dim() != 2:
            continue  # the [layer, pos, head] sweep is reported through its z@<role> slices
        direction, site = key.split(" ", 1)
        scores = (res.values if direction == "denoise" else 1.0 - res.values).flatten()
        for index in scores.abs().argsort(descending=True)[:top].tolist():
            if abs(scores[index]) < MIN_EFFECT:
                break
            layer, j = divmod(index, res.values.shape[1])
            cell = f"head {layer}.{j}" if res.axes[1] == "head" else f"pos {labels[j]}"
            rows.append({"direction": direction, "site": site, "layer": layer, "cell": cell,
                         "metric": _round(res.values[layer, j])})  # fmt: skip
    return rows


def _round(value: Any) -> float:
    """A float to 4 decimals, without a negative zero (tables print -0.000 otherwise)."""
    return round(float(value), 4) + 0.0


def plot_all(
    results: dict[str, PatchResult], labels: Sequence[str], out: Path, model_name: str
) -> list[Path]:
    """One heatmap per [layer, pos] / [layer, head] sweep, with labelled axes."""
    paths = []
    for key, res in results.items():
        if res.values.dim() != 2:
            continue
        direction = key.split(" ", 1)[0]
        fig = res.plot(  # white where the patch changed nothing: 0 denoising, 1 noising
            title=f"{model_name}, {key}\n(metric: 0 = corrupted, 1 = clean)",
            center=0.0 if direction == "denoise" else 1.0, label="metric",
        )  # fmt: skip
        ax = fig.axes[0]
        ticks = labels if res.axes[1] == "pos" else [str(h) for h in range(res.values.shape[1])]
        ax.set_xticks(range(len(ticks)), ticks, rotation=90 if res.axes[1] == "pos" else 0)
        ax.set_yticks(range(res.values.shape[0]))
        name = key.replace(" ", "_").replace("@", "_at_").replace(".", "_")
        path = common.out_file(out, f"activation_patching_{name}.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


def expectations(summary: dict[str, Any], ds: ioi.Dataset) -> list[common.Check]:
    """The checks of the help text's "What to expect" (the bundled ``models/ioi``)."""
    v, pos = summary["values"], {role: int(p[0]) for role, p in ds.pos.items()}
    denoise_resid, heads = v["denoise resid_pre"], v["denoise z@all"]
    best = divmod(int(heads.abs().argmax()), heads.shape[1])
    head_01 = (float(heads[0, 1]), float(v["noise z@all"][0, 1]))
    mlp = max(float(v["denoise mlp.out"].abs().max()), float((v["noise mlp.out"] - 1).abs().max()))
    late_end = float(denoise_resid[2:, pos["END"]].min())
    check = common.check
    return [
        check("clean accuracy >= 0.95", summary["clean_accuracy"],
              summary["clean_accuracy"] >= 0.95),
        check("denoise resid_pre, layer 0, END: |metric| < 0.01",
              float(denoise_resid[0, pos["END"]]), abs(denoise_resid[0, pos["END"]]) < 0.01),
        check("denoise resid_pre, layer 0, IO: >= 0.5", float(denoise_resid[0, pos["IO"]]),
              denoise_resid[0, pos["IO"]] >= 0.5),
        check("denoise resid_pre, layers 2-3, END: >= 0.95 (min)", late_end, late_end >= 0.95),
        check("strongest denoised head (all positions) is 0.1", f"{best[0]}.{best[1]}",
              best == (0, 1)),
        check("head 0.1 (all positions): denoise >= 0.5", head_01[0], head_01[0] >= 0.5),
        check("head 0.1 (all positions): noise <= 0.2", head_01[1], head_01[1] <= 0.2),
        check("noise any head at S2: >= 0.95 (min)", float(v["noise z@S2"].min()),
              v["noise z@S2"].min() >= 0.95),
        check("mlp.out: no cell moves the metric by > 1e-4", f"{mlp:.1e}", mlp <= 1e-4),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweeps, print the summary and save the heatmaps; returns the summary."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = common.load(args.model, args.backend)
    start = time.perf_counter()
    n = 8 if args.smoke and args.n == 32 else args.n
    ds = dataset(tokenizer, n, args.template, args.seed)
    clean_logits, corrupted_logits = logits_of(model, ds.clean), logits_of(model, ds.corrupted)
    clean = ioi.logit_diff(clean_logits, ds).mean().item()
    corrupted = ioi.logit_diff(corrupted_logits, ds).mean().item()
    metric = normalised_logit_diff(ds, clean, corrupted)
    results = run_sweeps(model, ds, metric, args.head_positions, args.per_pass)
    labels = position_labels(tokenizer, ds)
    rows = strongest(results, labels, args.top)
    paths = plot_all(results, labels, args.out, Path(args.model).name)
    summary = {
        "n": n, "template": ioi.TEMPLATES[args.template], "prompt": ds.text[0],
        "clean_logit_diff": clean, "corrupted_logit_diff": corrupted,
        "clean_accuracy": ioi.accuracy(clean_logits, ds),
        "strongest": rows, "values": {k: r.values for k, r in results.items()},
        "plots": [str(p) for p in paths], "seconds": time.perf_counter() - start,
    }  # fmt: skip
    report(summary, args)
    bundled = common.is_bundled(args.model, "ioi") and "S2" in args.head_positions
    summary["passed"] = common.verdict(expectations(summary, ds) if bundled else [])
    common.finish(summary["passed"])
    return summary


def report(summary: dict[str, Any], args: Any) -> None:
    """Print what the run found."""
    print(f"model {args.model} ({args.backend}), {summary['n']} prompts of one template:")
    print(f"  {summary['prompt']!r}")
    print(
        f"logit(IO) - logit(S) at END: clean {summary['clean_logit_diff']:.3f}, "
        f"corrupted (ABC) {summary['corrupted_logit_diff']:.3f}; clean accuracy "
        f"{summary['clean_accuracy']:.1%}\n"
    )
    print("Strongest cells (metric: 0 = corrupted, 1 = clean; denoise: clean cell into the")
    print("corrupted run, high = sufficient; noise: corrupted cell into the clean run, low =")
    print("necessary):\n")
    header = ("direction", "site", "layer", "cell", "metric")
    print(common.table([[r[h] for h in header] for r in summary["strongest"]], header))
    print(f"\n{len(summary['plots'])} heatmaps in {args.out}/; {summary['seconds']:.1f} s.")


if __name__ == "__main__":
    main()

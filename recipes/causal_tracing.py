"""Causal tracing (Meng et al. 2022, ROME) on IOI: where is the answer's name recalled?

Method. Three runs of each clean IOI prompt ("When Mary and John went to the store,
John gave a drink to" -> Mary):

1. clean: the prompt as it is; p_clean = p(IO | prompt) at END.
2. corrupted: Gaussian noise is added to the embeddings (the ``embed`` site, token +
   position) of the *subject tokens*; p_corrupted drops.
3. restored: the corrupted run, with the clean hidden state put back at one site,
   layer and position; p_restored shows how much of the answer that one state
   carries (ROME's indirect effect is p_restored - p_corrupted).

Which tokens are the subject. In ROME the subject ("The Eiffel Tower") is the entity
whose fact the model recalls, and the answer ("Paris") is not in the prompt. In IOI
the "fact" to recall is which name is the indirect object, and it can only be read
off the names: the IO token holds the answer itself and the S tokens say which name
is not the answer. So by default (``--subject names``) the noise covers all three
name tokens, IO, S1 and S2, and nothing else: without them the prompt says nothing
about the answer. ``--subject io`` noises the IO token only (the answer's own
embedding), ``--subject s`` the two S tokens only.

The noise has standard deviation 3x that of the clean embeddings at the subject
positions (ROME's choice, ``--noise-scale``). It is drawn once, from a generator
seeded with ``--seed``, and the *same* noise is used for the corrupted run and for
every restoration: with fresh noise per experiment, differences between cells
would mix the effect of the restored state with the luck of the draw. (For the same
reason the noise is a fixed tensor added to ``embed`` rather than ``iv.Noise``,
which draws noise of the shape of whatever batch it sees: a batch holding many
experiments would give each one different noise.) Many restorations share one
forward pass: experiment e owns rows e*n .. (e+1)*n of the batch, each a copy of the
n noised prompts with its own restored cell.

Sites: ``resid_pre`` (the residual stream into each layer; layer 0 is the embedding),
and, like ROME, windows of ``attn.out`` and ``mlp.out``: the cell for layer l restores
the attention (MLP) output of the ``--window`` layers around l at one position.

What to expect. On the bundled ``models/ioi`` (4 layers x 4 heads, attention only; its
MLP weights are zero) with the default noise on all three names, each of these is
checked by the verdict that ends a run:

- the noise works: p(IO) is >= 0.9 clean and <= 0.2 corrupted;
- the answer is the IO token's embedding: restoring resid_pre at IO in layer 0
  recovers >= 0.9 of p_clean - p_corrupted (the model copies the one clean name it
  sees), restoring S2 alone <= 0.05;
- END holds the answer after layer 0: restoring resid_pre at END recovers <= 0.05 in
  layer 0 (the END embedding holds no name) and >= 0.95 in every later layer;
- layer 0's attention is what writes it there: restoring attn.out of layer 0 at END
  gives p(IO) within 1e-4 of restoring resid_pre of layer 1 there (nothing else
  writes to END in between), while restoring layer 1's attention output at END alone
  recovers <= 0.1;
- the MLPs do nothing: every mlp.out restoration is within 1e-4 of p_corrupted.

A restoration says what one state can do in the noised context: a late state can fail
to help when earlier states at its position stay corrupted. With another --model,
--subject or --window the recipe states no expectations.

Run:
    python recipes/causal_tracing.py [--smoke] [--n 32] [--subject names|io|s]
        [--window 1] [--model ioi | /path/to/gpt2] [--backend torch|nnsight|...] [--out out]

Prints p(IO) clean and corrupted, the strongest restorations of each site and the
verdict, saves one heatmap per site into ``--out``, and exits with status 1 if an
expectation fails.
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
from tracevene.patching import PatchResult, causal_tracing
from tracevene.tasks import ioi

SITES = ("resid_pre", "attn.out", "mlp.out")
SUBJECTS = {"names": ("IO", "S1", "S2"), "io": ("IO",), "s": ("S1", "S2")}
MIN_RECOVERED = 0.005  # restorations that recover less are not listed
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
        "--subject", choices=sorted(SUBJECTS), default="names",
        help="the tokens to noise: names (IO, S1, S2; default), io or s (S1, S2)",
    )  # fmt: skip
    p.add_argument("--noise-scale", type=float, default=3.0, help="noise std / embedding std")
    p.add_argument(
        "--window", type=int, default=None,
        help="layers restored together for attn.out and mlp.out (default: n_layers / 5, "
        "at least 1)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=4, help="strongest cells per site (default: 4)")
    p.add_argument("--per-pass", type=int, default=16, help="experiments per forward pass")
    args = p.parse_args(argv)
    if not 0 <= args.template < len(ioi.TEMPLATES):
        p.error(f"--template {args.template}: choose 0..{len(ioi.TEMPLATES) - 1}")
    if args.window is not None and args.window < 1:
        p.error(f"--window {args.window}: give at least 1 layer")
    return args


# -- corruption ---------------------------------------------------------------------------------
def subject_positions(ds: ioi.Dataset, subject: str = "names") -> Tensor:
    """``[n, k]`` positions of the subject tokens of each prompt (see ``--subject``)."""
    if subject not in SUBJECTS:
        raise iv.ArgumentError(
            f"subject={subject!r} is not a subject: choose one of "
            f"{', '.join(map(repr, sorted(SUBJECTS)))} (the --subject choices)."
        )
    return torch.stack([ds.pos[role] for role in SUBJECTS[subject]], dim=1)


def p_answer(ds: ioi.Dataset) -> Metric:
    """``logits -> mean p(IO)`` at END."""
    rows = torch.arange(len(ds))

    def metric(logits: Tensor) -> Tensor:
        probs = logits[rows, ds.pos["END"]].float().softmax(-1)
        return probs[rows, ds.io].mean()

    return metric


# -- reporting ------------------------------------------------------------------------------------
def strongest(
    results: dict[str, PatchResult], labels: Sequence[str], top: int, p_clean: float,
    p_corrupted: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """The ``top`` restorations of each site, largest p(IO) first (none that recover
    less than ``MIN_RECOVERED`` of the clean - corrupted difference)."""
    rows = []
    for res in results.values():
        for index in res.values.flatten().argsort(descending=True)[:top].tolist():
            layer, pos = divmod(index, res.values.shape[1])
            p = float(res.values[layer, pos])
            if abs(p - p_corrupted) < MIN_RECOVERED * abs(p_clean - p_corrupted):
                break
            effect = p - p_corrupted
            recovered = effect / (p_clean - p_corrupted)
            rows.append({"site": res.site, "layer": layer, "pos": labels[pos], "p(IO)": p,
                         "effect": round(effect, 4) + 0.0,
                         "recovered": round(recovered, 4) + 0.0})  # fmt: skip
    return rows


def plot_all(
    results: dict[str, PatchResult], labels: Sequence[str], out: Path, title: str,
    p_corrupted: float,
) -> list[Path]:  # fmt: skip
    """One heatmap per site of the restoration's effect, p(IO) - p_corrupted.

    Diverging colours, white at 0 (the restoration changed nothing): red where a
    restored state raises p(IO), blue where it lowers it. Positions labelled by token.
    """
    paths = []
    for site, res in results.items():
        effect = PatchResult(res.values - p_corrupted, res.axes, res.site, res.direction)
        fig = effect.plot(
            title=f"{title}: {res.site} restored, effect on p(IO)\n(p_corrupted "
            f"{p_corrupted:.3f})",
            label="p(IO) - p_corrupted",
        )  # fmt: skip
        ax = fig.axes[0]
        ax.set_xticks(range(len(labels)), labels, rotation=90)
        ax.set_yticks(range(res.values.shape[0]))
        path = common.out_file(out, f"causal_tracing_{site.replace('.', '_')}.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


def position_labels(tokenizer: Any, ds: ioi.Dataset, subject: Tensor) -> list[str]:
    """``"3 Mary/IO*"``-style labels of the first prompt's positions (* = noised)."""
    roles = {int(pos[0]): role for role, pos in ds.pos.items()}
    tokens = tokenizer.convert_ids_to_tokens(ds.clean[0].tolist())
    noised = set(subject[0].tolist())
    labels = []
    for p, tok in enumerate(tokens):
        label = f"{p} {tok.lstrip('Ġ')}" + (f"/{roles[p]}" if p in roles else "")
        labels.append(label + ("*" if p in noised else ""))
    return labels


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Trace, print the summary and save the heatmaps; returns the summary."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = common.load(args.model, args.backend)
    start = time.perf_counter()
    n = 8 if args.smoke and args.n == 32 else args.n
    if tokenizer is None:
        raise SystemExit("this recipe needs a model directory with a tokenizer (--model)")
    ds = ioi.make_dataset(tokenizer, n=n, seed=args.seed, templates=[ioi.TEMPLATES[args.template]])
    subject = subject_positions(ds, args.subject)
    metric = p_answer(ds)
    size = args.window or max(1, round(model.n_layers / 5))
    trace = causal_tracing(
        model, ds.clean, metric, subject, sites=SITES, window={"attn.out": size, "mlp.out": size},
        noise_scale=args.noise_scale, seed=args.seed, experiments_per_pass=args.per_pass,
    )  # fmt: skip
    noise, p_clean, p_corrupted, results = trace.noise, trace.clean, trace.corrupted, trace.results
    labels = position_labels(tokenizer, ds, subject)
    summary = {
        "n": n, "prompt": ds.text[0], "subject": args.subject, "window": size,
        "noise_std": float(noise.std()), "p_clean": p_clean, "p_corrupted": p_corrupted,
        "strongest": strongest(results, labels, args.top, p_clean, p_corrupted),
        "values": {site: r.values for site, r in results.items()},
        "plots": [str(p) for p in plot_all(results, labels, args.out, Path(args.model).name,
                                           p_corrupted)],
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    report(summary, args)
    stated = common.is_bundled(args.model, "ioi") and args.subject == "names" and size == 1
    summary["passed"] = common.verdict(expectations(summary, ds) if stated else [])
    common.finish(summary["passed"])
    return summary


def expectations(summary: dict[str, Any], ds: ioi.Dataset) -> list[common.Check]:
    """The checks of the help text's "What to expect" (the bundled ``models/ioi``)."""
    v, pos = summary["values"], {role: int(p[0]) for role, p in ds.pos.items()}
    clean, corrupted = summary["p_clean"], summary["p_corrupted"]

    def recovered(site: str, layer: Any, role: str) -> Any:
        return (v[site][layer, pos[role]] - corrupted) / (clean - corrupted)

    late = float(recovered("resid_pre", slice(1, None), "END").min())
    same = abs(float(v["attn.out"][0, pos["END"]] - v["resid_pre"][1, pos["END"]]))
    mlp = float((v["mlp.out"] - corrupted).abs().max())
    check = common.check
    return [
        check("p(IO) clean >= 0.9", clean, clean >= 0.9),
        check("p(IO) corrupted <= 0.2", corrupted, corrupted <= 0.2),
        check("restore resid_pre, layer 0, IO: recovered >= 0.9",
              float(recovered("resid_pre", 0, "IO")), recovered("resid_pre", 0, "IO") >= 0.9),
        check("restore resid_pre, layer 0, S2: recovered <= 0.05",
              float(recovered("resid_pre", 0, "S2")), recovered("resid_pre", 0, "S2") <= 0.05),
        check("restore resid_pre, layer 0, END: |recovered| <= 0.05",
              float(recovered("resid_pre", 0, "END")),
              abs(recovered("resid_pre", 0, "END")) <= 0.05),
        check("restore resid_pre, layers 1+, END: recovered >= 0.95 (min)", late, late >= 0.95),
        check("attn.out layer 0 at END = resid_pre layer 1 at END (|diff| <= 1e-4)",
              f"{same:.1e}", same <= 1e-4),
        check("restore attn.out, layer 1, END: recovered <= 0.1",
              float(recovered("attn.out", 1, "END")), recovered("attn.out", 1, "END") <= 0.1),
        check("mlp.out: every restoration within 1e-4 of p_corrupted", f"{mlp:.1e}",
              mlp <= 1e-4),
    ]  # fmt: skip


def report(summary: dict[str, Any], args: Any) -> None:
    """Print what the run found."""
    print(f"model {args.model} ({args.backend}), {summary['n']} prompts of one template:")
    print(f"  {summary['prompt']!r}")
    print(
        f"noise on the subject tokens ({', '.join(SUBJECTS[args.subject])}), std "
        f"{summary['noise_std']:.3f} ({args.noise_scale:g}x the embeddings'), seed {args.seed}"
    )
    print(f"p(IO) at END: clean {summary['p_clean']:.3f}, corrupted {summary['p_corrupted']:.3f}\n")
    print("Strongest restorations (effect = p(IO) - p_corrupted; recovered = effect / "
          "(p_clean - p_corrupted)):\n")  # fmt: skip
    header = ("site", "layer", "pos", "p(IO)", "effect", "recovered")
    print(common.table([[r[h] for h in header] for r in summary["strongest"]], header))
    print(f"\n{len(summary['plots'])} heatmaps in {args.out}/; {summary['seconds']:.1f} s.")


if __name__ == "__main__":
    main()

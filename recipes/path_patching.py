"""Path patching on an induction circuit: which input of the induction head does the
previous-token head feed?

Method. The data are repeated random sequences (``tracevene.tasks.induction``): BOS,
fillers, n distinct random tokens x_1..x_n at a random position and their repeat at a
random later position (n from --min-len to --repeat-len; both default to 8, so by
default every repeat has 8 tokens). At the second x_i an induction circuit predicts x_{i+1}: a
previous-token head (layer 0) writes "my previous token is x_i" into the residual
stream at the first x_{i+1}; the induction head (layer 1) attends from the second x_i
to the position whose previous token matches its own token and copies the token
there. The metric is the mean log-probability of the correct token on the repeated
half. Every run has two inputs: ``orig`` (the sequences) and ``new`` (the same
sequences with the first occurrence resampled, so induction no longer predicts the
second half).

1. Scores from the attention patterns ``[batch, head, query, key]`` of every head:
   previous-token score (mean attention from p to p - 1) and induction score (mean
   attention from the second x_i to the first x_{i+1}). The recipe takes the best
   induction head in layer >= 1 and the best previous-token head in an earlier layer.
2. Path patching (Wang et al. 2023, ``tracevene.patching.path_patching``): run orig
   with the previous-token head's output taken from the new run and every other head
   frozen at its orig value; read the induction head's query, key or value input
   there; run orig again with only that input replaced. So the sender reaches the
   receiver through the direct path only. The fraction of the effect a path carries:

       (metric(patched) - metric(orig)) / (metric(new) - metric(orig))

   and, as a share of the sender -> receiver edge, the same with metric(new) replaced
   by the run that patches all three inputs at once.
3. Which heads feed the induction head's keys: every head alone as the sender.

What to expect. On the bundled 2-layer attention-only model (``models/induction``),
each of these is checked by the verdict that ends a run:

- a previous-token head in layer 0 (score >= 0.5) and an induction head in layer 1
  (score >= 0.9);
- K-composition: the path into the induction head's keys carries >= 0.95 of the
  sender -> receiver edge's effect, the query and value paths |fraction| <= 0.05 each;
- among all heads as senders into the keys, the previous-token head is the
  strongest;
- the two forms of path patching (two forward passes, or one pass with both runs
  stacked along the batch) agree within 1e-4.

With another --model the recipe states no expectations.

Run:
    python recipes/path_patching.py [--smoke] [--n 256] [--model induction | /path/to/gpt2]
        [--backend torch|nnsight|transformer_lens] [--out out] [--seed 0]

Offline for the bundled model. With ``--model`` naming another causal LM (a local
Hugging Face directory, e.g. GPT-2 small) the same analysis runs on random repeated
tokens from that model's vocabulary, with heads in any layer. Prints the strongest
heads, a table of paths and the verdict, saves path_patching.png (score heatmaps, the
senders into the keys, the q/k/v bars) into ``--out``, and exits with status 1 if an
expectation fails.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import common
import torch
from torch import Tensor

import tracevene as iv
from tracevene.patching import Head, path_patching
from tracevene.tasks import induction

INPUTS = ("q", "k", "v", None)  # None: all three inputs together (the whole edge)


def parse_args(argv: list[str] | None):
    p = common.parser(__doc__, "induction")
    p.add_argument("--n", type=int, default=256, help="sequences (default: 256; --smoke: 32)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default: 32)")
    p.add_argument("--repeat-len", type=int, default=8, help="longest repeat (default: 8)")
    p.add_argument("--min-len", type=int, default=8, help="shortest repeat (default: 8)")
    p.add_argument("--per-pass", type=int, default=16, help="experiments per forward pass")
    args = p.parse_args(argv)
    if args.smoke:
        args.n = min(args.n, 32)
    return args


def make_data(model: iv.Model, args) -> induction.Dataset:
    """Repeated random sequences over the model's vocabulary (BOS first, not drawn)."""
    config = model.wrapped.config
    vocab = config.vocab_size
    bos = config.bos_token_id if config.bos_token_id is not None else 0
    high = vocab - 1 if bos == vocab - 1 else vocab  # GPT-2: BOS is the last token
    return induction.make_dataset(
        args.n, high, seq_len=args.seq_len, repeat_len=args.repeat_len,
        min_len=args.min_len, seed=args.seed,
        low=1 if bos == 0 else 0, bos=bos,
    )  # fmt: skip


def pick_heads(prev: Tensor, ind: Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """The best induction head in layer >= 1 and the best previous-token head before it."""
    if prev.shape[0] < 2:
        raise SystemExit("path patching into an induction head needs a model with >= 2 layers")
    flat = int(ind[1:].argmax())
    receiver = (1 + flat // ind.shape[1], flat % ind.shape[1])
    flat = int(prev[: receiver[0]].argmax())
    return (flat // prev.shape[1], flat % prev.shape[1]), receiver


def measure_paths(model, ds, sender, receiver, form: str) -> dict[str | None, float]:
    """The metric with the sender patched into each input of the receiver (and all three)."""
    metric = induction.metric(ds)
    values = {}
    for x in INPUTS:
        result = path_patching(
            model, ds.orig, ds.new, metric, senders=[Head(*sender)],
            receivers=Head(*receiver, input=x), form=form, progress=False,
        )  # fmt: skip
        values[x] = result.values[0].item()
    return values


def reference_runs(model: iv.Model, ds: induction.Dataset) -> tuple[float, float]:
    """The metric on the plain orig and new runs."""
    metric = induction.metric(ds)
    with iv.trace(model) as t:
        t.logits.save("logits")
    with torch.no_grad():
        orig = metric(t.program.run(model, ds.orig)["logits"]).item()
        new = metric(t.program.run(model, ds.new)["logits"]).item()
    return orig, new


def top_heads(scores: Tensor, k: int = 3) -> str:
    """``"1.2 (0.95), 1.0 (0.31), ..."``: the ``k`` best heads and their scores."""
    best = scores.flatten().topk(min(k, scores.numel()))
    n_heads = scores.shape[1]
    return ", ".join(
        f"{i // n_heads}.{i % n_heads} ({v:.2f})"
        for v, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)
    )


def plot(path: Path, prev: Tensor, ind: Tensor, into_keys: Tensor, fractions: dict) -> None:
    """Score heatmaps, every head's effect through the receiver's keys, and q/k/v bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("previous-token score", prev, "viridis"),
        ("induction score", ind, "viridis"),
        ("sender -> induction head's keys\n(fraction of the effect)", into_keys, "RdBu_r"),
    ]
    width = max(2.4, 1.2 + 0.35 * prev.shape[1])  # one-head models need room for the titles
    fig, axes = plt.subplots(
        1, 4, figsize=(3 * width + 4, 1.9 + 0.35 * prev.shape[0]), layout="constrained"
    )
    for ax, (title, values, cmap) in zip(axes, panels, strict=False):
        _heatmap(fig, ax, values, cmap, title)
    names = list(fractions)
    axes[3].bar(names, [fractions[n] for n in names], color=["C0", "C3", "C2", "C7"])
    axes[3].axhline(0, color="black", linewidth=0.5)
    low, high = min(0, *fractions.values()) - 0.05, max(1, *fractions.values()) + 0.05
    axes[3].set(title="each path of the edge\n(fraction of the effect)", ylim=(low, high))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmap(fig, ax, values: Tensor, cmap: str, title: str) -> None:
    """A layer x head heatmap; values written in the cells of small models.

    Scores (0..1) in a sequential map from 0; fractions of an effect in a diverging map
    white at 0 (no effect), symmetric, at least -1..1.
    """
    lim = max(float(values.abs().max()), 1.0) if cmap == "RdBu_r" else 1.0
    image = ax.imshow(
        values.numpy(), cmap=cmap, aspect="auto", vmin=-lim if cmap == "RdBu_r" else 0, vmax=lim
    )
    ax.set(title=title, xlabel="head", ylabel="layer")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    if values.numel() <= 64:
        for i, v in enumerate(values.flatten().tolist()):
            ax.text(i % values.shape[1], i // values.shape[1], f"{v:.2f}", ha="center",
                    va="center", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})  # fmt: skip
    fig.colorbar(image, ax=ax)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Find the induction circuit's heads and path-patch between them; the summary."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, _ = common.load(args.model, args.backend)
    ds = make_data(model, args)
    prev, ind = induction.head_scores(model, ds)
    sender, receiver = pick_heads(prev, ind)
    m_orig, m_new = reference_runs(model, ds)
    print(f"{len(ds)} sequences of {args.seq_len} tokens, {args.min_len}-{args.repeat_len} "
          "repeated; metric: mean log-prob of the correct token on the repeated half")  # fmt: skip
    print(f"metric: orig {m_orig:.3f}, new (first occurrence resampled) {m_new:.3f}")
    print(f"previous-token heads: {top_heads(prev)}")
    print(f"induction heads:      {top_heads(ind)}\n")

    two = measure_paths(model, ds, sender, receiver, "two_pass")
    one = measure_paths(model, ds, sender, receiver, "single_pass")
    total, edge = m_new - m_orig, two[None] - m_orig
    rows, fractions = [], {}
    s, r = f"{sender[0]}.{sender[1]}", f"{receiver[0]}.{receiver[1]}"
    for x in INPUTS:
        name = x or "q+k+v"
        fractions[name] = (two[x] - m_orig) / total
        rows.append((f"{s} -> {r}.{name}", two[x], fractions[name], (two[x] - m_orig) / edge))
    print(common.table(rows, ["path", "metric", "of orig->new", "of the edge"]))
    gap = max(abs(two[x] - one[x]) for x in INPUTS)
    print(f"\ntwo-pass vs single-pass: max |difference| {gap:.2e}")

    into_keys = path_patching(
        model, ds.orig, ds.new, induction.metric(ds), senders="heads",
        receivers=Head(*receiver, input="k"), progress=False,
        experiments_per_pass=args.per_pass,
    )  # fmt: skip
    into_keys = (into_keys.values - m_orig) / total
    print(f"senders into {r}.k: {top_heads(into_keys)} (fraction of orig->new)")
    png = common.out_file(args.out, "path_patching.png")
    plot(png, prev, ind, into_keys, fractions)
    print(f"plot: {png}\ndone in {time.perf_counter() - start:.1f} s")
    summary = {
        "sender": sender, "receiver": receiver,
        "prev_score": prev[sender].item(), "induction_score": ind[receiver].item(),
        "metric_orig": m_orig, "metric_new": m_new,
        "fraction": {x or "qkv": (two[x] - m_orig) / total for x in INPUTS},
        "fraction_of_edge": {x or "qkv": (two[x] - m_orig) / edge for x in INPUTS},
        "two_vs_single_pass": gap, "plot": str(png),
        "strongest_into_keys": divmod(int(into_keys.abs().argmax()), into_keys.shape[1]),
    }  # fmt: skip
    stated = common.is_bundled(args.model, "induction")
    summary["passed"] = common.verdict(expectations(summary) if stated else [])
    common.finish(summary["passed"])
    return summary


def expectations(summary: dict[str, Any]) -> list[common.Check]:
    """The checks of the help text's "What to expect" (the bundled ``models/induction``)."""
    (sl, sh), (rl, rh) = summary["sender"], summary["receiver"]
    edge, best = summary["fraction_of_edge"], summary["strongest_into_keys"]
    check = common.check
    return [
        check("previous-token head in layer 0, score >= 0.5",
              f"{sl}.{sh} ({summary['prev_score']:.2f})", sl == 0 and summary["prev_score"] >= 0.5),
        check("induction head in layer 1, score >= 0.9",
              f"{rl}.{rh} ({summary['induction_score']:.2f})",
              rl == 1 and summary["induction_score"] >= 0.9),
        check("k path: >= 0.95 of the edge", edge["k"], edge["k"] >= 0.95),
        check("q path: |fraction of the edge| <= 0.05", edge["q"], abs(edge["q"]) <= 0.05),
        check("v path: |fraction of the edge| <= 0.05", edge["v"], abs(edge["v"]) <= 0.05),
        check("strongest sender into the keys is the previous-token head",
              f"{best[0]}.{best[1]}", tuple(best) == (sl, sh)),
        check("two-pass = single-pass within 1e-4", f"{summary['two_vs_single_pass']:.1e}",
              summary["two_vs_single_pass"] <= 1e-4),
    ]  # fmt: skip


if __name__ == "__main__":
    main()

"""Indirect object identification (IOI): find the circuit by iterative path patching.

The task (Wang et al. 2023, "Interpretability in the Wild"): in a prompt such as
"When Mary and John went to the store, John gave a drink to", the model should
predict the indirect object (IO, "Mary") rather than the subject (S, "John"), who
appears twice (S1 and S2). The metric is the logit difference

    logit_diff = logit(IO) - logit(S)   at the final position (END),

and accuracy is the fraction of prompts that the model gets right (see
tracevene.tasks.ioi.accuracy). The corrupted "ABC" prompts replace IO, S1 and S2
with three other names, so they carry no information about the answer.

Iterative path patching discovers the circuit backwards from the logits. In each
step, every attention head alone is a sender: its output takes its value on the
ABC prompts, every other head is frozen at its clean value, and only the chosen
receivers see the change (through direct paths). The effect of a head is the
change in logit_diff as a fraction of the clean - ABC gap (-1: the whole
behaviour goes through that path). Heads with |effect| >= --threshold are kept:

  1. heads -> logits                               name movers (and negative ones)
  2. heads -> name movers' queries (at END)        S-inhibition heads
  3. heads -> S-inhibition heads' keys and values  induction, duplicate-token heads
  4. heads -> induction heads' keys                previous-token heads

Step 3 patches keys and values together: "this name is repeated" can reach the
S-inhibition heads through what they attend to (keys) or what they copy (values).
Step 2's receivers also include S-suppression heads (below), which move "not S".
A step whose receivers are missing, or all in layer 0, is skipped.

Every found head gets a role from what it attends to (clean prompts, mean over
prompts: END -> IO, END -> S2, S2 -> S1, S2 -> S1+1, each position -> the token
before) and what it writes (its direct effect: the change in logit_diff when its
output at END is removed from the residual stream that the unembedding reads):
name mover (END -> IO), negative name mover (END -> IO, writes strongly against
IO), S-inhibition (END -> S2), S-suppression (END -> S2, writes strongly against S:
a mover of "not S", found in small trained models), duplicate token (S2 -> S1),
induction (S2 -> S1+1), previous token.

Faithfulness: the "one fixed protocol" of this recipe is mean ablation. Every head
outside the circuit has its output (z, at every position) replaced by its mean over
the ABC prompts of the same template; the circuit's heads run as usual. The table
reports the logit difference that remains (as a fraction of the full model's) and
the accuracy, next to random head sets of the same size (mean over --random-sets
sets) and next to ablating every head.

What to expect (each of these is checked by the verdict that ends a run): on the
bundled models/ioi (a small attention-only transformer trained on IOI) the model is
>= 95% accurate and the found circuit, at most half of its heads, keeps >= 80% of the
logit difference and >= 90% accuracy (not checked with --smoke: on 32 prompts a weak
head can drop out of the circuit), more of the logit difference than random head
sets of its size; its mechanism is its own (judge it by behaviour, not by GPT-2's
head numbers). On the hand-built models/ioi_circuit the recipe recovers exactly the
three planted heads, each in its role (models/ioi_circuit/circuit.json), and they
keep >= 99% of the logit difference. On GPT-2 small (--model /path/to/gpt2) Wang et
al. report a logit difference of ~3.56 and the heads name movers 9.9, 9.6, 10.0;
negative name movers 10.7, 11.10; S-inhibition 7.3, 7.9, 8.6, 8.10 (the paper's
numbers: the recipe states no expectations for other models).

Run:  python recipes/ioi.py [--model ioi | ioi_circuit | /path/to/gpt2] [--smoke]
It prints how long it took (docs/recipes/ioi.md quotes a measured run). Plots go to
--out: one layer x head heatmap per path-patching step and the attention patterns
of the found heads. The exit status is 1 if an expectation fails.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import tracevene as iv  # noqa: E402
from tracevene.patching import Head, head_means, path_patching, run_circuit  # noqa: E402
from tracevene.tasks import ioi  # noqa: E402

HeadId = tuple[int, int]
ROLES = (
    "name-mover",
    "negative-name-mover",
    "s-inhibition",
    "s-suppression",
    "induction",
    "duplicate-token",
    "previous-token",
)
# Attention scores: (name, query position, key position); "prev" is the mean over all
# positions of the attention to the previous token.
ATTENTION = (
    ("END->IO", "END", "IO"),
    ("END->S1", "END", "S1"),  # shown, not used for roles
    ("END->S2", "END", "S2"),
    ("S2->S1", "S2", "S1"),
    ("S2->S1+1", "S2", "S1+1"),
    ("prev", None, None),
)
ROLE_OF_PATTERN = {
    "END->S2": "s-inhibition",
    "S2->S1": "duplicate-token",
    "S2->S1+1": "induction",
    "prev": "previous-token",
}


@dataclass
class Step:
    """One path-patching step: its receivers and what it found."""

    name: str
    receivers: list[Head] | str
    effect: Tensor | None  # [layer, head]: (patched - clean) / (clean - corrupted)
    found: list[HeadId]
    note: str = ""  # why the step was skipped (then effect is None)


def parse_args(argv: list[str] | None) -> Any:
    """The command line: the common options plus this recipe's."""
    p = common.parser(__doc__, "ioi")
    p.add_argument("--prompts", type=int, default=None, help="IOI prompts (default 256; smoke 32)")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.05,
        help="keep a head when |effect| >= this fraction of the clean - ABC gap (default 0.05)",
    )
    p.add_argument(
        "--random-sets", type=int, default=None, help="random head sets (default 20; smoke 3)"
    )
    args = p.parse_args(argv)
    args.prompts = args.prompts or (32 if args.smoke else 256)
    args.random_sets = args.random_sets or (3 if args.smoke else 20)
    return args


# -- measurements ---------------------------------------------------------------------------
def behaviour(logits: Tensor, ds: ioi.Dataset) -> tuple[float, float]:
    """Mean logit difference and accuracy."""
    return ioi.logit_diff(logits, ds).mean().item(), ioi.accuracy(logits, ds)


def plain_logits(model: iv.Model, ids: Tensor) -> Tensor:
    """The model's logits on ``ids``."""
    with iv.trace(model, ids) as t:
        logits = t.logits.save()
    return logits.value


def direct_effects(model: iv.Model, ds: ioi.Dataset, heads: list[HeadId]) -> dict[HeadId, float]:
    """Each head's direct effect on logit(IO) - logit(S) in the clean run.

    The change in the mean logit difference when the head's output at END is removed
    from the last layer's output (the residual stream that the final norm and the
    unembedding read); every layer still sees the head as usual.
    """
    rows, end = torch.arange(len(ds.io)), ds.pos["END"]
    full = behaviour(plain_logits(model, ds.clean), ds)[0]
    effects = {}
    for layer, head in heads:
        with iv.trace(model, ds.clean) as t:
            out = t.layer[layer].attn.head[head].out[rows, end]
            t.layer[-1].resid_post[rows, end] -= out
            logits = t.logits.save()
        effects[(layer, head)] = full - behaviour(logits.value, ds)[0]
    return effects


def attention_scores(model: iv.Model, ds: ioi.Dataset) -> dict[str, Tensor]:
    """The attention scores of every head (``[layer, head]`` each), on the clean prompts."""
    with iv.trace(model, ds.clean) as t:
        saved = [t.layer[i].attn.pattern.save() for i in range(model.n_layers)]
    pattern = torch.stack([s.value.float() for s in saved], 1)  # [batch, layer, head, q, k]
    rows = torch.arange(len(ds.io))
    scores = {}
    for name, query, key in ATTENTION:
        if query is None:
            scores[name] = previous_token_score(pattern, ds.pos["END"])
        else:
            scores[name] = pattern[rows, :, :, ds.pos[query], ds.pos[key]].mean(0)
    return scores


def previous_token_score(pattern: Tensor, end: Tensor) -> Tensor:
    """Mean attention of positions 1..END to the position before, ``[layer, head]``."""
    n_pos = pattern.shape[-1]
    prev = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # [batch, layer, head, pos - 1]
    mask = (torch.arange(1, n_pos) <= end[:, None]).float()[:, None, None]
    return (prev * mask).sum(-1).div(mask.sum(-1)).mean(0)


def classify(
    scores: dict[str, Tensor], effects: dict[HeadId, float], logit_diff: float
) -> dict[HeadId, str]:
    """Each head's role: the attention score it scores highest on, and its direct effect.

    A direct effect is *strong* when it is at least a tenth of the model's
    ``logit_diff``. END -> IO: a name mover, or a negative name mover if it writes
    strongly against IO (negative direct effect). END -> S2: S-inhibition, or
    S-suppression if it writes strongly against S itself (positive direct effect).
    S2 -> S1: duplicate token; S2 -> S1+1: induction; previous token: previous token.
    """
    roles = {}
    for (layer, head), effect in effects.items():
        best = max(["END->IO", *ROLE_OF_PATTERN], key=lambda k: scores[k][layer, head])
        strong = abs(effect) >= 0.1 * abs(logit_diff)
        if best == "END->IO":
            role = "negative-name-mover" if strong and effect < 0 else "name-mover"
        elif best == "END->S2" and strong and effect > 0:
            role = "s-suppression"
        else:
            role = ROLE_OF_PATTERN[best]
        roles[(layer, head)] = role
    return roles


# -- iterative path patching -----------------------------------------------------------------
def experiments_per_pass(logits: Tensor, budget: int = 2**26) -> int:
    """How many experiments fit in one pass whose logits hold at most ``budget`` floats."""
    return max(1, min(64, budget // logits.numel()))


def run_step(
    model: iv.Model,
    ds: ioi.Dataset,
    name: str,
    receivers: list[Head] | str,
    reference: tuple[float, float],
    threshold: float,
    per_pass: int,
) -> Step:
    """One path-patching step: every head alone as sender to ``receivers``."""
    clean, corrupted = reference

    def metric(logits: Tensor) -> Tensor:
        return ioi.logit_diff(logits, ds).mean()

    result = path_patching(
        model, ds.clean, ds.corrupted, metric, senders="heads", receivers=receivers,
        experiments_per_pass=per_pass, progress=False,
    )  # fmt: skip
    effect = (result.values - clean) / (clean - corrupted)
    order = effect.abs().flatten().argsort(descending=True)
    found = [divmod(int(i), model.n_heads) for i in order if effect.flatten()[i].abs() >= threshold]
    return Step(name, receivers, effect, found)


def discover(
    model: iv.Model,
    ds: ioi.Dataset,
    reference: tuple[float, float],
    scores: dict[str, Tensor],
    threshold: float,
    per_pass: int = 16,
) -> tuple[list[Step], dict[HeadId, str]]:
    """The four steps of Wang et al.; each step's receivers are heads of the role found before.

    Args:
        model: The model.
        ds: The IOI prompts.
        reference: The clean and the ABC runs' mean logit difference.
        scores: Every head's attention scores (:func:`attention_scores`).
        threshold: Keep heads with ``|effect| >= threshold``.
        per_pass: Path-patching experiments per forward pass.

    Returns:
        The steps and the role of every found head (in order of discovery).
    """
    end = ds.pos["END"]

    def queries(head: HeadId) -> list[Head]:
        return [Head(*head, input="q", pos=end)]

    def keys_and_values(head: HeadId) -> list[Head]:
        return [Head(*head, input="k"), Head(*head, input="v")]

    plan = [  # (name, roles of the receivers, their inputs)
        ("heads -> name movers' queries", {"name-mover", "s-suppression"}, queries),
        ("heads -> S-inhibition heads' keys and values", {"s-inhibition"}, keys_and_values),
        ("heads -> induction heads' keys", {"induction"}, lambda h: [Head(*h, input="k")]),
    ]
    steps = [run_step(model, ds, "heads -> logits", "logits", reference, threshold, per_pass)]
    roles = classify(scores, direct_effects(model, ds, steps[0].found), reference[0])
    for name, wanted, inputs in plan:
        heads = [h for h, r in roles.items() if r in wanted]
        if not any(layer > 0 for layer, _ in heads):
            steps.append(Step(name, [], None, [], skipped(heads)))
            continue
        receivers = [node for h in heads for node in inputs(h)]
        step = run_step(model, ds, name, receivers, reference, threshold, per_pass)
        new = [h for h in step.found if h not in roles]
        roles.update(classify(scores, direct_effects(model, ds, new), reference[0]))
        steps.append(step)
    return steps, roles


def skipped(heads: list[HeadId]) -> str:
    """Why a step did not run."""
    if not heads:
        return "skipped: no receivers (no head of that role was found)"
    return "skipped: the receivers are in layer 0, no head can send to them"


# -- faithfulness -----------------------------------------------------------------------------
def ablated(
    model: iv.Model, ds: ioi.Dataset, keep: list[HeadId], means: list[Tensor]
) -> tuple[float, float]:
    """Logit difference and accuracy with every head outside ``keep`` mean-ablated.

    The protocol: each ablated head's z, at every position, is replaced by its mean
    over the ABC prompts of the same template (``means``, from ``head_means``).
    """
    logits = run_circuit(model, ds.clean, keep, means, groups=ds.template)
    return behaviour(logits, ds)


def random_sets(
    model: iv.Model, ds: ioi.Dataset, size: int, n_sets: int, seed: int, means: list[Tensor]
) -> tuple[float, float]:
    """Mean logit difference and accuracy over ``n_sets`` random head sets of ``size``."""
    generator = torch.Generator().manual_seed(seed)
    n_heads = model.n_layers * model.n_heads
    results = []
    for _ in range(n_sets):
        chosen = torch.randperm(n_heads, generator=generator)[:size]
        chosen = [divmod(int(i), model.n_heads) for i in chosen]
        results.append(ablated(model, ds, chosen, means))
    ld, acc = zip(*results, strict=True)
    return sum(ld) / n_sets, sum(acc) / n_sets


# -- plots ------------------------------------------------------------------------------------
def plot_steps(steps: list[Step], out: Path) -> Path:
    """The effects of every step as layer x head heatmaps (one colour scale); found heads boxed."""
    plt = _pyplot()
    ran = [(i, step) for i, step in enumerate(steps, 1) if step.effect is not None]
    fig, axes = plt.subplots(
        1, len(ran), figsize=(0.5 + 3.2 * len(ran), 3.4), squeeze=False, layout="constrained"
    )
    scale = max(max(float(step.effect.abs().max()) for _, step in ran), 1e-6)
    for ax, (i, step) in zip(axes[0], ran, strict=True):
        effect = step.effect.float()
        image = ax.imshow(effect.numpy(), cmap="RdBu", vmin=-scale, vmax=scale, aspect="auto")
        for layer, head in step.found:
            ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, lw=2))
        ax.set_xticks(range(effect.shape[1]))
        ax.set_yticks(range(effect.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{i}. {step.name}", fontsize=9)
        if not step.found:  # say so rather than show a blank panel
            ax.text((effect.shape[1] - 1) / 2, (effect.shape[0] - 1) / 2,
                    f"no head found:\nmax |effect| {float(effect.abs().max()):.3f}",
                    ha="center", va="center", fontsize=9,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "grey"})  # fmt: skip
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(
        "path patching: effect on logit(IO) - logit(S), fraction of clean - ABC (boxed: found)"
    )
    path = common.out_file(out, "ioi_path_patching.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attention(
    model: iv.Model, ds: ioi.Dataset, roles: dict[HeadId, str], tokenizer: Any, out: Path
) -> Path:
    """The attention patterns of the found heads on the first prompt."""
    plt = _pyplot()
    n = int(ds.pos["END"][0]) + 1
    ids = ds.clean[:1, :n]
    with iv.trace(model, ids) as t:
        saved = {h: t.layer[h[0]].attn.head[h[1]].pattern[0].save() for h in roles}
    labels = tokenizer.convert_ids_to_tokens(ids[0].tolist()) if tokenizer else range(n)
    cols = min(4, max(1, len(roles)))
    rows = -(-max(1, len(roles)) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols, 3.8 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    image = None
    for ax, (head, role) in zip(axes.flat, roles.items(), strict=False):
        ax.axis("on")
        image = ax.imshow(saved[head].value.float().numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{head[0]}.{head[1]} {role}", fontsize=9)
        ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), labels, fontsize=6)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    fig.suptitle("attention of the found heads on one prompt (rows: query, columns: key)")
    path = common.out_file(out, "ioi_attention.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- printing ---------------------------------------------------------------------------------
def print_step(i: int, step: Step, roles: dict[HeadId, str]) -> None:
    """The step's strongest heads (or why it was skipped)."""
    print(f"\nStep {i}: {step.name}")
    effect = step.effect
    if effect is None:
        print(step.note)
        return
    top = effect.abs().flatten().argsort(descending=True)[: max(5, len(step.found))]
    rows = []
    for index in top:
        head = divmod(int(index), effect.shape[1])
        kept = "yes" if head in step.found else ""
        rows.append((f"{head[0]}.{head[1]}", float(effect[head]), kept, roles.get(head, "")))
    print(common.table(rows, ["head", "effect", "found", "role"]))


def circuit_table(
    roles: dict[HeadId, str], scores: dict[str, Tensor], effects: dict[HeadId, float]
) -> str:
    """The found heads with their role, attention scores and direct effect."""
    names = [name for name, _, _ in ATTENTION]
    rows = [
        (f"{h[0]}.{h[1]}", role, *(float(scores[k][h]) for k in names), effects[h])
        for h, role in roles.items()
    ]
    return common.table(rows, ["head", "role", *names, "direct effect"])


def faithfulness(
    model: iv.Model, ds: ioi.Dataset, keep: list[HeadId], clean: tuple[float, float], args: Any
) -> dict[str, float]:
    """Mean-ablate all heads but ``keep`` (and random sets of its size); print and return."""
    n_heads = model.n_layers * model.n_heads
    if len(keep) > n_heads // 2:
        print(f"\nwarning: the circuit has {len(keep)} heads, more than half of {n_heads}; "
              "raise --threshold for a smaller one.")  # fmt: skip
    means = head_means(model, ds.corrupted, ds.template)  # one pass for every ablation
    circuit = ablated(model, ds, keep, means)
    rand = random_sets(model, ds, len(keep), args.random_sets, args.seed, means)
    nothing = ablated(model, ds, [], means)
    print("\nFaithfulness: every head outside the set is mean-ablated (its z, at all positions, "
          "is replaced by its mean over the ABC prompts of the same template).")  # fmt: skip
    print(common.table([
        ("full model", n_heads, clean[0], 1.0, clean[1]),
        ("circuit", len(keep), circuit[0], circuit[0] / clean[0], circuit[1]),
        (f"random sets (mean of {args.random_sets})", len(keep), rand[0], rand[0] / clean[0],
         rand[1]),
        ("no heads", 0, nothing[0], nothing[0] / clean[0], nothing[1]),
    ], ["heads kept", "n", "logit diff", "kept", "accuracy"]))  # fmt: skip
    return {
        "circuit_logit_diff": circuit[0],
        "circuit_kept": circuit[0] / clean[0],
        "circuit_accuracy": circuit[1],
        "random_kept": rand[0] / clean[0],
        "random_accuracy": rand[1],
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the summary numbers it printed."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = common.load(args.model, args.backend)
    if tokenizer is None:
        raise SystemExit(f"--model {args.model!r} has no tokenizer: IOI prompts need one.")
    ds = ioi.make_dataset(tokenizer, n=args.prompts, seed=args.seed)
    n_heads = model.n_layers * model.n_heads
    print(f"IOI on {args.model} ({model.n_layers} layers x {model.n_heads} heads), "
          f"{args.prompts} prompts, backend {args.backend}.")  # fmt: skip
    print(f'Example: "{ds.text[0].strip()}"\n')

    logits = plain_logits(model, ds.clean)
    clean = behaviour(logits, ds)
    corrupted = behaviour(plain_logits(model, ds.corrupted), ds)
    print("logit diff: logit(IO) - logit(S) at END, mean over prompts; accuracy: the IO logit "
          "is the highest of all names.")  # fmt: skip
    print(common.table([("clean", *clean), ("ABC (corrupted)", *corrupted)],
                       ["prompts", "logit diff", "accuracy"]))  # fmt: skip

    scores = attention_scores(model, ds)
    per_pass = experiments_per_pass(logits)
    steps, roles = discover(model, ds, (clean[0], corrupted[0]), scores, args.threshold, per_pass)
    print("\nPath patching: effect = (patched - clean) / (clean - ABC) logit difference; "
          f"found: |effect| >= {args.threshold}.")  # fmt: skip
    for i, step in enumerate(steps, 1):
        print_step(i, step, roles)

    effects = direct_effects(model, ds, list(roles))
    print(f"\nThe circuit: {len(roles)} of {n_heads} heads. Attention: mean over prompts; "
          "direct effect: change in logit diff when the head's output is removed from the "
          "stream the unembedding reads.")  # fmt: skip
    print(circuit_table(roles, scores, effects))

    faithful = faithfulness(model, ds, list(roles), clean, args)
    plots = [plot_steps(steps, args.out), plot_attention(model, ds, roles, tokenizer, args.out)]
    print(f"\nPlots: {', '.join(str(p) for p in plots)}")
    print(f"Done in {time.perf_counter() - start:.1f} s.")
    summary = {
        "logit_diff": clean[0],
        "accuracy": clean[1],
        "corrupted_logit_diff": corrupted[0],
        "circuit": [(layer, head, role) for (layer, head), role in roles.items()],
        "steps": {step.name: step.effect for step in steps if step.effect is not None},
        **faithful,
        "n_heads": n_heads,
        "plots": plots,
    }
    if common.is_bundled(args.model, "ioi"):
        checks = expectations(summary, smoke=args.smoke)
    elif common.is_bundled(args.model, "ioi_circuit"):
        checks = planted_expectations(summary)
    else:
        checks = []
    summary["passed"] = common.verdict(checks)
    common.finish(summary["passed"])
    return summary


def expectations(summary: dict, smoke: bool = False) -> list[common.Check]:
    """The checks of the help text's "What to expect" for the bundled ``models/ioi``.

    With ``smoke`` (32 prompts) the circuit's accuracy is not checked: on so few prompts
    a weak name-copying head can fall under the threshold and out of the circuit.
    """
    size, n_heads = len(summary["circuit"]), summary["n_heads"]
    check = common.check
    checks = [
        check("clean accuracy >= 0.95", summary["accuracy"], summary["accuracy"] >= 0.95),
        check("circuit: at most half of the heads", f"{size} of {n_heads}",
              0 < size <= n_heads // 2),
        check("circuit keeps >= 0.80 of the logit diff", summary["circuit_kept"],
              summary["circuit_kept"] >= 0.80),
        check("circuit accuracy >= 0.90", summary["circuit_accuracy"],
              summary["circuit_accuracy"] >= 0.90),
        check("random sets of that size keep less", summary["random_kept"],
              summary["random_kept"] < summary["circuit_kept"]),
    ]  # fmt: skip
    if smoke:
        print("\n(--smoke: the circuit's accuracy is checked on the default 256 prompts only)")
        del checks[3]
    return checks


def planted_expectations(summary: dict) -> list[common.Check]:
    """The checks for the hand-built ``models/ioi_circuit``: its planted heads and roles."""
    planted = json.loads((common.MODELS / "ioi_circuit" / "circuit.json").read_text())
    want = sorted((h["layer"], h["head"], h["role"]) for h in planted)
    got = sorted(summary["circuit"])
    check = common.check
    return [
        check("circuit = the planted heads, each in its role",
              ", ".join(f"{layer}.{head} {role}" for layer, head, role in got), got == want),
        check("circuit keeps >= 0.99 of the logit diff", summary["circuit_kept"],
              summary["circuit_kept"] >= 0.99),
    ]  # fmt: skip


if __name__ == "__main__":
    main()

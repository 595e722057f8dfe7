"""Distributed alignment search (DAS) on the hierarchical equality task.

The task: four entities w, x, y, z (random 4-d vectors from a pool of 20); the label
is (w == x) == (y == z). A 3-layer ReLU MLP (hidden width 16) solves it. The
high-level causal model computes two variables, WX = (w == x) and YZ = (y == z),
then compares them. Is that how the MLP works, and where?

DAS (Geiger et al. 2023) answers with interchange interventions in a learned basis:
at a hidden layer, a rotation R (16 x 16, orthogonal) is trained so that the first 8
rotated dimensions hold WX and the next 8 hold YZ. An interchange takes WX's 8
dimensions from one source input and YZ's from another, and the model should then
answer what the causal model answers with WX and YZ taken from those sources. The
score is interchange intervention accuracy (IIA) on held-out examples (each
intervenes on WX, on YZ or on both). The rotation uses the Cayley map, trained
with Adam at lr 1e-2 (it trains faster and better than the matrix exponential).

Baselines at every layer, on the same test examples:
  neurons    the same interchange with no rotation: WX = the first 8 neurons, YZ = the last 8
  random     random fixed rotations (untrained; the mean over --random-rotations)
  untrained  DAS (trained as above) on an untrained, randomly initialised MLP
  boundless  Boundless DAS: one learned rotation and boundary per variable
             (iv.BoundlessRotatedSpace), a soft mask annealed to a hard cut

What to expect (the bundled MLP, or --retrain; each of these is checked by the verdict
that ends a run, for the methods and layers it ran): the MLP reaches >= 0.99 test
accuracy; at layer 1 DAS reaches IIA >= 0.93 and Boundless DAS too, while the
neuron-aligned split stays <= 0.75, the random rotation <= 0.65 and the untrained
MLP <= 0.55 (chance is 0.5: the counterfactual labels are fair coins, independent of
the base's label); DAS at layers 2 and 3 aligns less well than at layer 1.

--model is a directory holding an EqualityMLP (config.json + model.safetensors, as
written by models/train_hierarchical_equality.py), not a causal LM; --retrain trains
a fresh one with --seed instead. The backend is torch or nnsight
(the sites are t.module("layer1").output, ...); transformer_lens runs transformers
only.

Run:  python recipes/das.py [--seed 0] [--retrain] [--layers 1 2 3] [--smoke]
It prints how long it took (docs/recipes/das.md quotes a measured run); the plot (IIA
per layer and method) goes to --out/das_iia.png. The exit status is 1 if an
expectation fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import tracevene as iv
from tracevene.models.equality import EqualityMLP, train_mlp
from tracevene.tasks import hierarchical_equality as he

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("das", "neurons", "random", "untrained", "boundless")
DEFAULT_MODEL = "hierarchical_equality"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The common options, with --model for an MLP directory, plus this recipe's own."""
    model_help = (
        "an EqualityMLP directory (config.json + model.safetensors), not a causal LM "
        f"(default: the bundled models/{DEFAULT_MODEL})"
    )
    p = common.parser(__doc__, DEFAULT_MODEL, model_help=model_help)
    p.add_argument("--retrain", action="store_true",
                   help="train a fresh MLP with --seed instead of loading --model")  # fmt: skip
    p.add_argument("--train-steps", type=int, default=3000,
                   help="optimizer steps of the MLP with --retrain (default: 3000)")  # fmt: skip
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="hidden layers to search, 1-based (default: all)")  # fmt: skip
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="methods to run (default: all)")  # fmt: skip
    p.add_argument("--batches", type=int, default=200,
                   help="training batches of 256 examples per epoch (default: 200)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=2, help="DAS training epochs (default: 2)")
    p.add_argument("--lr", type=float, default=1e-2, help="DAS learning rate (default: 1e-2)")
    p.add_argument("--test", type=int, default=4096,
                   help="held-out interchange examples (default: 4096)")  # fmt: skip
    p.add_argument("--random-rotations", type=int, default=5,
                   help="rotations the 'random' baseline averages (default: 5)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1, the fastest here)")  # fmt: skip
    args = p.parse_args(argv)
    if args.backend == "transformer_lens":
        p.error(
            "--backend transformer_lens runs transformers only, and this recipe's model is "
            "an MLP: use --backend torch (the default) or nnsight, which reach any module "
            'through t.module("layer1").output.'
        )
    if args.smoke:
        args.batches, args.epochs, args.test, args.train_steps = 40, 1, 1024, 1000
    return args


# -- the model ------------------------------------------------------------------------------
def load_mlp(args: argparse.Namespace) -> EqualityMLP:
    """The bundled (or --model) MLP, or a fresh one trained with --seed (--retrain)."""
    if args.retrain:
        return train_mlp(seed=args.seed, steps=args.train_steps)
    path = Path(common.model_path(args.model))
    try:
        return EqualityMLP.load(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot load --model {args.model!r}: {e}") from e


def untrained_like(mlp: EqualityMLP, seed: int) -> EqualityMLP:
    """A randomly initialised MLP of the same shape and entity pool."""
    torch.manual_seed(seed + 12345)
    kwargs = {k: v for k, v in mlp.config.items() if k != "model_type"}
    fresh = EqualityMLP(**kwargs)
    fresh.entities.copy_(mlp.entities)
    return fresh.eval()


def make_data(
    pool: torch.Tensor, batches: int, test: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """Training batches (``batches`` x 256) and test batches (``test`` examples, by 512)."""
    return (
        he.counterfactual_batches(pool, batches, 256, seed=seed),
        he.counterfactual_batches(pool, max(test // 512, 1), 512, seed=20_000 + seed),
    )


# -- one intervention program per method ----------------------------------------------------
def program_for(model: iv.Model, layer: str, method: str, d: int) -> iv.Program:
    """The interchange program of ``method`` at the output of module ``layer``.

    Two sources: the first gives WX, the second YZ (see
    :func:`tracevene.tasks.hierarchical_equality.counterfactual_batches`).
    """
    half = {"WX": d // 2, "YZ": d - d // 2}
    with iv.trace(model) as t:
        src_wx, src_yz = t.source(), t.source()
        h, h_wx, h_yz = (r.module(layer).output for r in (t, src_wx, src_yz))
        if method == "neurons":
            t.module(layer).output[:, : half["WX"]] = h_wx[:, : half["WX"]]
            t.module(layer).output[:, half["WX"] :] = h_yz[:, half["WX"] :]
        elif method == "boundless":
            wx, yz = iv.BoundlessRotatedSpace(d), iv.BoundlessRotatedSpace(d)
            t.module(layer).output = yz(wx(h, h_wx), h_yz)
        else:  # das, random, untrained
            rot = iv.RotatedSpace(d, variables=half)
            t.module(layer).output = rot(rot(h, h_wx, variable="WX"), h_yz, variable="YZ")
    return t.program


def run_method(
    mlp: EqualityMLP,
    layer: str,
    method: str,
    data: tuple[list[dict], list[dict]],
    args: argparse.Namespace,
) -> float:
    """IIA of one method at one layer on the test examples (after training, if it trains)."""
    model = iv.wrap(mlp, backend=args.backend)
    torch.manual_seed(args.seed)  # the same initial rotation for every trained method
    d = mlp.config["hidden"]
    program = program_for(model, layer, method, d)
    train, test = data
    if method == "random":  # the mean over several fixed random rotations
        scores = [iv.evaluate(program, model, test, progress=False)]
        for _ in range(args.random_rotations - 1):
            scores.append(iv.evaluate(program_for(model, layer, method, d), model, test,
                                      progress=False))  # fmt: skip
        return sum(scores) / len(scores)
    if method in ("das", "untrained", "boundless"):
        lr = args.lr * (3 if method == "boundless" else 1)
        iv.train(program, model, train, epochs=args.epochs, lr=lr, seed=args.seed,
                 progress=False)  # fmt: skip
    return iv.evaluate(program, model, test, progress=False)


# -- output ---------------------------------------------------------------------------------
def plot(iia: dict[str, dict[int, float]], layers: list[int], path: Path, title: str) -> None:
    """A grouped bar chart: IIA per layer (groups) and method (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(iia)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(layers), 3.4))
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(layers))]
        ax.bar(xs, [iia[method][layer] for layer in layers], width, label=method)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("IIA")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the summary numbers it printed.

    Returns:
        ``{"accuracy": test accuracy of the MLP, "untrained_accuracy": the untrained
        one's, "iia": {method: {layer: IIA}}, "plot": path of the plot}``.
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    mlp = load_mlp(args)
    source = f"trained with seed {args.seed}" if args.retrain else f"loaded from {args.model}"
    x, y = he.factual_data(mlp.entities, 10_000, seed=10_000 + args.seed)
    accuracy = he.accuracy(mlp, x, y)
    untrained = untrained_like(mlp, args.seed)
    untrained_accuracy = he.accuracy(untrained, x, y)
    n_layers = mlp.config["n_layers"]
    layers = args.layers or list(range(1, n_layers + 1))
    bad = [layer for layer in layers if not 1 <= layer <= n_layers]
    if bad:
        raise SystemExit(f"--layers {bad}: this MLP has hidden layers 1..{n_layers}")
    print(f"MLP ({source}): test accuracy {accuracy:.4f} on 10000 examples "
          f"(untrained MLP: {untrained_accuracy:.4f}).")  # fmt: skip

    data = make_data(mlp.entities, args.batches, args.test, args.seed)
    iia: dict[str, dict[int, float]] = {m: {} for m in args.methods}
    for layer in layers:
        for method in args.methods:
            net = untrained if method == "untrained" else mlp
            iia[method][layer] = run_method(net, f"layer{layer}", method, data, args)

    n_test = sum(len(b["labels"]) for b in data[1])
    print(f"\nIIA on {n_test} held-out interchange examples (each intervenes on WX, YZ or "
          f"both; chance 0.5), {args.epochs} epoch(s) of {args.batches} batches of 256, "
          f"backend {args.backend}:\n")  # fmt: skip
    rows = [(f"layer {layer}", *(iia[m][layer] for m in args.methods)) for layer in layers]
    print(common.table(rows, ["site", *args.methods]))
    path = common.out_file(args.out, "das_iia.png")
    plot(iia, layers, path, f"DAS on hierarchical equality (MLP {source})")
    print(f"\nPlot: {path}. Done in {time.perf_counter() - start:.1f} s.")
    summary = {
        "accuracy": accuracy,
        "untrained_accuracy": untrained_accuracy,
        "iia": iia,
        "plot": str(path),
    }
    stated = args.retrain or common.is_bundled(args.model, DEFAULT_MODEL)
    summary["passed"] = common.verdict(expectations(summary) if stated else [])
    common.finish(summary["passed"])
    return summary


# At layer 1: (method, expectation, test) for the methods that ran.
LAYER_1 = (
    ("das", ">= 0.93", lambda v: v >= 0.93),
    ("boundless", ">= 0.93", lambda v: v >= 0.93),
    ("neurons", "<= 0.75", lambda v: v <= 0.75),
    ("random", "<= 0.65", lambda v: v <= 0.65),
    ("untrained", "<= 0.55", lambda v: v <= 0.55),
)


def expectations(summary: dict) -> list[common.Check]:
    """The checks of the help text's "What to expect", for the methods and layers run."""
    iia = summary["iia"]
    checks = [common.check("MLP test accuracy >= 0.99", summary["accuracy"],
                           summary["accuracy"] >= 0.99)]  # fmt: skip
    for method, expected, holds in LAYER_1:
        if 1 in iia.get(method, {}):
            value = iia[method][1]
            checks.append(common.check(f"layer 1, {method}: IIA {expected}", value, holds(value)))
    for layer in (2, 3):
        if 1 in iia.get("das", {}) and layer in iia["das"]:
            value = iia["das"][layer]
            checks.append(common.check(f"layer {layer}, das: IIA below layer 1's", value,
                                       value < iia["das"][1]))  # fmt: skip
    return checks


if __name__ == "__main__":
    main()

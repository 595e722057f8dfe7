"""Quickstart: train a tiny GPT-2 to repeat a sequence, then intervene on it with tracevene.

The task: a sequence of N random tokens followed by the same N tokens again
(``BOS x1 .. xN x1 .. xN``). After training (100 steps by default), the model copies the
first half into the second. Each experiment uses a *base* sequence and a *source*
sequence that differ in one token of the first half (position K), so at the query
position Q (the second-half position just before the copy of x_K) the model predicts
x_K on the base and the source's token on the source. The metric is the logit
difference

    logit_diff = logit(base token) - logit(source token)   at position Q,

which is large and positive on the base and negative on the source. Each
intervention runs the base with something changed, and the table reports the
metric and the fraction of the base -> source change it produces (0 = base,
1 = source).

What to expect (each of these is checked by the verdict that ends a run): the model
learns to copy (>= 95% accuracy on the repeated half), and it copies within layer 0
(attention there moves the token at position K to position Q). Interchanging
resid_pre of layer 0 at K, or of layer 1 at Q, gives the source's answer (effect >=
0.95), while layer 1 at K does nothing (<= 0.05): the token has left K by then. The
activation-patching sweep shows the same move: its only cells with effect >= 0.5 are
layer 0 at K and layers 1 (resid_pre, resid_post) at Q. No single head is necessary
(zero-ablating any one head moves the effect by <= 0.1: the heads of layer 0 are
redundant), while ablating all of layer 0's heads destroys the copy (the logit
difference falls to <= 20% of the base run's). Steering along the unembedding
direction of the source token moves the metric monotonically with the scale.

Run:  python recipes/quickstart.py [--seed 0] [--steps 100] [--pairs 64] [--threads 1]
Offline, CPU only; it prints how long training and the whole run took. The exit
status is 1 if an expectation fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import tracevene as iv  # noqa: E402

VOCAB = 32  # token 0 is BOS; the sequences use tokens 1..31
N = 6  # length of the sequence that is repeated
K = 3  # the first-half position where base and source differ
Q = N + K - 1  # the query position: holds x_{K-1}, the model should predict x_K there


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="experiments: interchange of resid_pre at one position from the source,\n"
        "zero-ablation of each attention head, steering by adding a vector to the\n"
        "residual stream, and an activation-patching sweep over layers x positions\n"
        "for one base/source pair.",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--steps", type=int, default=100, help="training steps for the tiny model (default: 100)"
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default: 1, the fastest for a model this small)",
    )  # fmt: skip
    parser.add_argument(
        "--pairs", type=int, default=64, help="base/source pairs per experiment (default: 64)"
    )
    return parser.parse_args(argv)


# -- data and model -------------------------------------------------------------------
def repeated_sequences(batch: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, 2N + 1]`` token ids: BOS, N random tokens, the same N tokens again."""
    x = torch.randint(1, VOCAB, (batch, N), generator=generator)
    return torch.cat([torch.zeros(batch, 1, dtype=torch.long), x, x], dim=1)


def make_pairs(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Base sequences, and sources that differ from them only at first-half position K."""
    base = repeated_sequences(batch, generator)
    shift = torch.randint(1, VOCAB - 1, (batch,), generator=generator)
    source = base.clone()
    source[:, K] = (base[:, K] - 1 + shift) % (VOCAB - 1) + 1  # another token in 1..31
    return base, source


def train_model(steps: int, generator: torch.Generator) -> tuple[torch.nn.Module, float]:
    """A 2-layer GPT-2 trained to predict the repeated half; returns it and its accuracy."""
    config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=32, n_inner=64, vocab_size=VOCAB, n_positions=2 * N + 1,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager",  # the fastest for 13 positions
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        ids = repeated_sequences(64, generator)
        logits = model(ids).logits[:, N:-1]  # predictions of the repeated half
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), ids[:, N + 1 :].flatten()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        ids = repeated_sequences(256, generator)
        accuracy = (model(ids).logits[:, N:-1].argmax(-1) == ids[:, N + 1 :]).float().mean()
    return model, accuracy.item()


# -- the metric ---------------------------------------------------------------------------
def logit_diff(logits, base: torch.Tensor, source: torch.Tensor):
    """Mean logit(base token) - logit(source token) at position Q.

    Works on a plain tensor and on a traced value inside a with-block alike.
    """
    rows = torch.arange(base.shape[0])
    at_query = logits[:, Q]
    return (at_query[rows, base[:, K]] - at_query[rows, source[:, K]]).mean()


# -- experiments ---------------------------------------------------------------------------
def run_experiments(
    model: iv.Model, base: torch.Tensor, source: torch.Tensor
) -> tuple[list[tuple[str, float]], iv.Program]:
    """``(name, logit diff)`` for the reference runs and each intervention, and one program."""
    rows: list[tuple[str, float]] = []

    def measure(name: str, intervene, with_source: bool = False) -> iv.Program:
        with iv.trace(model, base) as t:
            src = t.source(source) if with_source else None
            intervene(t, src)
            ld = logit_diff(t.logits, base, source).save()
        rows.append((name, ld.value.item()))
        return t.program

    measure("none (base run)", lambda t, src: None)
    with iv.trace(model, source) as t:  # the source run itself, for reference
        ld = logit_diff(t.logits, base, source).save()
    rows.append(("none (source run)", ld.value.item()))

    def interchange(layer: int, pos: int):
        def intervene(t, src):
            t.layer[layer].resid_pre[:, pos] = src.layer[layer].resid_pre[:, pos]

        return intervene

    program = measure(f"interchange layer[0].resid_pre[:, {K}]", interchange(0, K), True)
    measure(f"interchange layer[1].resid_pre[:, {K}]", interchange(1, K), True)
    measure(f"interchange layer[1].resid_pre[:, {Q}]", interchange(1, Q), True)

    for layer in range(model.n_layers):
        for head in range(model.n_heads):

            def ablate(t, src, layer=layer, head=head):
                t.layer[layer].attn.head[head].z = 0  # zero-ablate one head

            measure(f"zero-ablate layer[{layer}].attn.head[{head}]", ablate)

    def ablate_layer0(t, src):
        for head in range(model.n_heads):  # a loop over plain ints unrolls into the program
            t.layer[0].attn.head[head].z = 0

    measure(f"zero-ablate all {model.n_heads} heads of layer[0]", ablate_layer0)

    # Steering: push the final residual stream at Q along W_U[source token] - W_U[base token].
    unembed = model.module.lm_head.weight.detach()  # [vocab, d_model]
    direction = unembed[source[:, K]] - unembed[base[:, K]]
    direction = direction / direction.norm(dim=-1, keepdim=True)
    for scale in (5.0, 10.0, 20.0):

        def steer(t, src, vector=scale * direction):
            t.layer[-1].resid_post[:, Q] += vector

        measure(f"steer layer[{model.n_layers - 1}].resid_post[:, {Q}] += {scale:g} * d", steer)
    return rows, program


def patching_sweep(model: iv.Model, base: torch.Tensor, source: torch.Tensor) -> list[tuple]:
    """Activation patching of one pair: for each residual site and position, the metric.

    One program per site, recorded once with a placeholder for the position and run
    again for every position with ``program.run(..., pos=p)``.
    """
    sites = [(f"layer[{i}].resid_pre", lambda run, i=i: run.layer[i].resid_pre)
             for i in range(model.n_layers)]  # fmt: skip
    sites.append((f"layer[{model.n_layers - 1}].resid_post", lambda run: run.layer[-1].resid_post))
    table = []
    for name, site in sites:
        with iv.trace(model) as t:  # no inputs: only records the program
            pos = t.arg("pos")
            src = t.source()
            site(t)[:, pos] = site(src)[:, pos]
            logit_diff(t.logits, base, source).save("logit_diff")
        values = [
            t.program.run(model, base, [source], pos=p)["logit_diff"].item()
            for p in range(base.shape[1])
        ]
        table.append((name, values))
    return table


# -- printing -------------------------------------------------------------------------------
def fraction(value: float, clean: float, corrupt: float) -> float:
    """0 at the base run's metric, 1 at the source run's (rounded, without a -0.00)."""
    return round((value - clean) / (corrupt - clean), 2) + 0.0


def print_table(rows: list[tuple]) -> None:
    clean, corrupt = rows[0][1], rows[1][1]
    width = max(len(name) for name, _ in rows)
    print(f"{'intervention':<{width}}  {'logit diff':>10}  {'effect':>6}")
    print(f"{'-' * width}  {'-' * 10}  {'-' * 6}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10.3f}  {fraction(value, clean, corrupt):>6.2f}")


def print_sweep(table: list[tuple], base: torch.Tensor, source: torch.Tensor, rows) -> None:
    clean, corrupt = rows
    width = max(len(name) for name, _ in table)
    positions = range(base.shape[1])
    print(f"{'position':<{width}}" + "".join(f"{p:>6}" for p in positions))
    print(f"{'base token':<{width}}" + "".join(f"{int(x):>6}" for x in base[0]))
    print(f"{'source token':<{width}}" + "".join(f"{int(x):>6}" for x in source[0]))
    print("-" * (width + 6 * len(positions)))
    for name, values in table:
        cells = "".join(f"{fraction(v, clean, corrupt):>6.2f}" for v in values)
        print(f"{name:<{width}}{cells}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    start = time.perf_counter()
    hf_model, accuracy = train_model(args.steps, generator)
    print(
        f"Trained a 2-layer GPT-2 (d_model 32, 4 heads) for {args.steps} steps in "
        f"{time.perf_counter() - start:.1f} s: it predicts the repeated half with "
        f"{accuracy:.1%} accuracy.\n"
    )
    model = iv.wrap(hf_model, backend="torch")

    base, source = make_pairs(args.pairs, generator)
    rows, program = run_experiments(model, base, source)
    print(f"The interchange intervention at layer 0, position {K}, as a program:")
    print(program, end="\n\n")
    print(
        f"{args.pairs} base/source pairs differing at position {K}; metric at position {Q}: "
        "logit(base token) - logit(source token), averaged.\n"
        "effect: 0 = as on the base run, 1 = as on the source run. "
        "d = unit vector along W_U[source token] - W_U[base token].\n"
    )
    print_table(rows)

    pair_base, pair_source = base[:1], source[:1]
    with iv.trace(model, pair_base) as t:
        clean = logit_diff(t.logits, pair_base, pair_source).save()
    with iv.trace(model, pair_source) as t:
        corrupt = logit_diff(t.logits, pair_base, pair_source).save()
    sweep = patching_sweep(model, pair_base, pair_source)
    print(
        "\nActivation patching, one pair: effect of copying one residual-stream vector "
        "(site x position) from the source into the base (0 = base, 1 = source).\n"
    )
    print_sweep(sweep, pair_base, pair_source, (clean.value.item(), corrupt.value.item()))
    print(f"\nDone in {time.perf_counter() - start:.1f} s.")
    passed = common.verdict(expectations(accuracy, rows, sweep, clean.value.item(),
                                         corrupt.value.item()))  # fmt: skip
    return 0 if passed else 1


def expectations(
    accuracy: float, rows: list[tuple], sweep: list[tuple], pair_base: float, pair_source: float
) -> list[common.Check]:
    """The checks of the help text's "What to expect"."""
    base, source = rows[0][1], rows[1][1]
    effect = {name: (value - base) / (source - base) for name, value in rows}
    heads = [v for name, v in effect.items() if name.startswith("zero-ablate layer[")]
    ablate_all = next(v for name, v in rows if name.startswith("zero-ablate all"))
    steering = [v for name, v in effect.items() if name.startswith("steer")]
    strong = sorted(
        f"{name}@{p}" for name, values in sweep for p, v in enumerate(values)
        if (v - pair_base) / (pair_source - pair_base) >= 0.5
    )  # fmt: skip
    want = sorted([f"layer[0].resid_pre@{K}", f"layer[1].resid_pre@{Q}",
                   f"layer[1].resid_post@{Q}"])  # fmt: skip
    check = common.check
    return [
        check("accuracy on the repeated half >= 0.95", accuracy, accuracy >= 0.95),
        check(f"interchange layer[0].resid_pre at {K}: effect >= 0.95",
              effect[f"interchange layer[0].resid_pre[:, {K}]"],
              effect[f"interchange layer[0].resid_pre[:, {K}]"] >= 0.95),
        check(f"interchange layer[1].resid_pre at {Q}: effect >= 0.95",
              effect[f"interchange layer[1].resid_pre[:, {Q}]"],
              effect[f"interchange layer[1].resid_pre[:, {Q}]"] >= 0.95),
        check(f"interchange layer[1].resid_pre at {K}: |effect| <= 0.05",
              effect[f"interchange layer[1].resid_pre[:, {K}]"],
              abs(effect[f"interchange layer[1].resid_pre[:, {K}]"]) <= 0.05),
        check("sweep: effect >= 0.5 only at layer 0 at K and layer 1 at Q", ", ".join(strong),
              strong == want),
        check("any one head zero-ablated: |effect| <= 0.1 (max)", max(map(abs, heads)),
              max(map(abs, heads)) <= 0.1),
        check("all layer-0 heads ablated: logit diff <= 20% of the base run's",
              ablate_all / base, abs(ablate_all) <= 0.2 * abs(base)),
        check("steering: effect grows with the scale (5, 10, 20)",
              ", ".join(f"{v:.2f}" for v in steering),
              all(a < b for a, b in zip(steering, steering[1:], strict=False))),
    ]  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())

"""Train the bundled IOI model: a 4-layer, 4-head attention-only GPT-2 -> ``models/ioi/``.

The model sees IOI prompts (:mod:`tracevene.tasks.ioi`: 16 templates, ABBA and BABA
forms, 40 names, varied positions) and learns to predict the indirect object at the
last position (cross-entropy at END), plus the ordinary next-token loss on the tokens
before END (without it, training sits for a long time at 50%: copying either name).
It is a ``GPT2LMHeadModel`` whose MLPs vanish: ``n_inner=1`` and the MLP weights zeroed
and frozen, so every layer is attention only (LayerNorms kept).

A sparse, clean solution is wanted (a recipe finds the circuit by path patching and
mean-ablates every other head), so training adds a group-lasso penalty on each head's
output projection: heads that the task does not need are driven to write little, and
the ones it needs carry the effect. The log ends with each head's mean-ablation effect
and the faithfulness of the top half of the heads (the others mean-ablated with
per-template means over the ABC prompts).

Why 4 x 4 heads: the trained solution is small (one head that attends from END to
the names and writes against the repeated one carries most of the logit difference,
a few layer-0 heads sort out the other names). With 2 x 4 heads that circuit is half
of the model, so random head sets of its size contain the key head half of the time
and keep about as much as the circuit; with 16 heads the circuit (5 heads) is a
small fraction, and random sets of its size keep about a third of it (the IOI recipe
compares the two). 2 x 8 heads trains as well but spreads the accuracy over more
layer-0 heads than path patching picks up.

Run:  python models/train_ioi.py [--steps 800] [--lasso 3e-3] [--out models/ioi]
Seeded, CPU, one thread: about a minute on an idle core (3 minutes on a busy one).
Prints held-out accuracy (``ioi.accuracy``: the IO logit is the largest among all
names) and the logit difference, and writes the checkpoint, the tokenizer and
``training_log.txt`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from tracevene.tasks import ioi

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=HERE / "ioi", help="default: models/ioi")
    p.add_argument("--steps", type=int, default=800, help="optimiser steps (default: 800)")
    p.add_argument("--batch", type=int, default=64, help="prompts per step (default: 64)")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default: 1e-2)")
    p.add_argument(
        "--lasso", type=float, default=3e-3, help="head group-lasso weight (default: 3e-3)"
    )
    p.add_argument("--lm", type=float, default=1.0, help="weight of the LM loss (default: 1)")
    p.add_argument("--layers", type=int, default=4, help="default: 4")
    p.add_argument("--heads", type=int, default=4, help="default: 4")
    p.add_argument("--d-model", type=int, default=64, help="default: 64")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    return p.parse_args(argv)


def build(tok, args: argparse.Namespace) -> transformers.GPT2LMHeadModel:
    """An attention-only GPT-2 (MLPs zeroed and frozen)."""
    config = transformers.GPT2Config(
        vocab_size=len(tok),
        n_positions=32,
        n_embd=args.d_model,
        n_layer=args.layers,
        n_head=args.heads,
        n_inner=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = transformers.GPT2LMHeadModel(config)
    for block in model.transformer.h:
        for p in block.mlp.parameters():
            p.data.zero_()
            p.requires_grad_(False)
    return model


def head_norms(model: transformers.GPT2LMHeadModel) -> torch.Tensor:
    """``[layers, heads]`` Frobenius norms of each head's output projection."""
    n_head = model.config.n_head
    rows = [b.attn.c_proj.weight.reshape(n_head, -1) for b in model.transformer.h]
    return torch.stack(rows).norm(dim=-1)


def loss_fn(model, ds: ioi.Dataset, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of IO at END, the LM loss before END, and the heads' group lasso."""
    logits = model(ds.clean).logits
    end = logits[torch.arange(len(ds)), ds.pos["END"]]
    ce = F.cross_entropy(end, ds.io)
    before_end = torch.arange(ds.clean.shape[1] - 1) < ds.pos["END"][:, None]
    lm = F.cross_entropy(logits[:, :-1][before_end], ds.clean[:, 1:][before_end])
    return ce + args.lm * lm + args.lasso * head_norms(model).sum(), ce


@torch.no_grad()
def evaluate(model, ds: ioi.Dataset) -> tuple[float, float]:
    """Accuracy (:func:`ioi.accuracy`) and mean logit difference on ``ds``."""
    logits = model(ds.clean).logits
    return ioi.accuracy(logits, ds), float(ioi.logit_diff(logits, ds).mean())


@torch.no_grad()
def head_means(model, ds: ioi.Dataset) -> list[torch.Tensor]:
    """Per layer ``[templates, pos, n_embd]``: the heads' z on the ABC prompts, per template.

    These are the mean-ablation values the IOI recipes use.
    """
    zs = _record_z(model, ds.corrupted)
    n_templates = int(ds.template.max()) + 1
    means = []
    for z in zs:
        m = torch.zeros(n_templates, *z.shape[1:])
        for t in range(n_templates):
            if (ds.template == t).any():
                m[t] = z[ds.template == t].mean(0)
        means.append(m)
    return means


def _record_z(model, ids: torch.Tensor) -> list[torch.Tensor]:
    zs, hooks = [], []
    for block in model.transformer.h:
        hooks.append(block.attn.c_proj.register_forward_pre_hook(lambda m, a: zs.append(a[0])))
    model(ids)
    for h in hooks:
        h.remove()
    return zs


@torch.no_grad()
def ablated(model, ds: ioi.Dataset, means: list[torch.Tensor], heads: set) -> tuple[float, float]:
    """Accuracy and logit difference with the heads in ``heads`` mean-ablated."""
    d_head = model.config.n_embd // model.config.n_head
    hooks = []
    for layer, block in enumerate(model.transformer.h):
        cols = [c for (ly, h) in heads if ly == layer for c in range(h * d_head, (h + 1) * d_head)]
        mean = means[layer][ds.template][:, :, cols]

        def patch(module, args, cols=cols, mean=mean):
            z = args[0].clone()
            z[:, :, cols] = mean[:, : z.shape[1]]
            return (z,)

        hooks.append(block.attn.c_proj.register_forward_pre_hook(patch))
    try:
        return evaluate(model, ds)
    finally:
        for h in hooks:
            h.remove()


def faithfulness(model, ds: ioi.Dataset, log) -> None:
    """Each head mean-ablated alone; then all but the top half (by that effect) ablated."""
    means = head_means(model, ds)
    acc, ld = evaluate(model, ds)
    heads = [(ly, h) for ly in range(model.config.n_layer) for h in range(model.config.n_head)]
    drops = {}
    for head in heads:
        drops[head] = ld - ablated(model, ds, means, {head})[1]
    log("logit diff lost when one head is mean-ablated (ABC means per template):")
    log("  " + "  ".join(f"L{ly}H{h} {d:+.2f}" for (ly, h), d in drops.items()))
    top = sorted(heads, key=lambda x: -abs(drops[x]))[: len(heads) // 2]
    a, d = ablated(model, ds, means, set(heads) - set(top))
    log(f"only {sorted(top)} kept (others mean-ablated): accuracy {a:.4f}, "
        f"logit diff {d:.3f} = {d / ld:.1%} of {ld:.3f}")  # fmt: skip


def train(args: argparse.Namespace, log) -> transformers.GPT2LMHeadModel:
    """Build and train the model, logging held-out accuracy every 100 steps."""
    torch.manual_seed(args.seed)
    tok = ioi.tokenizer()
    model = build(tok, args)
    train_ds = ioi.make_dataset(tok, n=20000, seed=args.seed + 1)
    test_ds = ioi.make_dataset(tok, n=1024, seed=args.seed + 1000)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, args.lr, total_steps=args.steps, pct_start=0.05, anneal_strategy="linear"
    )
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(1, args.steps + 1):
        batch = train_ds[torch.randint(len(train_ds), (args.batch,), generator=g)]
        loss, ce = loss_fn(model, batch, args)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            acc, ld = evaluate(model.eval(), test_ds)
            model.train()
            log(f"step {step:5d}  ce {ce.item():.4f}  held-out acc {acc:.4f}  logit diff {ld:.3f}")
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    """Train, report, save; returns the held-out figures."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    args_text = " ".join(sys.argv[1:] if argv is None else argv)
    log(f"python models/train_ioi.py {args_text}".rstrip())
    start = time.perf_counter()
    model = train(args, log)
    seconds = time.perf_counter() - start
    tok = ioi.tokenizer()
    held_out = ioi.make_dataset(tok, n=2048, seed=args.seed + 12345)
    acc, ld = evaluate(model, held_out)
    faithfulness(model, held_out, log)
    n_params = sum(p.numel() for p in model.parameters())
    norms = " ".join(f"{v:.2f}" for v in head_norms(model).flatten().tolist())
    log(f"head output norms (layer-major): {norms}")
    log(f"final held-out (n=2048, fresh seed): accuracy {acc:.4f}, logit diff {ld:.3f}")
    log(f"parameters {n_params}, training time {seconds:.1f} s (1 CPU thread)")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    (args.out / "training_log.txt").write_text("\n".join(lines) + "\n")
    return {"accuracy": acc, "logit_diff": ld, "parameters": n_params, "seconds": seconds}


if __name__ == "__main__":
    main()

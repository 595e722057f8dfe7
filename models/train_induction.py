"""Train the bundled induction model: a 2-layer attention-only GPT-2 -> models/induction/.

The task (:mod:`tracevene.tasks.induction`): BOS, 8 distinct random tokens, fillers,
and a repeat of the 8 tokens at a random position; the loss is the cross-entropy of
the next token on the repeated half only, which only induction can predict. The
model is a ``GPT2LMHeadModel`` whose MLPs vanish (``n_inner=1``, MLP weights and biases
zero and frozen), so it is attention-only and still loads with
``AutoModelForCausalLM.from_pretrained`` and runs on every tracevene backend. It learns
the textbook circuit: a previous-token head in layer 0 and an induction head in layer 1
that reads it through its keys (K-composition).

Run:  python models/train_induction.py [--steps 2500] [--out models/induction]
Seeded, CPU, one thread, well under a minute. Writes config.json, model.safetensors and
training_log.txt (this run's output) into --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from tracevene.tasks import induction

VOCAB = 64  # token 0 is BOS
SEQ_LEN = 32
REPEAT_LEN = 8
HERE = Path(__file__).resolve().parent


def build_model(seed: int, n_head: int) -> transformers.GPT2LMHeadModel:
    """A 2-layer GPT-2 (d_model 64) with its MLPs zeroed and frozen."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=n_head, n_inner=1,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    for block in model.transformer.h:
        for p in block.mlp.parameters():
            p.data.zero_()
            p.requires_grad_(False)
    return model


def train(model: torch.nn.Module, args, log) -> None:
    """AdamW on fresh batches of 64 sequences; logs loss and accuracy every 100 steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps)
    g = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        ds = induction.make_dataset(
            64, VOCAB, seq_len=SEQ_LEN, repeat_len=REPEAT_LEN, min_len=args.min_len, seed=g
        )
        logits = model(ds.orig).logits
        loss = induction.loss(logits, ds)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            acc = induction.accuracy(logits.detach(), ds)
            log(f"step {step:5d}  loss {loss.item():.4f}  accuracy {acc:.3f}")


def evaluate(model: torch.nn.Module, seed: int, min_len: int) -> tuple[float, float, float]:
    """Accuracy and mean log-prob on 512 held-out sequences, and log-prob on their ``new``."""
    ds = induction.make_dataset(
        512, VOCAB, seq_len=SEQ_LEN, repeat_len=REPEAT_LEN, min_len=min_len, seed=seed
    )
    with torch.no_grad():
        logits = model(ds.orig).logits
        new_logits = model(ds.new).logits
    metric = induction.metric(ds)
    return induction.accuracy(logits, ds), metric(logits).item(), metric(new_logits).item()


def main(argv: list[str] | None = None) -> float:
    """Train, evaluate and save the model; the held-out accuracy."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=2500, help="training steps (default: 2500)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--heads", type=int, default=2, help="heads per layer (default: 2)")
    p.add_argument("--min-len", type=int, default=8, help="shortest repeat (default: 8)")
    p.add_argument("--out", type=Path, default=HERE / "induction", help="output directory")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    start = time.perf_counter()
    model = build_model(args.seed, args.heads)
    log(
        f"train_induction.py --steps {args.steps} --seed {args.seed} --heads {args.heads} "
        f"--min-len {args.min_len}"
    )
    train(model, args, log)
    model.eval()
    acc, lp, lp_new = evaluate(model, args.seed + 1, args.min_len)
    log(
        f"held-out (512 sequences): accuracy {acc:.3f} on the repeated half, mean log-prob "
        f"{lp:.3f} (orig) vs {lp_new:.3f} (first occurrence resampled; chance "
        f"{-torch.log(torch.tensor(VOCAB - 1.0)).item():.3f})"
    )
    log(f"trained in {time.perf_counter() - start:.1f} s on CPU (1 thread)")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    (args.out / "training_log.txt").write_text("\n".join(lines) + "\n")
    return acc


if __name__ == "__main__":
    main()

"""Train the bundled induction model: a 2-layer attention-only Llama -> models/induction/.

The task (:mod:`tracevene.tasks.induction`): BOS, 2 to 8 distinct random tokens at a
random position, fillers, and a repeat of them at a random later position; the loss is
the cross-entropy of the next token on the repeated half only, which only induction can
predict. The model is a ``LlamaForCausalLM`` (rotary position embeddings, RMSNorm;
d_model 64, one head per layer) whose MLPs vanish (``intermediate_size=1``, MLP weights
zero and frozen: Llama's MLP is ``down(act(gate(x)) * up(x))``, so its output is exactly
0), so it is attention-only and still loads with ``AutoModelForCausalLM.from_pretrained``
and runs on every tracevene backend.

Why Llama and not GPT-2: rotary embeddings are relative by construction, so a
previous-token head is easy to express and forms within a few hundred steps. A GPT-2
with learned absolute positions trained on the same data stalled on a loose
"look a few tokens back" plateau, or (with repeats of one fixed length) learned an
offset variant of the circuit instead of a previous-token head.

The seed matters. With ``--seed 1`` (the default) the circuit forms within about 500
steps (previous-token score ~0.6-0.7, induction score ~1.0, accuracy 1.0). Seeds 0, 2
and 3 instead sit on a plateau (about half of the repeated tokens right, previous-token
score ~0.45, induction score ~0.5; seed 0 is still there after 3000 steps).

The log shows, every 100 steps, the training loss and accuracy, and the previous-token
score of the layer-0 head and the induction score of the layer-1 head on the evaluation
data of tests/test_recipe_path_patching.py (``make_dataset(64, 64, min_len=8, seed=1)``).

Run:  python models/train_induction.py [--steps 3000] [--out models/induction]
Seeded, CPU, one thread, a few minutes. Writes config.json, model.safetensors and
training_log.txt (this run's output) into --out.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import transformers

from tracevene.tasks import induction

VOCAB = 64  # token 0 is BOS
SEQ_LEN = 32
REPEAT_LEN = 8
WARMUP = 200
HERE = Path(__file__).resolve().parent


def build_model(seed: int, n_head: int) -> transformers.LlamaForCausalLM:
    """A 2-layer Llama (d_model 64, rotary positions) with its MLPs zeroed and frozen."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=1, num_hidden_layers=2,
        num_attention_heads=n_head, num_key_value_heads=n_head, max_position_embeddings=SEQ_LEN,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
        attn_implementation="eager",
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    for layer in model.model.layers:
        for p in layer.mlp.parameters():
            p.data.zero_()
            p.requires_grad_(False)
    return model


def scores(model: torch.nn.Module, ds: induction.Dataset) -> tuple[float, float]:
    """The best previous-token score in layer 0 and induction score in layer 1."""
    with torch.no_grad():
        attentions = model(ds.orig, output_attentions=True).attentions
    prev = induction.previous_token_scores(attentions[0]).max().item()
    return prev, induction.induction_scores(attentions[1], ds).max().item()


def train(model: torch.nn.Module, args, log) -> None:
    """AdamW on fresh batches of 64 sequences, linear warmup then cosine decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / args.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    g = torch.Generator().manual_seed(args.seed)
    test = induction.make_dataset(64, VOCAB, min_len=REPEAT_LEN, seed=1)
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
            model.eval()
            prev, ind = scores(model, test)
            model.train()
            log(
                f"step {step:5d}  loss {loss.item():.4f}  accuracy {acc:.3f}  "
                f"previous-token {prev:.3f}  induction {ind:.3f}"
            )


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
    p.add_argument("--steps", type=int, default=3000, help="training steps (default: 3000)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    p.add_argument("--heads", type=int, default=1, help="heads per layer (default: 1)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    p.add_argument("--min-len", type=int, default=2, help="shortest repeat (default: 2)")
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
        f"--lr {args.lr} --min-len {args.min_len}"
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

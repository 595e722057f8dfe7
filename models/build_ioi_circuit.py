"""Build ``models/ioi_circuit/``: a GPT-2 whose weights implement a known IOI circuit by hand.

Three layers of three heads (d_model 192, d_head 64), MLPs zeroed (``n_inner=1``), the
bundled IOI tokenizer (:func:`tracevene.tasks.ioi.tokenizer`). Three heads do the task,
as in Wang et al. (2023); the other six have zero weights (uniform attention, zero output):

- layer 0 head 0, **duplicate token**: at a name, attends to an earlier position
  holding the same name (from S2 to S1), else to BOS; writes a DUP flag there. Its
  queries and keys hold one-hot names (a match scores +20) and one-hot positions (the
  position itself scores -20, so a name does not find itself; BOS scores +8).
- layer 1 head 1, **S-inhibition**: at every position, attends to the position with
  the DUP flag (from END to S2), else to BOS; copies that name into an INHIB subspace.
- layer 2 head 2, **name mover**: attends to names, minus the names in INHIB (from END
  to IO); copies the name into the NAME subspace, which the unembedding reads.

The residual stream is designed in "logical" coordinates (one-hot names, one-hot
positions, flags) mapped into the model's 192 dimensions by ``R``, an orthonormal
basis of the mean-zero directions; every head reads and writes through ``R``.
LayerNorm: every token embedding carries a large constant ``C`` along one more mean-zero
direction, so each LayerNorm's scale is ``sqrt(D) / |x|``, almost exactly
``sqrt(D) / C`` whatever the rest holds; the LayerNorm weights ``C / sqrt(D)`` undo it,
making every LayerNorm the identity to within ~1e-4 (relative).

Run:  python models/build_ioi_circuit.py [--out models/ioi_circuit]
Writes config, weights, tokenizer, ``circuit.json`` (the planted heads and their
roles) and ``training_log.txt`` (what it printed): accuracy and logit difference on
1024 IOI prompts, and the same with each planted head zero-ablated. Deterministic, a
few seconds on CPU. (Prompts must fit in its 24 positions.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

from tracevene.tasks import ioi

HERE = Path(__file__).resolve().parent
D_MODEL, N_HEAD, N_LAYER, N_POS = 192, 3, 3, 24
D_HEAD = D_MODEL // N_HEAD
C = 100.0  # the constant component that keeps LayerNorm linear
# scores (in logits of the attention softmax) and the output scale
MATCH, SELF, SINK, DUP, NAME_BONUS, INHIBIT, UNEMBED = 20.0, 20.0, 8.0, 20.0, 12.0, 24.0, 10.0
CIRCUIT = [
    {"layer": 0, "head": 0, "role": "duplicate-token"},
    {"layer": 1, "head": 1, "role": "s-inhibition"},
    {"layer": 2, "head": 2, "role": "name-mover"},
]


class Basis:
    """Named blocks of logical coordinates and the map ``R`` into the residual stream."""

    def __init__(self, n_names: int) -> None:
        sizes = {"const": 1, "is_name": 1, "dup": 1, "name": n_names, "inhib": n_names}
        sizes["pos"] = N_POS
        self.slices, start = {}, 0
        for key, size in sizes.items():
            self.slices[key] = slice(start, start + size)
            start += size
        self.k = start
        if self.k > D_MODEL - 1:
            raise ValueError(f"{self.k} logical coordinates do not fit in d_model {D_MODEL}")
        # orthonormal columns, all orthogonal to the all-ones vector (mean zero)
        a = torch.cat([torch.ones(D_MODEL, 1), torch.eye(D_MODEL, self.k)], dim=1)
        q, _ = torch.linalg.qr(a.double())
        self.R = q[:, 1:].float() * torch.sign(torch.diagonal(q)[1 : self.k + 1]).float()

    def vec(self, key: str, index: int = 0) -> torch.Tensor:
        """A logical unit vector."""
        v = torch.zeros(self.k)
        v[self.slices[key].start + index] = 1.0
        return v

    def block(self, key: str) -> torch.Tensor:
        """``[k, size]``: the logical unit vectors of one block, as columns."""
        return torch.eye(self.k)[:, self.slices[key]]


def head_weights(basis: Basis, role: str) -> dict[str, torch.Tensor]:
    """Logical ``Wq, Wk, Wv [k, d_head]``, ``bq [d_head]`` and ``Wo [d_head, k]`` of a head.

    Scores are ``(x_i Wq + bq) . (x_j Wk)``; the model divides by sqrt(d_head), so the
    weights written into it carry the factor back.
    """
    n = basis.slices["name"].stop - basis.slices["name"].start
    w = {k: torch.zeros(basis.k, D_HEAD) for k in ("Wq", "Wk", "Wv")}
    w["bq"], w["Wo"] = torch.zeros(D_HEAD), torch.zeros(D_HEAD, basis.k)
    if role == "duplicate-token":  # score = MATCH [same name] - SELF [i == j] + SINK [j == 0]
        w["Wq"][:, :n] = MATCH * basis.block("name")
        w["Wk"][:, :n] = basis.block("name")
        w["Wq"][:, n : n + N_POS] = -SELF * basis.block("pos")
        w["bq"][n] = SINK  # query on the key's position 0 (BOS)
        w["Wk"][:, n : n + N_POS] = basis.block("pos")
        w["Wv"][:, 0] = basis.vec("is_name")
        w["Wo"][0] = basis.vec("dup")
    elif role == "s-inhibition":  # score = DUP * dup_j + SINK [j == 0]; copies the name
        w["bq"][0], w["bq"][1] = DUP, SINK
        w["Wk"][:, 0], w["Wk"][:, 1] = basis.vec("dup"), basis.vec("pos", 0)
        w["Wv"][:, :n] = basis.block("name")
        w["Wo"][:n] = basis.block("inhib").T
    elif role == "name-mover":  # score = NAME_BONUS is_name_j - INHIBIT <inhib_i, name_j>
        w["bq"][n] = NAME_BONUS
        w["Wq"][:, :n] = -INHIBIT * basis.block("inhib")
        w["Wk"][:, :n], w["Wk"][:, n] = basis.block("name"), basis.vec("is_name")
        w["Wv"][:, :n] = basis.block("name")
        w["Wo"][:n] = basis.block("name").T
    return w


def set_head(block, basis: Basis, head: int, w: dict[str, torch.Tensor]) -> None:
    """Write one head's logical weights into a GPT-2 block (Conv1D: ``y = x W + b``)."""
    cols = slice(head * D_HEAD, (head + 1) * D_HEAD)
    scale = D_HEAD**0.5
    weight, bias = block.attn.c_attn.weight, block.attn.c_attn.bias
    for i, (name, factor) in enumerate((("Wq", scale), ("Wk", 1.0), ("Wv", 1.0))):
        weight[:, i * D_MODEL :][:, cols] = basis.R @ w[name] * factor
    bias[cols] = w["bq"] * scale
    block.attn.c_proj.weight[cols] = w["Wo"] @ basis.R.T


def build(tok) -> tuple[transformers.GPT2LMHeadModel, Basis]:
    """The model with the circuit planted (see the module docstring)."""
    config = transformers.GPT2Config(
        vocab_size=len(tok), n_positions=N_POS, n_embd=D_MODEL, n_layer=N_LAYER,
        n_head=N_HEAD, n_inner=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    name_ids = [tok.convert_tokens_to_ids(n) for n in ioi.NAMES]
    basis = Basis(len(name_ids))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        embed(model, basis, name_ids)
        for block in model.transformer.h:
            for ln in (block.ln_1, block.ln_2):
                ln.weight.fill_(C / D_MODEL**0.5)
        model.transformer.ln_f.weight.fill_(C / D_MODEL**0.5)
        for head in CIRCUIT:
            set_head(model.transformer.h[head["layer"]], basis, head["head"],
                     head_weights(basis, head["role"]))  # fmt: skip
    return model, basis


def embed(model: transformers.GPT2LMHeadModel, basis: Basis, name_ids: list[int]) -> None:
    """Token, position and unembedding matrices."""
    tokens = torch.zeros(model.config.vocab_size, basis.k)
    tokens += C * basis.vec("const")
    for i, t in enumerate(name_ids):
        tokens[t] += basis.vec("name", i) + basis.vec("is_name")
    model.transformer.wte.weight.copy_(tokens @ basis.R.T)
    model.transformer.wpe.weight.copy_(basis.block("pos").T @ basis.R.T)
    unembed = torch.zeros(model.config.vocab_size, basis.k)
    for i, t in enumerate(name_ids):
        unembed[t] = UNEMBED * basis.vec("name", i)
    model.lm_head.weight.copy_(unembed @ basis.R.T)


@torch.no_grad()
def score(model, ds: ioi.Dataset, ablate: dict | None = None) -> tuple[float, float]:
    """Accuracy and mean logit difference, optionally with one head's output zeroed."""
    handle = None
    if ablate is not None:
        attn = model.transformer.h[ablate["layer"]].attn
        cols = slice(ablate["head"] * D_HEAD, (ablate["head"] + 1) * D_HEAD)

        def zero_head(module, args):
            z = args[0].clone()
            z[..., cols] = 0
            return (z,)

        handle = attn.c_proj.register_forward_pre_hook(zero_head)
    logits = model(ds.clean).logits
    if handle is not None:
        handle.remove()
    return ioi.accuracy(logits, ds), float(ioi.logit_diff(logits, ds).mean())


def main(argv: list[str] | None = None) -> dict:
    """Build, check and save the model; returns the figures it printed."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, default=HERE / "ioi_circuit", help="default: models/ioi_circuit"
    )
    args = p.parse_args(argv)
    tok = ioi.tokenizer()
    model, _ = build(tok)
    ds = ioi.make_dataset(tok, n=1024, seed=0)
    acc, ld = score(model, ds)
    n_params = sum(p.numel() for p in model.parameters())
    lines = [f"accuracy {acc:.4f}  logit diff {ld:.3f}  parameters {n_params}"]
    summary = {"accuracy": acc, "logit_diff": ld, "parameters": n_params}
    for head in CIRCUIT:
        a, d = score(model, ds, ablate=head)
        name = f"L{head['layer']}H{head['head']}"
        lines.append(
            f"  {name} ({head['role']}) zero-ablated: accuracy {a:.4f}  logit diff {d:.3f}"
        )
        summary[f"ablate {name}"] = a
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print("\n".join(lines))
    log = ["python models/build_ioi_circuit.py", "on ioi.make_dataset(n=1024, seed=0):", *lines]
    (args.out / "training_log.txt").write_text("\n".join(log) + "\n")
    (args.out / "circuit.json").write_text(json.dumps(CIRCUIT, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()

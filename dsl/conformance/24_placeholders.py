"""Placeholders: a scale and a steering vector bound at run time (t.arg).

Layer 1 mlp.out at the last position += alpha * vec, with both given to program.run
(GPT-2).
"""

import torch

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 0


def record(model):
    with iv.trace(model) as t:
        alpha, vec = t.arg("alpha"), t.arg("vec")
        t.layer[1].mlp.out[:, -1] += alpha * vec
        t.layer[1].mlp.out.save("mlp_out")
        t.logits.save("logits")
    return t.program


def args(batch, pos):
    return {"alpha": torch.tensor(2.5), "vec": torch.linspace(-1.0, 1.0, 32)}

"""Per-example positions through a placeholder: site[torch.arange(B), pos].

Each batch row patches its own position of layer 1's resid_post from the source;
saves the patched rows and each row's logits at its position (GPT-2, B = 2).
"""

import torch

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1
B = 2


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        pos = t.arg("pos")
        rows = torch.arange(B)
        t.layer[1].resid_post[rows, pos] = src.layer[1].resid_post[rows, pos]
        t.layer[1].resid_post[rows, pos].save("patched")
        t.logits[rows, pos].save("logits_at_pos")
        t.logits.save("logits")
    return t.program


def args(batch, pos):
    return {"pos": torch.tensor([1, pos - 2])}

"""A small custom nn.Module called on two traced values (base and source).

Blend swaps the even coordinates of layer 1 mlp.out for the source's (an interchange on a
fixed subspace); saves the blended value and the logits (GPT-2).
"""

import torch

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


class Blend(torch.nn.Module):
    """base + mask * (source - base) with a fixed 0/1 mask."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("mask", (torch.arange(d) % 2 == 0).float())

    def forward(self, base, source):
        return base + self.mask * (source - base)


def record(model):
    blend = Blend(32)
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].mlp.out = blend(t.layer[1].mlp.out, src.layer[1].mlp.out)
        t.layer[1].mlp.out.save("mlp_out")
        t.logits.save("logits")
    return t.program

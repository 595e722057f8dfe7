"""A module call: an nn.Linear applied to a source's traced value, written to the base.

Layer 1 resid_post at the last position becomes lin(source's); saves lin's output and
the logits (GPT-2).
"""

import torch

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def make_linear():
    g = torch.Generator().manual_seed(25)
    lin = torch.nn.Linear(32, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 32, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(32, generator=g) * 0.1)
    return lin


def record(model):
    lin = make_linear()
    with iv.trace(model) as t:
        src = t.source()
        mapped = lin(src.layer[1].resid_post[:, -1])
        mapped.save("mapped")
        t.layer[1].resid_post[:, -1] = mapped
        t.logits.save("logits")
    return t.program

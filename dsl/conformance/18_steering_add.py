"""Steering by addition: t.layer[2].resid_post[:, -1] += vec.

A fixed vector added at the last position of the last block; saves the final residual
and the logits (GPT-2).
"""

import torch

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 0


def record(model):
    vec = torch.randn(32, generator=torch.Generator().manual_seed(18))
    with iv.trace(model) as t:
        t.layer[2].resid_post[:, -1] += vec
        t.layer[2].resid_post.save("resid_post")
        t.final.save("final")
        t.logits.save("logits")
    return t.program

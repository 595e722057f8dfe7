"""Torch functions on traced values: torch.where, torch.cat, softmax, log_softmax, norm.

Per position, layer 1 resid_post takes whichever of base / source has the larger norm;
layer 2 attn.out is the source's for positions 0..2 and the base's after; saves the
choice mask, next-token probabilities and log-probabilities (GPT-2).
"""

import torch

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        x, y = src.layer[1].resid_post, t.layer[1].resid_post
        keep = x.norm(dim=-1, keepdim=True) > y.norm(dim=-1, keepdim=True)
        keep.save("keep")
        t.layer[1].resid_post = torch.where(keep, x, y)
        mixed = torch.cat([src.layer[2].attn.out[:, :3], t.layer[2].attn.out[:, 3:]], dim=1)
        t.layer[2].attn.out = mixed
        torch.softmax(t.logits[:, -1], dim=-1).save("probs")
        torch.nn.functional.log_softmax(t.logits, dim=-1).save("logprobs")
    return t.program

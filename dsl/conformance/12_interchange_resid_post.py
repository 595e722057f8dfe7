"""Interchange at resid_post: layer 0's block output at positions 0 and 1.

Saves the patched residual, layer 1's resid_pre (the same stream) and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[0].resid_post[:, 0:2] = src.layer[0].resid_post[:, 0:2]
        t.layer[0].resid_post.save("resid_post")
        t.layer[1].resid_pre.save("resid_pre1")
        t.logits.save("logits")
    return t.program

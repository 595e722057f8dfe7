"""Interchange at attn.out: layer 0's attention output at positions 2 and 3.

Saves the patched attention output, layer 0's resid_post and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[0].attn.out[:, 2:4] = src.layer[0].attn.out[:, 2:4]
        t.layer[0].attn.out.save("attn_out")
        t.layer[0].resid_post.save("resid_post")
        t.logits.save("logits")
    return t.program

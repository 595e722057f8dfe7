"""Interchange at attn.z: layer 1's per-head weighted values at the last position.

Saves the patched z, the attention output and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].attn.z[:, -1] = src.layer[1].attn.z[:, -1]
        t.layer[1].attn.z.save("z")
        t.layer[1].attn.out.save("attn_out")
        t.logits.save("logits")
    return t.program

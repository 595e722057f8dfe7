"""Interchange at attn.v: all of layer 2's values from the source (whole-site write).

Saves the values after the write, layer 2's z and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[2].attn.v = src.layer[2].attn.v
        t.layer[2].attn.v.save("v")
        t.layer[2].attn.z.save("z")
        t.logits.save("logits")
    return t.program

"""Interchange at attn.k: layer 0's keys at positions 0..2 from the source.

Saves the patched keys, layer 0's z and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[0].attn.k[:, :3] = src.layer[0].attn.k[:, :3]
        t.layer[0].attn.k.save("k")
        t.layer[0].attn.z.save("z")
        t.logits.save("logits")
    return t.program

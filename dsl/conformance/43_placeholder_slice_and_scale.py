"""Placeholders as plain Python numbers: a slice bound and a scale factor.

Layer 0 attn.out is zeroed from position k on, and layer 1 mlp.out is multiplied by scale,
with k = 3 and scale = 0.5 given to program.run (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 0


def record(model):
    with iv.trace(model) as t:
        k, scale = t.arg("k"), t.arg("scale")
        t.layer[0].attn.out[:, k:] = 0.0
        t.layer[1].mlp.out *= scale
        t.layer[0].attn.out.save("attn_out0")
        t.layer[1].mlp.out.save("mlp_out1")
        t.logits.save("logits")
    return t.program


def args(batch, pos):
    return {"k": 3, "scale": 0.5}

"""Saves before and after a write to the same site: reads follow program order.

Layer 1 mlp.out is saved, patched at position 0 from the source, and saved again (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].mlp.out.save("before")
        t.layer[1].mlp.out[:, 0] = src.layer[1].mlp.out[:, 0]
        t.layer[1].mlp.out.save("after")
        t.logits.save("logits")
    return t.program

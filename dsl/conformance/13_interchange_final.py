"""Interchange at final: the final-norm output at the last position.

Saves the patched final residual and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.final[:, -1] = src.final[:, -1]
        t.final.save("final")
        t.logits.save("logits")
    return t.program

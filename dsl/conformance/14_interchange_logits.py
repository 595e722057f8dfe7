"""Interchange at logits: the last position's logits from the source.

Saves the logits; the base run's model output must carry the patched logits too (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.logits[:, -1] = src.logits[:, -1]
        t.logits.save("logits")
    return t.program

"""Interchange at mlp.out: layer 1's MLP output at position 4 (the DESIGN example).

Saves the patched MLP output and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].mlp.out[:, 4] = src.layer[1].mlp.out[:, 4]
        t.layer[1].mlp.out.save("mlp_out")
        t.logits.save("logits")
    return t.program

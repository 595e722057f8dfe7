"""Interchange at mlp.hidden: layer 2's post-GELU activations at position -2.

Saves the patched hidden activations, the MLP output and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[2].mlp.hidden[:, -2] = src.layer[2].mlp.hidden[:, -2]
        t.layer[2].mlp.hidden.save("hidden")
        t.layer[2].mlp.out.save("mlp_out")
        t.logits.save("logits")
    return t.program

"""Gated MLP hidden (act(gate) * up) on Qwen2, positions 2 onward from the source.

Saves the patched hidden activations, the MLP output and the logits (Qwen2).
"""

import tracevene as iv

MODEL = "qwen2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[0].mlp.hidden[:, 2:] = src.layer[0].mlp.hidden[:, 2:]
        t.layer[0].mlp.hidden.save("hidden")
        t.layer[0].mlp.out.save("mlp_out")
        t.logits.save("logits")
    return t.program

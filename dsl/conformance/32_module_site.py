"""Module sites: t.module("transformer.h.1.mlp").output written from the source's.

Position 2 of the MLP module's output comes from the source, and block 2's ln_1 input
(only the norm's, not the residual) is doubled at position 0; saves the MLP module's
input and output, block 2's output (module sites) and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1
MLP = "transformer.h.1.mlp"


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.module(MLP).output[:, 2] = src.module(MLP).output[:, 2]
        t.module("transformer.h.2.ln_1").input[:, 0] *= 2.0
        t.module(MLP).input.save("mlp_in")
        t.module(MLP).output.save("mlp_out")
        t.module("transformer.h.2").output.save("block2")
        t.logits.save("logits")
    return t.program

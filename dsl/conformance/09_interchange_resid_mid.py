"""Interchange at resid_mid: layer 1's residual between attention and MLP, position 1.

Saves the patched resid_mid, layer 1's MLP output (which reads it) and the logits
(GPT-2; the reference reads resid_mid at ln_2's input).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].resid_mid[:, 1] = src.layer[1].resid_mid[:, 1]
        t.layer[1].resid_mid.save("resid_mid")
        t.layer[1].mlp.out.save("mlp_out")
        t.logits.save("logits")
    return t.program

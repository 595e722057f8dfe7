"""resid_mid on Llama: layer 1's residual between attention and MLP, position 2.

Saves the patched resid_mid, the gated MLP's hidden activations and the logits (Llama;
the reference reads resid_mid at post_attention_layernorm's input).
"""

import tracevene as iv

MODEL = "llama"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].resid_mid[:, 2] = src.layer[1].resid_mid[:, 2]
        t.layer[1].resid_mid.save("resid_mid")
        t.layer[1].mlp.hidden.save("hidden")
        t.logits.save("logits")
    return t.program

"""Zero ablation: layer 1's MLP output everywhere, layer 0's attention after position 1.

Saves the ablated sites and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 0


def record(model):
    with iv.trace(model) as t:
        t.layer[0].attn.out[:, 2:] = 0
        t.layer[1].mlp.out = 0.0
        t.layer[0].attn.out.save("attn_out0")
        t.layer[1].mlp.out.save("mlp_out1")
        t.logits.save("logits")
    return t.program

"""Interchange at attn.q: layer 1's queries at position 3 (all heads) from the source.

Saves the patched queries, the attention output and the logits (GPT-2, fused c_attn).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].attn.q[:, 3] = src.layer[1].attn.q[:, 3]
        t.layer[1].attn.q.save("q")
        t.layer[1].attn.out.save("attn_out")
        t.logits.save("logits")
    return t.program

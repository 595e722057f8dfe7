"""Interchange on a real pretrained BERT encoder (all-MiniLM-L6-v2).

Layer 2 resid_post at token 1 (the first word) from the source; saves a head's z and the
MLP hidden activations downstream, and the last layer's output (MiniLM).
"""

import tracevene as iv

MODEL = "minilm"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[2].resid_post[:, 1] = src.layer[2].resid_post[:, 1]
        t.layer[3].attn.head[4].z.save("z_head4")
        t.layer[3].mlp.hidden[:, 1].save("hidden")
        t.layer[5].resid_post.save("last")
    return t.program

"""Head z patching where head_dim (16) is not d_model / n_heads (8): Mistral.

Layer 1 head 3's z from the source; saves z ([B, P, 4, 16]), head 3's out and the logits.
"""

import tracevene as iv

MODEL = "mistral"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].attn.head[3].z = src.layer[1].attn.head[3].z
        t.layer[1].attn.z.save("z")
        t.layer[1].attn.head[3].out.save("head3_out")
        t.logits.save("logits")
    return t.program

"""GQA key writes on Llama: k has the model's 2 key-value heads, not its 4 query heads.

Layer 1 key-value head 1 (shared by query heads 2 and 3) from the source, via the full
site and via attn.head[1].k in layer 2; saves k (pre-rotary), z and the logits (Llama).
"""

import tracevene as iv

MODEL = "llama"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].attn.k[:, :, 1] = src.layer[1].attn.k[:, :, 1]
        t.layer[2].attn.head[1].k[:, -1] = src.layer[2].attn.head[1].k[:, -1]
        t.layer[1].attn.k.save("k1")
        t.layer[2].attn.head[1].k.save("k2_head1")
        t.layer[1].attn.z.save("z1")
        t.logits.save("logits")
    return t.program

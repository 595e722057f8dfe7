"""Head-level patching of q, k and v: one head of each from the source, in layer 1.

Head 1's queries (all positions), head 2's keys at positions 0..3 and head 3's values;
saves each head slice after its write, the z of layer 1 and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        attn, src_attn = t.layer[1].attn, src.layer[1].attn
        attn.head[1].q = src_attn.head[1].q
        attn.head[2].k[:, :4] = src_attn.head[2].k[:, :4]
        attn.head[3].v = src_attn.head[3].v
        attn.head[1].q.save("q1")
        attn.head[2].k.save("k2")
        attn.head[3].v.save("v3")
        attn.z.save("z")
        t.logits.save("logits")
    return t.program

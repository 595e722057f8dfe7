"""Head-level patching of z, pattern and out, one head each in a different layer.

Layer 0 head 0's z at position 2, layer 1 head 2's pattern, layer 2 head 1's
contribution to the residual (out); saves the head reads before and after, and the z
that the new pattern produces (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[0].attn.head[0].z[:, 2] = src.layer[0].attn.head[0].z[:, 2]
        t.layer[0].attn.head[0].z.save("z0")
        t.layer[1].attn.head[2].pattern.save("pattern2_before")
        t.layer[1].attn.head[2].pattern = src.layer[1].attn.head[2].pattern
        t.layer[1].attn.head[2].pattern.save("pattern2_after")
        t.layer[1].attn.head[2].z.save("z2")
        t.layer[2].attn.head[1].out.save("out1_before")
        t.layer[2].attn.head[1].out = src.layer[2].attn.head[1].out
        t.layer[2].attn.head[1].out.save("out1_after")
        t.layer[2].attn.out.save("attn_out")
        t.logits.save("logits")
    return t.program

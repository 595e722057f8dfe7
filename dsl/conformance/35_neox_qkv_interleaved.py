"""q and v writes on GPT-NeoX, whose fused query_key_value is interleaved per head.

Layer 1 queries at the last position and head 2's values from the source; saves head 2's
out, the attention output and the logits (GPT-NeoX, parallel residual).
"""

import tracevene as iv

MODEL = "neox"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].attn.q[:, -1] = src.layer[1].attn.q[:, -1]
        t.layer[1].attn.v[:, :, 2] = src.layer[1].attn.v[:, :, 2]
        t.layer[1].attn.q.save("q")
        t.layer[1].attn.v.save("v")
        t.layer[1].attn.head[2].out.save("head2_out")
        t.layer[1].attn.out.save("attn_out")
        t.logits.save("logits")
    return t.program

"""In-place operators +=, -=, *=, /= on sites (whole sites and slices).

Layer 0 mlp.out += 0.5; layer 1 attn.out[:, 1] -= the source's; layer 1 resid_post
*= 1.5; layer 2 mlp.out[:, -1] /= 4. Saves each site after its write (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[0].mlp.out += 0.5
        t.layer[1].attn.out[:, 1] -= src.layer[1].attn.out[:, 1]
        t.layer[1].resid_post *= 1.5
        t.layer[2].mlp.out[:, -1] /= 4.0
        t.layer[0].mlp.out.save("mlp_out0")
        t.layer[1].attn.out.save("attn_out1")
        t.layer[1].resid_post.save("resid_post1")
        t.layer[2].mlp.out.save("mlp_out2")
        t.logits.save("logits")
    return t.program

"""A write into a source run, then the source's downstream value into the base.

The source's layer 0 mlp.out at position 1 is zeroed; its layer 2 resid_post (which
carries that change) is patched into the base at position 1 (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        src.layer[0].mlp.out[:, 1] = 0.0
        src.layer[2].resid_post.save("src_resid_post")
        t.layer[2].resid_post[:, 1] = src.layer[2].resid_post[:, 1]
        t.layer[2].resid_post.save("resid_post")
        t.logits.save("logits")
    return t.program

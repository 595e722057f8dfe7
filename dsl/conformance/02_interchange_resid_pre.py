"""Interchange at resid_pre: layer 1's residual input at position 2 from the source.

Saves the patched site, a downstream residual and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].resid_pre[:, 2] = src.layer[1].resid_pre[:, 2]
        t.layer[1].resid_pre.save("resid_pre")
        t.layer[2].resid_post.save("resid_post2")
        t.logits.save("logits")
    return t.program

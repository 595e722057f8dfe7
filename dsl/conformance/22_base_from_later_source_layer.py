"""A base write fed by a later layer of a source: layer 0 of base from layer 2 of source.

Saves the patched layer 0 resid_post and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[0].resid_post[:, 2] = src.layer[2].resid_post[:, 2]
        t.layer[0].resid_post.save("resid_post0")
        t.logits.save("logits")
    return t.program

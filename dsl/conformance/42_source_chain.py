"""A chain of sources: source 2 feeds source 1 from a later layer, which feeds the base.

Source 1's layer 0 resid_post at position 1 comes from source 2's layer 2; the base's
layer 1 resid_post at position 1 comes from source 1's layer 2 (three passes in order).
Saves source 1's changed layer 2 residual and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 2


def record(model):
    with iv.trace(model) as t:
        s1, s2 = t.source(), t.source()
        s1.layer[0].resid_post[:, 1] = s2.layer[2].resid_post[:, 1]
        s1.layer[2].resid_post.save("s1_resid_post")
        t.layer[1].resid_post[:, 1] = s1.layer[2].resid_post[:, 1]
        t.logits.save("logits")
    return t.program

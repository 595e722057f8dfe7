"""Two sources: positions from each, and a site averaged over both.

Layer 1 resid_pre position 1 from source 1, position 2 from source 2; layer 2 mlp.out
is the mean of the two sources' (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 2


def record(model):
    with iv.trace(model) as t:
        s1, s2 = t.source(), t.source()
        t.layer[1].resid_pre[:, 1] = s1.layer[1].resid_pre[:, 1]
        t.layer[1].resid_pre[:, 2] = s2.layer[1].resid_pre[:, 2]
        t.layer[2].mlp.out = (s1.layer[2].mlp.out + s2.layer[2].mlp.out) / 2
        t.layer[1].resid_pre.save("resid_pre1")
        t.layer[2].mlp.out.save("mlp_out2")
        t.logits.save("logits")
    return t.program

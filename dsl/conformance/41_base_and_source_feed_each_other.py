"""A base and a source that feed each other at the same layers (one shared forward pass).

The source takes the base's layer 1 resid_pre at position 0; the base takes the source's
(so changed) layer 2 mlp.out. Neither needs a later site of the other, so the runs must be
batched together even under schedule="sequential". Saves both runs' logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        src.layer[1].resid_pre[:, 0] = t.layer[1].resid_pre[:, 0]
        t.layer[2].mlp.out = src.layer[2].mlp.out
        src.logits.save("src_logits")
        t.layer[2].mlp.out.save("mlp_out")
        t.logits.save("logits")
    return t.program

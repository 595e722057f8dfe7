"""Two writes where the second reads the first's effect (downstream, and at one site).

Layer 0 mlp.out[:, 1] from the source; then layer 1 resid_pre[:, 3] += layer 0's
resid_post[:, 1] (which carries the first write). At layer 1 mlp.out, position 0 comes from
the source and position 2 becomes twice the new position 0 (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[0].mlp.out[:, 1] = src.layer[0].mlp.out[:, 1]
        t.layer[1].resid_pre[:, 3] += t.layer[0].resid_post[:, 1]
        t.layer[1].resid_pre.save("resid_pre1")
        t.layer[1].mlp.out[:, 0] = src.layer[1].mlp.out[:, 0]
        t.layer[1].mlp.out[:, 2] = t.layer[1].mlp.out[:, 0] * 2
        t.layer[1].mlp.out.save("mlp_out1")
        t.logits.save("logits")
    return t.program

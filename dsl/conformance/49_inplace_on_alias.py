"""In-place operators on a value read from a site write that site (torch aliasing).

x = t.layer[0].mlp.out; x += 100.0 writes layer 0 mlp.out, exactly as
t.layer[0].mlp.out += 100.0 (the case of issue 10). The shift makes the residual
stream about 100 in magnitude, so the LayerNorms after it cancel at that magnitude:
MAGNITUDE tells the harness to judge rounding at 100, not at the saved values' size;
y = t.layer[1].resid_post[:, 2]; y -= the source's writes that slice;
w = t.layer[2].mlp.out[:, -1][1]; w *= 3.0 (a view of a view) writes mlp.out[1, -1].
Saves the aliases after their writes and the sites (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1
MAGNITUDE = 100.0  # the largest intermediate value: the rounding scale


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        x = t.layer[0].mlp.out
        x += 100.0
        x.save("x")
        y = t.layer[1].resid_post[:, 2]
        y -= src.layer[1].resid_post[:, 2]
        y.save("y")
        w = t.layer[2].mlp.out[:, -1][1]
        w *= 3.0
        w.save("w")
        t.layer[0].mlp.out.save("mlp_out0")
        t.layer[1].resid_post.save("resid_post1")
        t.layer[2].mlp.out.save("mlp_out2")
        t.logits.save("logits")
    return t.program

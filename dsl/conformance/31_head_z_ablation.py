"""Per-head z-ablation: heads 0 and 3 of layer 2 zeroed at attn.head[h].z (loop over ints).

Saves layer 2's z, its attention output and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 0


def record(model):
    with iv.trace(model) as t:
        for h in (0, 3):
            t.layer[2].attn.head[h].z = 0.0
        t.layer[2].attn.z.save("z")
        t.layer[2].attn.out.save("attn_out")
        t.logits.save("logits")
    return t.program

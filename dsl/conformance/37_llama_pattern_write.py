"""Attention pattern on Llama (rotary, GQA): read, then write a blend with the source's.

Layer 0's pattern becomes the average of the base's and the source's; saves both
patterns, the z it produces and the logits (Llama).
"""

import tracevene as iv

MODEL = "llama"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        base_p, src_p = t.layer[0].attn.pattern, src.layer[0].attn.pattern
        base_p.save("pattern_base")
        src_p.save("pattern_src")
        t.layer[0].attn.pattern = (base_p + src_p) / 2
        t.layer[0].attn.z.save("z")
        t.logits.save("logits")
    return t.program

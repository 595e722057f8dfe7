"""Write attn.pattern: layer 1's attention probabilities replaced by the source's.

Reads the base pattern before the write and after it, the source pattern, the z that
the new pattern produces and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].attn.pattern.save("pattern_before")
        src.layer[1].attn.pattern.save("src_pattern")
        t.layer[1].attn.pattern = src.layer[1].attn.pattern
        t.layer[1].attn.pattern.save("pattern_after")
        t.layer[1].attn.z.save("z")
        t.logits.save("logits")
    return t.program

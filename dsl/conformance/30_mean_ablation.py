"""Mean ablation: layer 1 attn.out replaced by its mean over a reference run's batch and positions.

The reference activations come from a source run (the "dataset"); saves the mean, the
ablated site and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        ref = t.source()
        mean = ref.layer[1].attn.out.mean(dim=(0, 1))
        mean.save("mean")
        t.layer[1].attn.out = mean
        t.layer[1].attn.out.save("attn_out")
        t.logits.save("logits")
    return t.program

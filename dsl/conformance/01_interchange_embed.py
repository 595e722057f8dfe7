"""Interchange at embed: position 1 of the embeddings comes from the source.

Saves the patched embeddings and the logits (GPT-2).
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.embed[:, 1] = src.embed[:, 1]
        t.embed.save("embed")
        t.logits.save("logits")
    return t.program

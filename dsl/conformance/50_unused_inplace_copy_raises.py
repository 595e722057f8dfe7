"""An in-place operator on a computed value that nothing then uses is refused.

y = t.layer[0].mlp.out * 2.0; y += 1.0 changes a copy (y is computed, not an
alias of the site) and nothing reads y afterwards, so the change could not take
effect: recording raises TraceError naming the line, on every backend, rather than
running a program that silently ignores it (issue 10's "no silent no-op").
RAISES names the error class in tracevene and MATCH the start of its message.
"""

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 0
RAISES = "TraceError"
MATCH = r"line 50_unused_inplace_copy_raises\.py:\d+: this `\+=` changes a copy of a computed value"


def record(model):
    with iv.trace(model) as t:
        y = t.layer[0].mlp.out * 2.0
        y += 1.0
        t.logits.save("logits")
    return t.program

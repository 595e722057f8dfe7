"""Head-level value patching and pattern reads on BERT (MiniLM, bidirectional attention).

Layer 1 head 3's values from the source; saves the (non-causal) pattern, the attention
output (before its LayerNorm) and resid_mid (after it) (MiniLM).
"""

import tracevene as iv

MODEL = "minilm"
N_SOURCES = 1


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].attn.head[3].v = src.layer[1].attn.head[3].v
        t.layer[1].attn.pattern.save("pattern")
        t.layer[1].attn.out.save("attn_out")
        t.layer[1].resid_mid.save("resid_mid")
    return t.program

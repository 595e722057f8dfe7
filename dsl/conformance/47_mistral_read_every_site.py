"""Reads of every site kind on Mistral, whose head_dim (16) is not d_model / n_heads (8).

No writes: each site of layer 1 (and the top-level ones) is saved as it is, with the
per-head slices of head 3 (key-value head 1 for k and v) (Mistral).
"""

import tracevene as iv

MODEL = "mistral"
N_SOURCES = 0


def record(model):
    with iv.trace(model) as t:
        t.embed.save("embed")
        layer, attn = t.layer[1], t.layer[1].attn
        for name in ("resid_pre", "resid_mid", "resid_post"):
            getattr(layer, name).save(name)
        for name in ("q", "k", "v", "pattern", "z"):
            getattr(attn, name).save(name)
        attn.out.save("attn_out")
        for name in ("q", "pattern", "z", "out"):
            getattr(attn.head[3], name).save(f"{name}_head3")
        for name in ("k", "v"):
            getattr(attn.head[1], name).save(f"{name}_head1")
        layer.mlp.hidden.save("hidden")
        layer.mlp.out.save("mlp_out")
        t.final.save("final")
        t.logits.save("logits")
    return t.program

"""Interchange at every site kind on GPT-NeoX (interleaved qkv, parallel residual).

Each site (whole-tensor and per-head; no resid_mid in a parallel block) takes one slice
from the source and is saved right after its write; the logits carry all of them (NeoX).
"""

import tracevene as iv

MODEL = "neox"
N_SOURCES = 1


class _Index:
    def __getitem__(self, index):
        return index


ix = _Index()

# (save name, site of a run, index written from the source), in forward order
WRITES = [
    ("embed", lambda r: r.embed, ix[:, 0]),
    ("resid_pre0", lambda r: r.layer[0].resid_pre, ix[:, 1]),
    ("q0", lambda r: r.layer[0].attn.q, ix[:, 2]),
    ("k0", lambda r: r.layer[0].attn.k, ix[:, 3]),
    ("v0", lambda r: r.layer[0].attn.v, ix[:, :, 1]),
    ("pattern0", lambda r: r.layer[0].attn.pattern, ix[:, :, 4]),
    ("z0", lambda r: r.layer[0].attn.z, ix[:, 5]),
    ("k1_head3", lambda r: r.layer[1].attn.head[3].k, ix[:, 1]),
    ("attn_out1", lambda r: r.layer[1].attn.out, ix[:, 1]),
    ("hidden1", lambda r: r.layer[1].mlp.hidden, ix[:, 3]),
    ("mlp_out1", lambda r: r.layer[1].mlp.out, ix[:, 4]),
    ("resid_post1", lambda r: r.layer[1].resid_post, ix[:, 5]),
    ("pattern2_head0", lambda r: r.layer[2].attn.head[0].pattern, ix[:, 4]),
    ("out2_head2", lambda r: r.layer[2].attn.head[2].out, ix[:, 2]),
    ("final", lambda r: r.final, ix[:, 0]),
]


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        for name, site, index in WRITES:
            site(t)[index] = site(src)[index]
            site(t).save(name)
        t.logits.save("logits")
    return t.program

"""Interchange at every site kind on BERT (all-MiniLM-L6-v2: post-LayerNorm, no causal mask).

Each site (whole-tensor and per-head; BERT has no final norm and no LM head here) takes
one slice from the source and is saved right after its write; the last layer's output
carries all of them (MiniLM).
"""

import tracevene as iv

MODEL = "minilm"
N_SOURCES = 1


class _Index:
    def __getitem__(self, index):
        return index


ix = _Index()

# (save name, site of a run, index written from the source), in forward order
WRITES = [
    ("embed", lambda r: r.embed, ix[:, 1]),
    ("resid_pre0", lambda r: r.layer[0].resid_pre, ix[:, 2]),
    ("q0", lambda r: r.layer[0].attn.q, ix[:, 3]),
    ("k0", lambda r: r.layer[0].attn.k, ix[:, 4]),
    ("v0", lambda r: r.layer[0].attn.v, ix[:, :, 5]),
    ("pattern0", lambda r: r.layer[0].attn.pattern, ix[:, :, 6]),
    ("z0", lambda r: r.layer[0].attn.z, ix[:, 1]),
    ("q1_head7", lambda r: r.layer[1].attn.head[7].q, ix[:, 2]),
    ("attn_out1", lambda r: r.layer[1].attn.out, ix[:, 3]),
    ("resid_mid1", lambda r: r.layer[1].resid_mid, ix[:, 4]),
    ("hidden1", lambda r: r.layer[1].mlp.hidden, ix[:, 5]),
    ("mlp_out1", lambda r: r.layer[1].mlp.out, ix[:, 6]),
    ("resid_post1", lambda r: r.layer[1].resid_post, ix[:, 1]),
    ("pattern2_head5", lambda r: r.layer[2].attn.head[5].pattern, ix[:, 2]),
    ("out2_head11", lambda r: r.layer[2].attn.head[11].out, ix[:, 3]),
]


def record(model):
    with iv.trace(model) as t:
        src = t.source()
        for name, site, index in WRITES:
            site(t)[index] = site(src)[index]
            site(t).save(name)
        t.layer[5].resid_post.save("last")
    return t.program

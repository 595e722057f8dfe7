"""Interchange at every site kind on Llama (GQA, rotary, gated MLP), in one program.

Each site (whole-tensor and per-head) takes one slice from the source and is saved right
after its write; the logits carry all the writes together (Llama).
"""

import tracevene as iv

MODEL = "llama"
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
    ("q1_head2", lambda r: r.layer[1].attn.head[2].q, ix[:, 1]),
    ("v1_head0", lambda r: r.layer[1].attn.head[0].v, ix[:, 2:]),
    ("attn_out1", lambda r: r.layer[1].attn.out, ix[:, 1]),
    ("resid_mid1", lambda r: r.layer[1].resid_mid, ix[:, 2]),
    ("hidden1", lambda r: r.layer[1].mlp.hidden, ix[:, 3]),
    ("mlp_out1", lambda r: r.layer[1].mlp.out, ix[:, 4]),
    ("resid_post1", lambda r: r.layer[1].resid_post, ix[:, 5]),
    ("pattern2_head3", lambda r: r.layer[2].attn.head[3].pattern, ix[:, 4]),
    ("z2_head2", lambda r: r.layer[2].attn.head[2].z, ix[:, 3]),
    ("out2_head1", lambda r: r.layer[2].attn.head[1].out, ix[:, 2]),
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

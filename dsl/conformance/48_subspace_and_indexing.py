"""Indexing forms: ellipsis subspaces, boolean masks, negative layer/head indices, None, @.

Layer 1 resid_post's first 16 dims from the source (a subspace interchange); a direction
projected out of layer[-1].resid_pre with @ (directional ablation); layer 0 mlp.out at
the positions of a boolean mask from the source; saves head[-1]'s z and a q.k einsum
(GPT-2).
"""

import torch

import tracevene as iv

MODEL = "gpt2"
N_SOURCES = 1


def direction():
    u = torch.randn(32, generator=torch.Generator().manual_seed(48))
    return u / u.norm()


MASK = torch.tensor([[True, False, True, False, False, True],
                     [False, True, False, False, True, False]])  # fmt: skip


def record(model):
    u = direction()
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].resid_post[..., :16] = src.layer[1].resid_post[..., :16]
        x = t.layer[-1].resid_pre
        t.layer[-1].resid_pre = x - (x @ u)[..., None] * u
        t.layer[0].mlp.out[MASK] = src.layer[0].mlp.out[MASK]
        t.layer[1].resid_post.save("resid_post1")
        t.layer[2].resid_pre.save("resid_pre2")
        t.layer[0].mlp.out.save("mlp_out0")
        t.layer[2].attn.head[-1].z.save("z_last_head")
        attn = t.layer[2].attn
        torch.einsum("bphd,bphd->bph", attn.q, attn.k).save("qk")
        t.logits.save("logits")
    return t.program

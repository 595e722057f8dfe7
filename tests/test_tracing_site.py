"""``run.site(name, layer=, head=)``: the same sites and programs as the attribute paths."""

from __future__ import annotations

import pytest
import torch

import tracevene as iv
from models import gpt2, tokens

CASES = [
    (("embed",), lambda r: r.embed),
    (("final",), lambda r: r.final),
    (("logits",), lambda r: r.logits),
    (("resid_pre", 0), lambda r: r.layer[0].resid_pre),
    (("resid_mid", 1), lambda r: r.layer[1].resid_mid),
    (("resid_post", -1), lambda r: r.layer[-1].resid_post),
    (("attn.z", 2), lambda r: r.layer[2].attn.z),
    (("attn.pattern", 1, 3), lambda r: r.layer[1].attn.head[3].pattern),
    (("attn.out", 0, 1), lambda r: r.layer[0].attn.head[1].out),
    (("attn.q", 2, -1), lambda r: r.layer[2].attn.head[-1].q),
    (("mlp.hidden", 1), lambda r: r.layer[1].mlp.hidden),
    (("mlp.out", 2), lambda r: r.layer[2].mlp.out),
]


def _nodes(program: iv.Program) -> list[tuple]:
    """The program's nodes without their source lines."""
    return [(n.op, n.target, n.run, n.args, n.kwargs) for n in program.nodes]


@pytest.fixture(scope="module")
def model() -> iv.Model:
    return iv.wrap(gpt2(), backend="torch")


@pytest.mark.parametrize(("args", "path"), CASES, ids=[str(c[0]) for c in CASES])
def test_site_records_the_program_of_the_attribute_path(model, args, path):
    name, *rest = args
    kwargs = dict(zip(("layer", "head"), rest, strict=False))
    with iv.trace(model) as by_name:
        src = by_name.source()
        by_name.site(name, **kwargs)[:, 1] += src.site(name, **kwargs)[:, 1]
        by_name.site(name, **kwargs).save("x")
    with iv.trace(model) as by_path:
        src = by_path.source()
        path(by_path)[:, 1] += path(src)[:, 1]
        path(by_path).save("x")
    assert _nodes(by_name.program) == _nodes(by_path.program)


def test_site_writes_like_a_forward_hook(model):
    ids, scale = tokens(), 3.0

    def hook(module, args, output):
        return output * scale

    handle = model.module.transformer.h[1].mlp.register_forward_hook(hook)
    try:
        with torch.no_grad():
            expected = model.module(ids).logits
    finally:
        handle.remove()
    with iv.trace(model, ids) as t:
        t.site("mlp.out", layer=1)[:] *= scale
        logits = t.site("logits").save()
    torch.testing.assert_close(logits.value, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("args", "kwargs", "words"),
    [
        (("attn.zz",), {"layer": 0}, ["not a site name", "attn.z"]),
        (("z",), {"layer": 0}, ["not a site name", "attn.z"]),
        (("layer.0.resid_pre",), {}, ["not a site name", "layer=3"]),
        (("logits",), {"layer": 1}, ["has no layers or heads", "run.site('logits')"]),
        (("resid_pre",), {}, ["per-layer site", "layer="]),
        (("mlp.out",), {"layer": 0, "head": 1}, ["has no heads", "attn.z"]),
        (("resid_pre",), {"layer": 9}, ["layer 9 is out of range", "0..2"]),
        (("attn.z",), {"layer": 0, "head": 4}, ["head 4 is out of range", "0..3"]),
    ],
)
def test_site_errors_name_the_problem_and_the_valid_choices(model, args, kwargs, words):
    with pytest.raises(iv.SiteError) as info, iv.trace(model) as t:
        t.site(*args, **kwargs)
    for word in words:
        assert word in str(info.value)

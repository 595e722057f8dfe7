"""Activation patching sweeps against TransformerLens's own helpers and plain hooks."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching as tl_patching

import tracevene as iv
from tests import models
from tracevene.patching import activation_patching

BACKENDS = ["torch", "nnsight", "transformer_lens"]


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 5].mean() - logits[:, -1, 7].mean()


@pytest.fixture(scope="module")
def setup():
    hf = models.gpt2()
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 97, (2, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 1) % 97
    bridge = iv.wrap(hf, backend="transformer_lens").module
    _, cache = bridge.run_with_cache(clean)
    return hf, clean, corrupted, bridge, cache


# (our site, heads, TransformerLens's helper). Not resid_mid: on a TransformerBridge over
# GPT-2 (TL 4.3), hook_resid_mid edits only the MLP's input, not the residual stream
# (resid_post - mlp_out differs from the written value), so its helper measures another
# intervention; tracevene's resid_mid writes both (tests/test_conformance.py).
CASES = [
    ("resid_pre", False, tl_patching.get_act_patch_resid_pre),
    ("attn.out", False, tl_patching.get_act_patch_attn_out),
    ("mlp.out", False, tl_patching.get_act_patch_mlp_out),
    ("z", True, tl_patching.get_act_patch_attn_head_out_by_pos),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("site", "heads", "helper"), CASES, ids=[c[0] for c in CASES])
def test_denoising_equals_transformer_lens(setup, backend, site, heads, helper):
    hf, clean, corrupted, bridge, cache = setup
    expected = helper(bridge, corrupted, cache, _metric)
    model = iv.wrap(hf, backend=backend)
    got = activation_patching(model, clean, corrupted, _metric, site=site, heads=heads,
                              experiments_per_pass=5, progress=False)  # fmt: skip
    assert got.values.shape == expected.shape
    assert torch.allclose(got.values, expected.float(), atol=1e-5)
    assert got.values.abs().max() > 0  # something moved: the test can fail


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_position_at_once_equals_transformer_lens(setup, backend):
    hf, clean, corrupted, bridge, cache = setup
    expected = tl_patching.get_act_patch_attn_head_out_all_pos(bridge, corrupted, cache, _metric)
    model = iv.wrap(hf, backend=backend)
    got = activation_patching(model, clean, corrupted, _metric, site="z", heads=True,
                              positions="all", progress=False)  # fmt: skip
    assert got.axes == ("layer", "head")
    assert torch.allclose(got.values, expected.float(), atol=1e-5)
    layers = activation_patching(model, clean, corrupted, _metric, positions="all", progress=False)
    assert layers.axes == ("layer",) and layers.values.shape == (3,)
    with torch.no_grad():  # all of layer 0's input from the clean run: the clean run
        assert float(layers.values[0]) == pytest.approx(float(_metric(hf(clean).logits)), abs=1e-5)


def test_noising_equals_a_plain_hook_sweep(setup):
    hf, clean, corrupted, _, _ = setup
    model = iv.wrap(hf, backend="torch")
    got = activation_patching(model, clean, corrupted, _metric, direction="noise",
                              progress=False)  # fmt: skip
    blocks = hf.transformer.h
    kept = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: kept.__setitem__(i, a[0].clone()))
             for i, b in enumerate(blocks)]  # fmt: skip
    with torch.no_grad():
        hf(corrupted)
    for h in hooks:
        h.remove()
    for layer in range(len(blocks)):
        for pos in range(clean.shape[1]):

            def patch(m, args, layer=layer, pos=pos):
                x = args[0].clone()
                x[:, pos] = kept[layer][:, pos]
                return (x, *args[1:])

            handle = blocks[layer].register_forward_pre_hook(patch)
            try:
                with torch.no_grad():
                    expected = _metric(hf(clean).logits)
            finally:
                handle.remove()
            assert got.values[layer, pos].item() == pytest.approx(expected.item(), abs=1e-5)


def test_plot_writes_a_png(setup, tmp_path):
    hf, clean, corrupted, _, _ = setup
    result = activation_patching(iv.wrap(hf, backend="torch"), clean, corrupted, _metric,
                                 site="z", heads=True, progress=False)  # fmt: skip
    path = tmp_path / "heads.png"
    result.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_named(setup):
    hf, clean, corrupted, _, _ = setup
    model = iv.wrap(hf, backend="torch")
    with pytest.raises(ValueError, match="direction='sideways': choose 'denoise' or 'noise'"):
        activation_patching(model, clean, corrupted, _metric, direction="sideways")
    with pytest.raises(ValueError, match="positions='some': choose 'each' or 'all'"):
        activation_patching(model, clean, corrupted, _metric, positions="some")
    with pytest.raises(ValueError, match="experiments_per_pass=0 must be at least 1"):
        activation_patching(model, clean, corrupted, _metric, experiments_per_pass=0)
    with pytest.raises(iv.SiteError):
        activation_patching(model, clean, corrupted, _metric, site="resid_preee")


def test_key_and_value_heads_of_grouped_query_attention():
    hf = models.llama()  # 4 query heads, 2 key/value heads
    model = iv.wrap(hf, backend="torch")
    clean, corrupted = models.tokens(), models.tokens(seed=2)
    got = activation_patching(
        model, clean, corrupted, _metric, site="k", heads=True, progress=False
    )
    assert got.values.shape == (hf.config.num_hidden_layers, clean.shape[1], 2)
    layer, pos, head = 1, 3, 1
    with iv.trace(model, clean) as t:
        k = t.layer[layer].attn.head[head].k[:, pos].save()
    with iv.trace(model, corrupted) as t:
        t.layer[layer].attn.head[head].k[:, pos] = k.value
        logits = t.logits.save()
    assert float(got.values[layer, pos, head]) == pytest.approx(
        float(_metric(logits.value)), abs=1e-5
    )


def test_plots_are_titled_by_method(setup, tmp_path):
    hf, clean, corrupted, _, _ = setup
    result = activation_patching(hf, clean, corrupted, _metric, progress=False)
    assert (
        result.plot(tmp_path / "a.png").axes[0].get_title()
        == "activation patching (denoise): resid_pre"
    )
    bars = iv.patching.PatchResult(torch.tensor([1.0, -2.0]), ("sender",), "path", "noise",
                                   "path patching")  # fmt: skip
    assert bars.plot(tmp_path / "b.png").axes[0].get_title() == "path patching (noise): path"
    assert (tmp_path / "b.png").stat().st_size > 0

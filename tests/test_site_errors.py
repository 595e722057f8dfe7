"""Site errors on the torch backend: each message names the bad part and the way out."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import tracevene as iv
from tests import models as M
from tracevene.errors import ExecutionError, SiteError, TraceveneError


@functools.cache
def wrapped(name: str) -> iv.Model:
    build = M.minilm if name == "minilm" else M.DECODERS[name]
    return iv.wrap(build(), backend="torch")


def record(model, body, base=None):
    """Run ``body(t)`` inside a trace (recording only when ``base`` is None)."""
    with iv.trace(model, base) as t:
        body(t)
    return t


# -- unknown names ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "match"),
    [
        (lambda t: t.layer[0].mlp.outt, r"mlp\.outt: closest valid names are out\b"),
        (lambda t: t.layer[0].resid_psot, r"closest valid names are resid_post\b"),
        (lambda t: t.layer[0].attn.patern, r"attn\.patern: closest valid names are pattern\b"),
        (lambda t: t.layer[0].attn.head[1].zz, r"head\[1\]\.zz: closest valid names are z\b"),
        (lambda t: t.embedd, r"t\.embedd: closest valid names are embed\b"),
        (lambda t: t.layer[0].mlpp, r"closest valid names are mlp\b"),
    ],
)
def test_unknown_site_names_closest(body, match):
    with pytest.raises(SiteError, match=match):
        record(wrapped("gpt2"), body)


def test_unknown_site_lists_all_choices():
    with pytest.raises(SiteError, match=r"\(all: hidden, out\)"):
        record(wrapped("gpt2"), lambda t: t.layer[0].mlp.outt)


def test_unknown_site_on_a_source_names_the_source():
    def body(t):
        src = t.source()
        src.layer[0].mlp.outt  # noqa: B018

    with pytest.raises(SiteError, match=r"src1\.layer\[0\]\.mlp\.outt"):
        record(wrapped("gpt2"), body)


def test_site_errors_are_key_errors_with_plain_messages():
    with pytest.raises(KeyError) as info:
        record(wrapped("gpt2"), lambda t: t.layer[0].mlp.outt)
    assert isinstance(info.value, TraceveneError)
    assert not str(info.value).startswith(("'", '"'))  # not KeyError's quoted repr


# -- layers and heads out of range ----------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "match"),
    [
        (lambda t: t.layer[3].resid_post, r"layer 3 is out of range.*layers 0\.\.2"),
        (lambda t: t.layer[-4].resid_post, r"layer -4 is out of range.*layers 0\.\.2"),
        (lambda t: t.layer[17].mlp.out, r"layer 17 is out of range.*0\.\.2"),
        (lambda t: setattr(t.layer[3], "resid_post", 0), r"layer 3 is out of range.*0\.\.2"),
        (lambda t: t.layer[0].attn.head[4].z, r"head 4 is out of range.*heads 0\.\.3"),
        (lambda t: t.layer[1].attn.head[-5].q, r"head -5 is out of range.*heads 0\.\.3"),
    ],
)
def test_out_of_range_names_the_range(body, match):
    with pytest.raises(SiteError, match=match):
        record(wrapped("gpt2"), body)


def test_layer_range_on_minilm():
    with pytest.raises(SiteError, match=r"layer 6 is out of range.*layers 0\.\.5"):
        record(wrapped("minilm"), lambda t: t.layer[6].resid_pre)


@pytest.mark.parametrize("kv", ["k", "v"])
def test_gqa_key_value_head_range(kv):
    """Llama here has 4 query heads but 2 key-value heads."""
    model = wrapped("llama")
    with pytest.raises(SiteError, match=r"head 2 is out of range.*key/value heads 0\.\.1"):
        record(model, lambda t: getattr(t.layer[0].attn.head[2], kv))
    with pytest.raises(SiteError, match=r"key/value heads 0\.\.1"):
        record(model, lambda t: setattr(t.layer[0].attn.head[3], kv, 0.0))
    # query-side head sites still accept all four heads
    record(model, lambda t: (t.layer[0].attn.head[3].q, t.layer[0].attn.head[3].z))


def test_gqa_query_head_range():
    with pytest.raises(SiteError, match=r"head 4 is out of range.*0\.\.3"):
        record(wrapped("llama"), lambda t: t.layer[0].attn.head[4].q)


@pytest.mark.parametrize("index", ["a", 1.0, True, slice(0, 2)])
def test_layer_index_must_be_an_int(index):
    with pytest.raises(SiteError, match=r"layer\[.*\]: index layers with a plain int"):
        record(wrapped("gpt2"), lambda t: t.layer[index])


def test_head_index_must_be_an_int():
    with pytest.raises(SiteError, match=r"head\['a'\]: index heads with a plain int"):
        record(wrapped("gpt2"), lambda t: t.layer[0].attn.head["a"])


# -- sites an architecture does not have ----------------------------------------------------
def test_resid_mid_on_parallel_neox():
    model = wrapped("neox")
    assert model.module.config.use_parallel_residual
    with pytest.raises(SiteError, match=r"resid_mid is not available.*in parallel"):
        record(model, lambda t: t.layer[0].resid_mid)
    with pytest.raises(SiteError, match=r"resid_mid is not available"):
        record(model, lambda t: setattr(t.layer[1], "resid_mid", 0.0))


def test_resid_mid_on_gptj():
    """GPT-J's attention and MLP always read ln_1's output in parallel (no config flag)."""
    model = wrapped("gptj")
    with pytest.raises(SiteError, match=r"resid_mid is not available.*GPT-J.*in parallel"):
        record(model, lambda t: t.layer[0].resid_mid)
    with pytest.raises(SiteError, match=r"resid_mid is not available"):
        record(model, lambda t: setattr(t.layer[1], "resid_mid", 0.0))


def test_resid_mid_on_sequential_neox_exists():
    model = iv.wrap(M.neox(use_parallel_residual=False), backend="torch")
    ids = M.tokens()
    t = record(model, lambda t: t.layer[0].resid_mid.save("mid"), ids)
    assert t.program.run(model, ids)["mid"].shape == (2, 6, 32)


def test_final_on_bert():
    with pytest.raises(SiteError, match=r"final is not available.*no final norm"):
        record(wrapped("minilm"), lambda t: t.final)


def test_logits_on_bare_bert_model():
    model = wrapped("minilm")
    assert type(model.module).__name__ == "BertModel"
    with pytest.raises(SiteError, match=r"logits is not available on this BertModel"):
        record(model, lambda t: t.logits)
    assert "logits" not in model.sites()


def test_logits_on_bare_gpt2_model():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=M.VOCAB)
    model = iv.wrap(transformers.GPT2Model(cfg).eval(), backend="torch")
    sites = model.sites()
    assert "final" in sites and "logits" not in sites
    with pytest.raises(SiteError, match=r"logits is not available on this GPT2Model.*'lm_head'"):
        record(model, lambda t: t.logits)
    t = record(model, lambda t: t.final.save("f"), M.tokens())
    assert torch.equal(t.program.run(model, M.tokens())["f"], t.output.last_hidden_state)


def test_vocabulary_site_on_a_model_without_a_table():
    model = iv.wrap(M.mlp(), backend="torch")
    with pytest.raises(SiteError, match=r"no site table.*t\.module"):
        record(model, lambda t: t.layer[0].resid_post)


def test_hook_sites_need_transformer_lens():
    with pytest.raises(SiteError, match=r"hook sites need the transformer_lens backend"):
        record(wrapped("gpt2"), lambda t: t.hook("blocks.0.hook_mlp_out"))


# -- module paths ---------------------------------------------------------------------------
def test_missing_module_path_names_closest():
    with pytest.raises(
        SiteError,
        match=r"no module 'transformer\.h\.0\.mlpp'.*closest paths: 'transformer\.h\.0\.mlp'",
    ):
        record(wrapped("gpt2"), lambda t: t.module("transformer.h.0.mlpp").output)


def test_missing_module_path_on_plain_module():
    model = iv.wrap(M.gru(), backend="torch")
    with pytest.raises(SiteError, match=r"no module 'heda'.*closest paths: 'head'"):
        record(model, lambda t: t.module("heda").input)


class Twice(nn.Module):
    """Calls one submodule twice: its sites are ambiguous."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.lin(self.lin(x)))


class Skips(nn.Module):
    """Has a submodule its forward never calls."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


def _no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


@pytest.mark.parametrize("io", ["input", "output"])
@pytest.mark.parametrize("write", [False, True])
def test_module_that_runs_twice(io, write):
    net = Twice().eval()
    model = iv.wrap(net, backend="torch")
    x = torch.randn(2, 4)

    def body(t):
        sites = t.module("lin")
        if write:
            setattr(sites, io, torch.zeros(2, 4))
        else:
            getattr(sites, io).save()

    with pytest.raises(ExecutionError, match=r"module 'lin' ran more than once"):
        record(model, body, x)
    assert _no_hooks(net)  # the failed run left nothing behind
    # the module that runs once is fine
    t = record(model, lambda t: t.module("out").input.save("h"), x)
    assert t.output.shape == (2, 2)


@pytest.mark.parametrize("write", [False, True])
def test_module_that_never_runs(write):
    net = Skips().eval()
    model = iv.wrap(net, backend="torch")
    x = torch.randn(2, 4)

    def body(t):
        if write:
            t.module("unused").output = torch.zeros(2, 4)
        else:
            t.module("unused").output.save()

    with pytest.raises(
        ExecutionError, match=r"base\.module\('unused'\)\.output never ran.*unpatched"
    ):
        record(model, body, x)
    assert _no_hooks(net)


def test_module_that_never_runs_in_a_source():
    model = iv.wrap(Skips().eval(), backend="torch")
    x = torch.randn(2, 4)

    def body(t):
        src = t.source(x)
        t.module("used").output = src.module("unused").output

    with pytest.raises(ExecutionError, match=r"src1\.module\('unused'\)\.output never ran"):
        record(model, body, x)


def test_module_that_never_runs_among_sites_that_do():
    """One missing site fails the run even when the others fire."""
    model = iv.wrap(Skips().eval(), backend="torch")
    x = torch.randn(2, 4)

    def body(t):
        t.module("used").output.save()
        t.module("unused").input.save()

    with pytest.raises(ExecutionError, match=r"module\('unused'\)\.input never ran"):
        record(model, body, x)

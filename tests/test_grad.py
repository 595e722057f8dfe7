"""Gradients: programs are differentiable in their intervention modules' parameters,
the model's own parameters stay frozen (and untouched), and programs with nothing to
train build no autograd graph.

Every gradient is compared with one from a plain-hook implementation of the same
intervention on an identical copy of the model.
"""

from __future__ import annotations

import copy

import numerics
import pytest
import torch
from torch import nn

import models
import tracevene as iv
from models import Rotate

B, P, D = 2, 6, 32


def close(a, b, what="program value or gradient vs the plain-hook reference"):
    numerics.assert_close(a, b, what=what)


@pytest.fixture
def gpt2():
    return models.gpt2()


@pytest.fixture
def ids():
    return models.tokens(B, P, seed=1), models.tokens(B, P, seed=2)


def forward_with_hooks(module, ids, read=(), edit=None):
    """Plain forward with hooks (gradients enabled); returns (captured, logits)."""
    mods = dict(module.named_modules())
    captured = {}
    handles = [
        mods[p].register_forward_hook(lambda m, a, o, fn=fn: fn(o))
        for p, fn in (edit or {}).items()
    ]
    handles += [
        mods[p].register_forward_hook(lambda m, a, o, p=p: captured.__setitem__(p, o)) for p in read
    ]
    try:
        logits = module(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return captured, logits


def model_untouched(gpt2):
    return all(p.grad is None and p.requires_grad for p in gpt2.parameters())


@pytest.mark.parametrize("schedule", ["sequential", "batched"])
def test_linear_on_residual_gets_the_hook_gradient(gpt2, ids, schedule):
    base, _ = ids
    lin = nn.Linear(D, D)
    ref_lin, ref_model = copy.deepcopy(lin), copy.deepcopy(gpt2)
    model = iv.wrap(gpt2, backend="torch")
    with iv.trace(model, base, schedule=schedule) as t:
        t.layer[1].resid_post = lin(t.layer[1].resid_post)
        loss = t.logits[:, -1].logsumexp(-1).sum().save("loss")
    assert loss.value.requires_grad
    loss.value.backward()

    _, logits = forward_with_hooks(ref_model, base, edit={"transformer.h.1": ref_lin})
    ref_loss = logits[:, -1].logsumexp(-1).sum()
    ref_loss.backward()
    close(loss.value.detach(), ref_loss.detach())
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    close(lin.weight.grad, ref_lin.weight.grad)
    close(lin.bias.grad, ref_lin.bias.grad)
    assert model_untouched(gpt2)


@pytest.mark.parametrize("schedule", ["sequential", "batched"])
def test_rotation_interchange_gets_the_hook_gradient(gpt2, ids, schedule):
    base, source = ids
    labels = torch.tensor([3, 7])
    rot = Rotate(D, 8)
    ref_rot, ref_model = copy.deepcopy(rot), copy.deepcopy(gpt2)
    model = iv.wrap(gpt2, backend="torch")
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].resid_post[:, -1] = rot(
            t.layer[1].resid_post[:, -1], src.layer[1].resid_post[:, -1]
        )
        torch.nn.functional.cross_entropy(t.logits[:, -1], labels).save("loss")
    result = t.program.run(model, base, [source], schedule=schedule)
    result["loss"].backward()

    got, _ = forward_with_hooks(ref_model, source, read=["transformer.h.1"])
    src_h = got["transformer.h.1"][:, -1]

    def patch(o):
        new = o.clone()
        new[:, -1] = ref_rot(o[:, -1], src_h)
        return new

    _, logits = forward_with_hooks(ref_model, base, edit={"transformer.h.1": patch})
    ref_loss = torch.nn.functional.cross_entropy(logits[:, -1], labels)
    ref_loss.backward()
    close(result["loss"].detach(), ref_loss.detach())
    grad = rot.rot.parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0
    close(grad, ref_rot.rot.parametrizations.weight.original.grad)
    assert model_untouched(gpt2)


def test_steering_vector_parameter_gets_the_hook_gradient(gpt2, ids):
    base, _ = ids
    vec = nn.Parameter(torch.randn(D) * 0.1)
    ref_vec, ref_model = nn.Parameter(vec.detach().clone()), copy.deepcopy(gpt2)
    model = iv.wrap(gpt2, backend="torch")
    with iv.trace(model, base) as t:
        t.layer[0].resid_post[:, 2:] += vec
        loss = t.logits.softmax(-1)[..., 5].sum().save()
    loss.value.backward()

    def steer(o):
        o = o.clone()
        o[:, 2:] += ref_vec
        return o

    _, logits = forward_with_hooks(ref_model, base, edit={"transformer.h.0": steer})
    logits.softmax(-1)[..., 5].sum().backward()
    close(vec.grad, ref_vec.grad)
    assert model_untouched(gpt2)


def test_training_steps_match_hook_training(gpt2, ids):
    base, _ = ids
    target = torch.randn(B, D)
    lin = nn.Linear(D, D)
    ref_lin, ref_model = copy.deepcopy(lin), copy.deepcopy(gpt2)
    model = iv.wrap(gpt2, backend="torch")
    with iv.trace(model) as t:
        t.layer[0].mlp.out = lin(t.layer[0].mlp.out)
        ((t.layer[2].resid_post[:, -1] - target) ** 2).mean().save("loss")
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref_lin.parameters(), lr=0.5)
    losses, ref_losses = [], []
    for _ in range(3):
        opt.zero_grad()
        loss = t.program.run(model, base)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())

        ref_opt.zero_grad()
        got, _ = forward_with_hooks(
            ref_model, base, read=["transformer.h.2"], edit={"transformer.h.0.mlp": ref_lin}
        )
        ref_loss = ((got["transformer.h.2"][:, -1] - target) ** 2).mean()
        ref_loss.backward()
        ref_opt.step()
        ref_losses.append(ref_loss.item())
    # each step's rounding feeds the next
    numerics.assert_close(
        torch.tensor(losses), torch.tensor(ref_losses), what="losses over 3 Adam steps",
        ulps=numerics.TRAINED,
    )  # fmt: skip
    assert losses[-1] < losses[0]
    close(lin.weight, ref_lin.weight, what="trained weights vs plain hooks")
    assert model_untouched(gpt2)


def test_model_parameters_frozen_only_while_running(gpt2, ids):
    base, _ = ids
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            seen.append(any(p.requires_grad for p in gpt2.parameters()))
            return x * self.scale

    model = iv.wrap(gpt2, backend="torch")
    with iv.trace(model, base) as t:
        t.layer[1].mlp.out = Spy()(t.layer[1].mlp.out)
        loss = t.logits.sum().save()
    loss.value.backward()
    assert seen == [False]
    assert model_untouched(gpt2)


# -- no graph when nothing is trainable ---------------------------------------------------------
def _saves_without_graph(result_values):
    return all(not v.requires_grad and v.grad_fn is None for v in result_values)


def test_no_trainable_modules_builds_no_graph(gpt2, ids):
    base, source = ids
    assert all(p.requires_grad for p in gpt2.parameters())  # the model itself is trainable
    model = iv.wrap(gpt2, backend="torch")
    frozen = nn.Linear(D, D).requires_grad_(False)
    with iv.trace(model, base) as t:
        src = t.source(source)
        t.layer[1].mlp.out[:, 2] = src.layer[1].mlp.out[:, 2]
        t.layer[2].resid_post = frozen(nn.functional.gelu(t.layer[2].resid_post))
        a = t.layer[0].resid_post.save()
        b = t.logits.save()
        c = nn.ReLU()(t.layer[1].resid_post).sum().save()
    assert _saves_without_graph([a.value, b.value, c.value])
    assert not t.output.logits.requires_grad
    assert model_untouched(gpt2)


def test_trainable_module_under_no_grad_builds_no_graph(gpt2, ids):
    base, _ = ids
    lin = nn.Linear(D, D)
    model = iv.wrap(gpt2, backend="torch")
    with torch.no_grad():
        with iv.trace(model, base) as t:
            t.layer[1].resid_post = lin(t.layer[1].resid_post)
            out = t.logits.save()
    assert _saves_without_graph([out.value])
    assert model_untouched(gpt2)


def test_module_site_model_gradients(ids):
    """The same on a model without a site table (module sites)."""
    mlp = models.mlp()
    x = torch.randn(5, 4)
    scale = nn.Linear(16, 16)
    ref_scale, ref_mlp = copy.deepcopy(scale), copy.deepcopy(mlp)
    model = iv.wrap(mlp, backend="torch")
    with iv.trace(model, x) as t:
        t.module("1").output = scale(t.module("1").output)
        out = t.module("4").output.pow(2).sum().save()
    out.value.backward()
    h = ref_mlp[:2](x)
    ref = ref_mlp[2:](ref_scale(h)).pow(2).sum()
    ref.backward()
    close(out.value.detach(), ref.detach())
    close(scale.weight.grad, ref_scale.weight.grad)
    assert all(p.grad is None and p.requires_grad for p in mlp.parameters())


class ScaleByModelParam(nn.Module):
    """An intervention that shares a parameter with the model it intervenes on."""

    def __init__(self, shared: nn.Parameter):
        super().__init__()
        self.shared = shared

    def forward(self, x):
        return x * self.shared.mean()


def test_a_parameter_shared_with_the_model_still_gets_its_gradient():
    hf = models.gpt2()
    ref = copy.deepcopy(hf)
    ids = models.tokens()
    shared = hf.transformer.ln_f.weight
    with iv.trace(iv.wrap(hf), ids) as t:
        h = t.layer[1].resid_post
        t.layer[1].resid_post = ScaleByModelParam(shared)(h)
        loss = t.logits.sum().save()
    loss.value.backward()

    p = ref.transformer.ln_f.weight
    hook = ref.transformer.h[1].register_forward_hook(lambda m, i, o: o * p.mean())
    ref(ids).logits.sum().backward()
    hook.remove()
    assert shared.grad is not None
    close(shared.grad, p.grad)
    assert all(q.grad is None for n, q in hf.named_parameters() if n != "transformer.ln_f.weight")

"""Nothing outlives a trace: hooks, the patched ``nn.Module.__call__``, the attention
implementation and ``requires_grad`` are restored whatever is raised, and the model
computes exactly what it computed before.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.modules.module as torch_module
from torch import nn

import models
import tracevene as iv
from tracevene.runtime import attention

B, P, D = 2, 6, 32
ORIGINAL_CALL = nn.Module.__call__
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_forward_hooks_with_kwargs",
    "_global_backward_hooks",
)


def snapshot(module: nn.Module) -> dict:
    """Everything a run could leave behind on a model."""
    return {
        "hooks": {
            (name, attr): dict(getattr(m, attr))
            for name, m in module.named_modules()
            for attr in HOOK_DICTS
        },
        "global": {attr: dict(getattr(torch_module, attr)) for attr in GLOBAL_HOOKS},
        "configs": {
            name: m.config._attn_implementation
            for name, m in module.named_modules()
            if getattr(m, "config", None) is not None
        },
        "requires_grad": {name: p.requires_grad for name, p in module.named_parameters()},
        "grads": {name: p.grad for name, p in module.named_parameters()},
    }


def assert_clean(module: nn.Module, before: dict, ids: torch.Tensor, logits: torch.Tensor):
    after = snapshot(module)
    assert after["hooks"] == before["hooks"]
    assert after["global"] == before["global"]
    assert after["configs"] == before["configs"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is None for g in after["grads"].values())
    assert attention.PATTERN_HOOKS == {}
    assert nn.Module.__call__ is ORIGINAL_CALL
    with torch.no_grad():
        assert torch.equal(module(ids).logits, logits)


@pytest.fixture(params=["eager", "sdpa"])
def setup(request):
    gpt2 = models.gpt2(attn_implementation=request.param)
    ids = models.tokens(B, P, seed=1)
    with torch.no_grad():
        logits = gpt2(ids).logits
    return gpt2, iv.wrap(gpt2, backend="torch"), ids, logits


def test_a_clean_run_leaves_nothing(setup):
    gpt2, model, ids, logits = setup
    before = snapshot(gpt2)
    with iv.trace(model, ids) as t:
        src = t.source(models.tokens(B, P, seed=2))
        t.layer[0].attn.pattern.save()
        t.layer[1].mlp.out[:, 1] = src.layer[1].mlp.out[:, 1]
        t.layer[2].attn.head[1].z.save()
        t.layer[1].resid_mid.save()
    assert_clean(gpt2, before, ids, logits)


def test_user_exception_inside_block(setup):
    gpt2, model, ids, logits = setup
    before = snapshot(gpt2)
    with pytest.raises(RuntimeError, match="user code failed"):
        with iv.trace(model, ids) as t:
            t.layer[0].attn.pattern.save()
            t.layer[1].mlp.out = t.layer[1].mlp.out * 0
            assert nn.Module.__call__ is not ORIGINAL_CALL  # patched while recording
            raise RuntimeError("user code failed")
    assert_clean(gpt2, before, ids, logits)
    # ... and the next block works normally.
    with iv.trace(model, ids) as t:
        out = t.logits.save()
    assert torch.equal(out.value, logits)


def test_trace_error_inside_block(setup):
    gpt2, model, ids, logits = setup
    before = snapshot(gpt2)
    with pytest.raises(iv.TraceError, match="cannot branch on"):
        with iv.trace(model, ids) as t:
            if t.layer[0].mlp.out.sum() > 0:
                pass
    assert_clean(gpt2, before, ids, logits)


def test_shape_error_from_a_bad_write_during_the_run(setup):
    gpt2, model, ids, logits = setup
    before = snapshot(gpt2)
    with pytest.raises(iv.ShapeError, match=r"cannot write a value of shape \(3,\)"):
        with iv.trace(model, ids) as t:
            src = t.source(models.tokens(B, P, seed=2))
            t.layer[0].attn.pattern.save()  # routes attention through tracevene's kernel
            t.layer[0].mlp.out = src.layer[0].mlp.out
            t.layer[1].attn.head[0].z.save()
            t.layer[2].mlp.out[:, 0] = torch.zeros(3)  # fails mid-forward
            t.logits.save()
    assert_clean(gpt2, before, ids, logits)


def test_model_exception_during_the_run(setup):
    gpt2, model, ids, logits = setup
    before = snapshot(gpt2)

    def explode(module, args, output):
        raise RuntimeError("model failed")

    handle = gpt2.transformer.h[1].register_forward_hook(explode)
    before_with_hook = snapshot(gpt2)
    try:
        with pytest.raises(RuntimeError, match="model failed"):
            with iv.trace(model, ids) as t:
                t.layer[0].attn.pattern.save()
                t.layer[0].mlp.out[:, 0] = 0.0
                t.layer[2].resid_post.save()
        assert snapshot(gpt2)["hooks"] == before_with_hook["hooks"]
    finally:
        handle.remove()
    assert_clean(gpt2, before, ids, logits)


def test_exception_in_source_pass(setup):
    gpt2, model, ids, logits = setup
    before = snapshot(gpt2)
    with pytest.raises(iv.ExecutionError, match=r"line test_cleanup\.py:\d+"):
        with iv.trace(model, ids, schedule="sequential") as t:
            src = t.source(models.tokens(B, P, seed=2))
            t.layer[1].attn.pattern.save()
            t.layer[1].mlp.out = src.layer[0].mlp.out.reshape(5, -1)  # fails in the source
    assert_clean(gpt2, before, ids, logits)


def test_exception_from_a_trainable_module_restores_requires_grad(setup):
    gpt2, model, ids, logits = setup
    gpt2.transformer.wte.weight.requires_grad_(False)  # the caller's own choice stays
    try:
        before = snapshot(gpt2)

        class Broken(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(D, D)

            def forward(self, x):
                seen.append([p.requires_grad for p in gpt2.parameters()])
                raise ValueError("intervention failed")

        seen: list[list[bool]] = []
        with pytest.raises(iv.ExecutionError, match="ValueError: intervention failed"):
            with iv.trace(model, ids) as t:
                t.layer[0].attn.pattern.save()
                t.layer[1].resid_post = Broken()(t.layer[1].resid_post)
        assert seen and not any(any(s) for s in seen)  # frozen while it ran
        assert_clean(gpt2, before, ids, logits)
        assert not gpt2.transformer.wte.weight.requires_grad
        assert gpt2.transformer.wpe.weight.requires_grad
    finally:
        gpt2.transformer.wte.weight.requires_grad_(True)


def test_unfired_site_error_leaves_nothing():
    """A site that never runs raises; its hooks still go."""
    mlp = models.mlp()
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = mlp(x)
    before = {name: dict(m._forward_hooks) for name, m in mlp.named_modules()}

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = mlp
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.inner(x)

    wrapper = Skips().eval()
    model = iv.wrap(wrapper, backend="torch")
    with pytest.raises(iv.ExecutionError, match="never ran during the forward pass"):
        with iv.trace(model, x) as t:
            t.module("inner.0").output.save()
            t.module("unused").output.save()
    assert {name: dict(m._forward_hooks) for name, m in mlp.named_modules()} == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in wrapper.modules())
    with torch.no_grad():
        assert torch.equal(mlp(x), expected)


def test_user_hook_survives_and_still_fires(setup):
    gpt2, model, ids, logits = setup
    fired: list[int] = []
    handle = gpt2.transformer.h[1].mlp.register_forward_hook(
        lambda m, a, o: fired.append(o.shape[0])
    )
    pre = gpt2.transformer.h[0].register_forward_pre_hook(lambda m, a: fired.append(-1))
    try:
        hooks = dict(gpt2.transformer.h[1].mlp._forward_hooks)
        pre_hooks = dict(gpt2.transformer.h[0]._forward_pre_hooks)
        with iv.trace(model, ids) as t:
            t.layer[1].mlp.out[:, 0] = 0.0
            t.layer[0].resid_pre.save()
        assert fired == [-1, B]  # the user's hooks fired during tracevene's pass too
        with pytest.raises(iv.ShapeError):
            with iv.trace(model, ids) as t:
                t.layer[1].mlp.out[:, 0] = torch.zeros(5)
        assert dict(gpt2.transformer.h[1].mlp._forward_hooks) == hooks
        assert dict(gpt2.transformer.h[0]._forward_pre_hooks) == pre_hooks
        fired.clear()
        with torch.no_grad():
            assert torch.equal(gpt2(ids).logits, logits)
        assert fired == [-1, B]
    finally:
        handle.remove()
        pre.remove()


def test_nested_blocks_restore_module_call(setup):
    gpt2, model, ids, logits = setup
    before = snapshot(gpt2)
    with iv.trace(model, ids) as outer:
        with pytest.raises(RuntimeError, match="inner failed"):
            with iv.trace(model, ids) as inner:
                inner.layer[0].mlp.out.save()
                raise RuntimeError("inner failed")
        assert nn.Module.__call__ is not ORIGINAL_CALL  # the outer block still records
        lin = nn.Linear(D, D)
        y = lin(outer.layer[0].mlp.out).save()
    assert y.value.shape == (B, P, D)
    assert_clean(gpt2, before, ids, logits)


def test_program_run_outside_a_block_after_errors(setup):
    gpt2, model, ids, logits = setup
    before = snapshot(gpt2)
    with iv.trace(model) as t:
        t.layer[0].attn.pattern.save("p")
        t.layer[2].mlp.out[:, 0] = torch.zeros(7)
    for _ in range(2):
        with pytest.raises(iv.ShapeError):
            t.program.run(model, ids)
        assert_clean(gpt2, before, ids, logits)

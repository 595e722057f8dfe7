"""runtime/skip.py and the sweep levers built on it: passes that start at a later block.

Every sweep here is checked against the same sweep run with whole passes (no later
start, no cells skipped), and the skipping itself is proved by counting calls of a
submodule of block 0.
"""

from __future__ import annotations

import numerics
import pytest
import torch

import models
import tracevene as iv
from tracevene.patching import activation
from tracevene.runtime.skip import Starts

ARCHS = ["gpt2", "llama", "neox"]


def _pair(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    clean = models.tokens(2, 6, seed=seed)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 1) % 50
    return clean, corrupted


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 3] - logits[:, -1, 4]).mean()


def _whole(model, monkeypatch, **kw) -> torch.Tensor:
    """The sweep with whole passes: no KV prefix, no later block, no cell skipped."""
    with monkeypatch.context() as m:
        m.setattr(model.resolver, "blocks", None)
        m.setattr(activation, "_generates", lambda model: False)
        m.setattr(activation._Unpatched, "holds", lambda *a: False)
        return iv.patching.activation_patching(model, *_pair(), _metric, progress=False,
                                               **kw).values  # fmt: skip


def _calls(module: torch.nn.Module) -> list[int]:
    count = [0]
    module.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "kw", [dict(site="resid_pre"), dict(site="attn.out"), dict(site="z", heads=True),
           dict(site="z", heads=True, positions="all")],
    ids=["resid_pre", "attn.out", "z-each", "z-all"],
)  # fmt: skip
def test_sweeps_with_later_starts_equal_whole_passes(arch, backend, kw, monkeypatch):
    model = iv.wrap(models.DECODERS[arch](), backend=backend)
    got = iv.patching.activation_patching(model, *_pair(), _metric, progress=False, **kw)
    want = _whole(model, monkeypatch, **kw)
    numerics.assert_close(got.values, want, what=f"{arch} {kw}", scale=want.abs().max())


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
def test_blocks_before_the_patched_layer_are_not_run(backend):
    """A head sweep at every position at once: each layer's pass starts at that layer."""
    model = iv.wrap(models.gpt2(), backend=backend)
    first = _calls(model.resolver.blocks[0].mlp)
    iv.patching.activation_patching(model, *_pair(), _metric, site="z", heads=True,
                                    positions="all", progress=False)  # fmt: skip
    # the two reads (clean run, unpatched run) and the passes of layer 0; 4 heads per layer
    passes = -(-model.n_heads // 16)
    assert first[0] == 2 + passes


def test_cells_that_hold_their_patch_already_are_not_run():
    """Denoising resid_pre before the corrupted position changes nothing: no pass runs it."""
    model = iv.wrap(models.gpt2(), backend="torch")
    passes = _calls(model.resolver.blocks[-1])
    got = iv.patching.activation_patching(model, *_pair(), _metric, progress=False)
    assert passes[0] == 2 + 4  # the two reads, then one pass per position 2..5
    with torch.no_grad():
        unpatched = _metric(model.module(_pair()[1]).logits)
    numerics.assert_close(got.values[:, :2], unpatched.expand(model.n_layers, 2),
                          what="cells before the corruption", scale=unpatched.abs())  # fmt: skip


def test_start_at_hands_on_the_recorded_input_and_restores_forward():
    hf = models.gpt2()
    blocks = hf.transformer.h
    starts = Starts(hf, blocks)
    ids = models.tokens(2, 6)
    inputs = []
    handles = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in blocks]
    with torch.no_grad(), starts.recording():
        want = hf(ids).logits
    for h in handles:
        h.remove()
    first = _calls(blocks[0].attn)
    with torch.no_grad(), starts.at(2, inputs[2]):
        got = hf(ids).logits
    assert first[0] == 0
    numerics.assert_exact(got, want, what="logits from block 2 on")
    assert all("forward" not in b.__dict__ for b in blocks)
    with torch.no_grad():
        numerics.assert_exact(hf(ids).logits, want, what="after the block")

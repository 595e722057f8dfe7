"""Circuits: mean ablation of heads outside a kept set, against plain hooks."""

from __future__ import annotations

import pytest
import torch

import tracevene as iv
from tests import models, numerics
from tracevene.patching import head_means, run_circuit

BACKENDS = ["torch", "nnsight", "transformer_lens"]


def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 97, (n, 6), generator=torch.Generator().manual_seed(seed))


def _reference(hf, inputs, keep, reference, groups) -> torch.Tensor:
    """Mean-ablate with forward pre-hooks on attn.c_proj (its input is the heads' z)."""
    d, n_heads = hf.config.n_embd, hf.config.n_head
    dh = d // n_heads
    blocks = hf.transformer.h
    z = {}

    def keep_z(i):
        return lambda module, args: z.__setitem__(i, args[0].detach())

    hooks = [b.attn.c_proj.register_forward_pre_hook(keep_z(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        hf(reference)
    for h in hooks:
        h.remove()
    ref_groups, in_groups = groups

    def ablate(i):
        def hook(module, args):
            out = args[0].clone()
            for row, g in enumerate(in_groups.tolist()):
                mean = z[i][ref_groups == g].mean(0)
                for head in range(n_heads):
                    if (i, head) not in keep:
                        cols = slice(head * dh, (head + 1) * dh)
                        out[row, :, cols] = mean[:, cols]
            return (out,)

        return hook

    hooks = [b.attn.c_proj.register_forward_pre_hook(ablate(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        logits = hf(inputs).logits
    for h in hooks:
        h.remove()
    return logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_mean_ablation_by_plain_hooks(backend):
    hf = models.gpt2(initializer_range=0.3)
    inputs, reference = _ids(0, 4), _ids(1, 6)
    in_groups, ref_groups = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 1, 0])
    keep = {(0, 1), (1, 2), (2, 0), (2, 3)}
    got = run_circuit(iv.wrap(hf, backend=backend), inputs, keep, reference,
                      groups=(in_groups, ref_groups))  # fmt: skip
    expected = _reference(hf, inputs, keep, reference, (ref_groups, in_groups))
    numerics.assert_close(got, expected, what="circuit logits vs mean ablation by plain hooks")
    with torch.no_grad():
        assert (got - hf(inputs).logits).abs().max() > 1e-2  # the ablation did something


def test_precomputed_means_give_the_same_logits():
    hf = models.gpt2(initializer_range=0.3)
    inputs, reference = _ids(0, 4), _ids(1, 6)
    in_groups, ref_groups = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 1, 0])
    keep = {(0, 1), (2, 3)}
    means = head_means(hf, reference, ref_groups)
    once = run_circuit(hf, inputs, keep, means, groups=in_groups)
    assert torch.equal(
        once, run_circuit(hf, inputs, keep, reference, groups=(in_groups, ref_groups))
    )
    gap = head_means(hf, reference, ref_groups * 2)  # groups 0 and 2: group 1 is empty
    with pytest.raises(ValueError, match="input group 1 has no reference prompts"):
        run_circuit(hf, inputs, keep, gap, groups=in_groups)


def test_keeping_every_head_changes_nothing():
    hf = models.gpt2(initializer_range=0.3)
    inputs = _ids(0, 3)
    keep = [(layer, h) for layer in range(3) for h in range(4)]
    with torch.no_grad():
        numerics.assert_close(
            run_circuit(hf, inputs, keep, _ids(1, 5)), hf(inputs).logits,
            what="every head kept vs the clean logits",
        )  # fmt: skip


def test_head_means_per_group():
    hf = models.gpt2()
    reference, groups = _ids(2, 5), torch.tensor([1, 0, 1, 1, 0])
    means = head_means(hf, reference, groups)
    model = iv.wrap(hf, backend="torch")
    with iv.trace(model, reference) as t:
        z = t.layer[1].attn.z.save()
    assert means[1].shape == (2, 6, 4, 8)
    numerics.assert_close(
        means[1][1], z.value[groups == 1].mean(0), what="group mean of z", ulps=numerics.OP
    )


@pytest.mark.parametrize(
    ("keep", "groups", "match"),
    [
        ({(3, 0)}, None, r"head \(3, 0\) is not in the model: layers 0..2, heads 0..3"),
        ({(0, 4)}, None, r"head \(0, 4\) is not in the model"),
        (set(), (torch.tensor([0, 1]), torch.tensor([0, 0, 0])),
         r"groups for inputs must be .* \[3\]"),
        (set(), (torch.tensor([0, 0, 2]), torch.tensor([0, 1, 1])),
         "input group 2 has no reference prompts"),
    ],
)  # fmt: skip
def test_errors(keep, groups, match):
    with pytest.raises(ValueError, match=match):
        run_circuit(models.gpt2(), _ids(0, 3), keep, _ids(1, 3), groups=groups)

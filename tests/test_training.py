"""``iv.train``, ``iv.evaluate`` and the metrics.

The acceptance test is a planted alignment: :func:`models.planted` builds a GPT-2 whose
answer is one variable stored along a known direction ``q`` of the residual stream,
and DAS must find ``q`` on every backend. The other tests pin the trainer's contract
(only intervention parameters change, exact repeats, gradient accumulation, schedules,
temperatures, errors, hooks, progress bars) on small models, and the metrics against
plain torch.
"""

from __future__ import annotations

import math

import numerics
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import models
import tracevene as iv
from tracevene import metrics

BACKENDS = ["torch", "nnsight", "transformer_lens"]
D = 16  # width of models.planted()
SITE = (slice(None), -1)  # layer[0].resid_post[:, -1]
MULTI = (slice(None), [1, 2, 3])  # three positions per example


@pytest.fixture(scope="module")
def planted() -> models.Planted:
    return models.planted()


def interchange(model, intervention: nn.Module, index=SITE, layer: int = 0) -> iv.Program:
    """A program that swaps ``layer[layer].resid_post[index]`` in through ``intervention``."""
    with iv.trace(model) as t:
        src = t.source()
        site, other = t.layer[layer].resid_post, src.layer[layer].resid_post
        site[index] = intervention(site[index], other[index])
    return t.program


def make(kind: str, d: int = D, seed: int = 0, k: int = 8) -> nn.Module:
    """A trainable intervention of class ``kind``, with seeded initial weights (``k``
    rotated dimensions for the fixed-size ones: half the space, so that a few steps
    reliably help)."""
    torch.manual_seed(seed)
    if kind in ("RotatedSpace", "LowRankRotatedSpace"):
        return getattr(iv, kind)(d, k)
    return getattr(iv, kind)(d)


TRAINABLE = ["RotatedSpace", "LowRankRotatedSpace", "BoundlessRotatedSpace", "SigmoidMask"]


def cosine(a: Tensor, b: Tensor) -> float:
    return abs(F.cosine_similarity(a.flatten().float(), b.flatten().float(), 0).item())


def mean_ce(result, batch) -> Tensor:
    """Per-example cross-entropy of the labels at the last position (an evaluate metric)."""
    return metrics.cross_entropy(result, batch["labels"])


def params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


# -- the planted alignment (acceptance) -------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_das_recovers_the_planted_direction(planted, backend):
    model = iv.wrap(planted.model, backend=backend)
    rotation = make("RotatedSpace", k=1)
    program = interchange(model, rotation)
    train, held_out = planted.batches(40, seed=1), planted.batches(8, seed=2)
    history = iv.train(program, model, train, epochs=4, lr=3e-2, lr_schedule="cosine",
                       progress=False)  # fmt: skip
    assert history.loss[-1] < 0.1 * history.loss[0]
    assert cosine(rotation.basis[:, 0], planted.q) >= 0.99
    assert iv.evaluate(program, model, held_out, progress=False) >= 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_boundless_das_interchanges_a_strict_subspace(planted, backend):
    model = iv.wrap(planted.model, backend=backend)
    boundless = make("BoundlessRotatedSpace")
    program = interchange(model, boundless)
    history = iv.train(program, model, planted.batches(40, seed=1), epochs=2, lr=3e-2,
                       lr_schedule="cosine", progress=False)  # fmt: skip
    assert iv.evaluate(program, model, planted.batches(8, seed=2), progress=False) >= 0.9
    assert 0 < boundless.boundary < D
    start, end = boundless.temperature_schedule
    assert history.temperature[0] == start and history.temperature[-1] == pytest.approx(end)
    assert boundless.temperature.item() == pytest.approx(end)


def test_the_planted_model_answers_with_its_variable(planted):
    ids = torch.randint(0, 32, (64, 4))
    logits = planted.model(ids).logits[:, -1]
    assert torch.equal(logits.argmax(-1), planted.label(ids))
    assert torch.all(logits[:, 2:] < logits[:, :2].max(-1, keepdim=True).values)
    assert planted.q @ torch.ones(D) == pytest.approx(0.0, abs=1e-5)  # LayerNorm keeps q


# -- every trainable intervention, several positions per example ----------------------
@pytest.mark.parametrize("kind", TRAINABLE)
def test_trainable_interventions_train_on_several_positions(planted, kind):
    model = iv.wrap(planted.model, backend="torch")
    intervention = make(kind)
    program = interchange(model, intervention, MULTI)
    data, fixed = planted.batches(6, seed=1), planted.batches(1, seed=3)
    before = iv.evaluate(program, model, fixed, mean_ce, progress=False)
    history = iv.train(program, model, data, epochs=2, lr=5e-2, progress=False)
    after = iv.evaluate(program, model, fixed, mean_ce, progress=False)
    assert len(history.loss) == 12
    assert after < before


def positions_and_labels(planted: models.Planted, batch: dict, seed: int) -> dict:
    """Three distinct positions per example; the label is the source's where the last
    position is among them (the model reads only the last token), else the base's."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack([torch.randperm(4, generator=g)[:3] for _ in range(32)])
    swapped = (pos == 3).any(-1)
    labels = torch.where(swapped, planted.label(batch["source"]), planted.label(batch["base"]))
    return {**batch, "pos": pos, "labels": labels}


@pytest.mark.parametrize("kind", TRAINABLE)
def test_trainable_interventions_train_with_per_example_positions(planted, kind):
    model = iv.wrap(planted.model, backend="torch")
    intervention = make(kind)
    with iv.trace(model) as t:
        pos = t.arg("pos")
        src = t.source()
        rows = torch.arange(32)[:, None]
        base, source = t.layer[0].resid_post[rows, pos], src.layer[0].resid_post[rows, pos]
        t.layer[0].resid_post[rows, pos] = intervention(base, source)
    program = t.program
    data = [positions_and_labels(planted, b, i) for i, b in enumerate(planted.batches(6))]
    fixed = [positions_and_labels(planted, planted.batches(1, seed=3)[0], 99)]
    before = iv.evaluate(program, model, fixed, mean_ce, progress=False)
    iv.train(program, model, data, epochs=2, lr=5e-2, progress=False)
    assert iv.evaluate(program, model, fixed, mean_ce, progress=False) < before


# -- bfloat16 models (acceptance) ----------------------------------------------------
@pytest.mark.parametrize("kind", TRAINABLE)
def test_a_step_on_a_bfloat16_model_reduces_the_loss(kind):
    planted = models.planted()
    planted.model.to(torch.bfloat16)
    model = iv.wrap(planted.model, backend="torch")
    intervention = make(kind)
    program = interchange(model, intervention)
    batch = planted.batches(1, seed=1)
    before = iv.evaluate(program, model, batch, mean_ce, progress=False)
    history = iv.train(program, model, batch * 3, lr=5e-2, progress=False)
    after = iv.evaluate(program, model, batch, mean_ce, progress=False)
    assert len(history.loss) == 3 and all(math.isfinite(x) for x in history.loss)
    assert after < before
    assert all(p.dtype == torch.float32 for p in intervention.parameters())
    assert all(p.dtype == torch.bfloat16 for p in planted.model.parameters())


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
def test_das_step_on_a_bfloat16_model_on_other_backends(backend):
    planted = models.planted()
    planted.model.to(torch.bfloat16)
    model = iv.wrap(planted.model, backend=backend)
    rotation = make("RotatedSpace")
    program = interchange(model, rotation)
    batch = planted.batches(1, seed=1)
    before = iv.evaluate(program, model, batch, mean_ce, progress=False)
    iv.train(program, model, batch * 3, lr=5e-2, progress=False)
    assert iv.evaluate(program, model, batch, mean_ce, progress=False) < before


# -- exact repeats ---------------------------------------------------------------------
class Examples(torch.utils.data.Dataset):
    """Single interchange examples as dicts (a DataLoader collates them into batches)."""

    def __init__(self, planted: models.Planted, n: int = 96):
        g = torch.Generator().manual_seed(7)
        self.base = torch.randint(0, 32, (n, 4), generator=g)
        self.source = torch.randint(0, 32, (n, 4), generator=g)
        self.labels = planted.label(self.source)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"base": self.base[i], "source": self.source[i], "labels": self.labels[i]}


def collate(examples: list[dict]) -> dict:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def trained(planted, data, seed: int | None, backend: str = "torch"):
    model = iv.wrap(planted.model, backend=backend)
    rotation = make("RotatedSpace", seed=5)
    program = interchange(model, rotation)
    history = iv.train(program, model, data, epochs=2, lr=5e-2, seed=seed, progress=False)
    return history, params(rotation)


def same_params(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_same_seed_repeats_exactly(planted):
    data = planted.batches(4, seed=1)
    (h1, p1), (h2, p2) = trained(planted, data, seed=3), trained(planted, data, seed=3)
    assert h1.loss == h2.loss and same_params(p1, p2)


def test_a_shuffling_dataloader_repeats_exactly_for_a_seed(planted):
    loader = torch.utils.data.DataLoader(Examples(planted), batch_size=32, shuffle=True,
                                         collate_fn=collate)  # fmt: skip
    (h1, p1), (h2, p2) = trained(planted, loader, seed=3), trained(planted, loader, seed=3)
    assert len(h1.loss) == 6
    assert h1.loss == h2.loss and same_params(p1, p2)
    h3, p3 = trained(planted, loader, seed=4)
    assert h3.loss != h1.loss and not same_params(p1, p3)


def test_the_default_collate_gives_dict_batches_too(planted):
    loader = torch.utils.data.DataLoader(Examples(planted), batch_size=32, shuffle=True)
    (h1, p1), (h2, p2) = trained(planted, loader, seed=3), trained(planted, loader, seed=3)
    assert h1.loss == h2.loss and same_params(p1, p2)


# -- only intervention parameters are trained -------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_only_intervention_parameters_change(backend):
    planted = models.planted()
    hf = planted.model
    hf.transformer.wte.weight.requires_grad_(False)  # a mix of flags, restored as they were
    flags = {k: p.requires_grad for k, p in hf.named_parameters()}
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    model = iv.wrap(hf, backend=backend)
    inner = {k: v.clone() for k, v in model.module.state_dict().items()}
    rotation = make("RotatedSpace")
    start = params(rotation)
    iv.train(interchange(model, rotation), model, planted.batches(3), lr=0.1, progress=False)
    assert all(torch.equal(v, weights[k]) for k, v in hf.state_dict().items())
    assert all(torch.equal(v, inner[k]) for k, v in model.module.state_dict().items())
    assert {k: p.requires_grad for k, p in hf.named_parameters()} == flags
    assert all(p.grad is None for p in hf.parameters())
    assert not same_params(start, params(rotation))
    assert all(p.grad is None for p in rotation.parameters())  # zeroed after each step


# -- gradient accumulation -------------------------------------------------------------
def mlp_program(intervention: nn.Module):
    """A program on models.mlp() swapping the first hidden layer through ``intervention``."""
    net = models.mlp()
    with iv.trace(net) as t:
        src = t.source()
        t.module("0").output = intervention(t.module("0").output, src.module("0").output)
    return net, t.program


def mlp_batches(n: int, size: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"base": torch.randn(size, 4, generator=g), "source": torch.randn(size, 4, generator=g),
             "labels": torch.randint(0, 2, (size,), generator=g)} for _ in range(n)]  # fmt: skip


def concat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def sgd_run(data, grad_accum: int, kind: str = "RotatedSpace"):
    intervention = make(kind, d=16, seed=1)
    net, program = mlp_program(intervention)
    history = iv.train(program, net, data, optimizer="sgd", lr=0.5, grad_accum=grad_accum,
                       temperature=None, progress=False)  # fmt: skip
    return history, params(intervention)


@pytest.mark.parametrize("kind", TRAINABLE)
def test_grad_accum_matches_one_big_batch(kind):
    halves = mlp_batches(2, 16)
    h_acc, p_acc = sgd_run(halves, grad_accum=2, kind=kind)
    h_one, p_one = sgd_run([concat(halves)], grad_accum=1, kind=kind)
    assert len(h_acc.loss) == len(h_one.loss) == 1
    # the same sums in another order: rounding of one reduction, one step
    numerics.assert_close(h_acc.loss[0], h_one.loss[0], what="loss", ulps=numerics.OP)
    for k in p_one:
        numerics.assert_close(
            p_acc[k], p_one[k], what=f"{k} after one step", ulps=numerics.OP,
            scale=numerics.magnitude(p_one[k]),
        )  # fmt: skip
    assert not same_params(p_one, params(make(kind, d=16, seed=1)))


def test_a_partial_accumulation_at_the_end_steps_on_the_mean_of_its_batches():
    batches = mlp_batches(3, 16)
    h_acc, p_acc = sgd_run(batches, grad_accum=2)  # steps: (b0 + b1) / 2, then b2
    h_ref, p_ref = sgd_run([concat(batches[:2]), batches[2]], grad_accum=1)
    assert len(h_acc.loss) == 2
    numerics.assert_close(torch.tensor(h_acc.loss), torch.tensor(h_ref.loss), what="losses")
    for k in p_ref:
        numerics.assert_close(p_acc[k], p_ref[k], what=f"{k} after two steps")


def test_max_grad_norm_clips_the_step():
    data = mlp_batches(1)
    _, free = sgd_run(data, grad_accum=1)
    intervention = make("RotatedSpace", d=16, seed=1)
    start = params(intervention)
    net, program = mlp_program(intervention)
    iv.train(program, net, data, optimizer="sgd", lr=0.5, max_grad_norm=1e-3, progress=False)
    (k,) = start
    clipped = (params(intervention)[k] - start[k]).norm()
    assert clipped == pytest.approx(0.5 * 1e-3, rel=1e-4)
    assert (free[k] - start[k]).norm() > 10 * clipped


# -- learning-rate schedules and temperatures ----------------------------------------
def recording_sgd(lrs: list[float]):
    class Recording(torch.optim.SGD):
        def step(self, closure=None):  # noqa: ANN001, ANN202
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    return Recording


def expected_lr(kind: str, step: int, warmup: int, steps: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / (steps - warmup)
    if kind == "linear":
        return peak * (1 - frac)
    if kind == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * frac))
    return peak


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedules_follow_their_formulas(kind, warmup):
    lrs: list[float] = []
    _, program = mlp_program(make("RotatedSpace", d=16))
    data = mlp_batches(5, 4)
    history = iv.train(program, models.mlp(), data, epochs=2, lr=0.2, optimizer=recording_sgd(lrs),
                       lr_schedule=kind, warmup_steps=warmup, progress=False)  # fmt: skip
    assert len(lrs) == len(history.loss) == 10
    expected = [expected_lr(kind, s, warmup, 10, 0.2) for s in range(10)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    if warmup:
        assert lrs[warmup - 1] == pytest.approx(0.2)  # warm-up ends at the peak
    if kind != "constant":
        assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :], strict=False))


def test_lr_schedule_counts_optimizer_steps_under_grad_accum():
    lrs: list[float] = []
    _, program = mlp_program(make("RotatedSpace", d=16))
    iv.train(program, models.mlp(), mlp_batches(6, 4), grad_accum=2, lr=0.3,
             optimizer=recording_sgd(lrs), lr_schedule="linear", progress=False)  # fmt: skip
    assert lrs == pytest.approx([0.3, 0.2, 0.1])


def boundless_run(temperature, data, grad_accum: int = 1):
    boundless = make("BoundlessRotatedSpace", d=16)
    _, program = mlp_program(boundless)
    history = iv.train(program, models.mlp(), data, temperature=temperature,
                       grad_accum=grad_accum, progress=False)  # fmt: skip
    return boundless, history


def test_temperature_anneals_geometrically_to_the_schedules_end():
    boundless, history = boundless_run("auto", mlp_batches(9, 4))
    start, end = boundless.temperature_schedule
    expected = [start * (end / start) ** (i / 8) for i in range(9)]
    assert history.temperature == pytest.approx(expected, rel=1e-6)
    assert boundless.temperature.item() == pytest.approx(end, rel=1e-6)


def test_temperature_pairs_set_the_schedule_and_count_optimizer_steps():
    boundless, history = boundless_run((2.0, 0.5), mlp_batches(6, 4), grad_accum=2)
    assert history.temperature == pytest.approx([2.0, 1.0, 0.5], rel=1e-6)
    assert boundless.temperature.item() == pytest.approx(0.5)
    mask, history = boundless_run((1.0, 0.1), mlp_batches(3, 4))
    assert history.temperature == pytest.approx([1.0, 10**-0.5, 0.1], rel=1e-6)


def test_temperature_none_leaves_the_buffer_alone():
    boundless, history = boundless_run(None, mlp_batches(3, 4))
    assert history.temperature == []
    assert boundless.temperature.item() == 1.0
    sigmoid = make("SigmoidMask", d=16)
    sigmoid.set_temperature(0.3)
    _, program = mlp_program(sigmoid)
    iv.train(program, models.mlp(), mlp_batches(3, 4), temperature=None, progress=False)
    assert sigmoid.temperature.item() == pytest.approx(0.3)


def test_training_mode_of_interventions_is_restored():
    rotation = make("RotatedSpace", d=16).eval()
    net, program = mlp_program(rotation)
    seen = []
    rotation.register_forward_hook(lambda m, i, o: seen.append(m.training))
    iv.train(program, net, mlp_batches(2), progress=False)
    iv.evaluate(program, net, mlp_batches(1), progress=False)
    assert seen == [True, True, False] and not rotation.training


# -- metrics ---------------------------------------------------------------------------
@pytest.fixture
def logits() -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 4, 7, generator=g)


POS = torch.tensor([0, 3, 1, 2, 3])
ROWS = torch.arange(5)


def test_iia_at_positions(logits):
    labels = logits[ROWS, POS].argmax(-1)
    labels[1] = (labels[1] + 1) % 7
    assert metrics.iia(logits, labels, POS).tolist() == [1, 0, 1, 1, 1]
    assert torch.equal(metrics.iia(logits, logits[:, -1].argmax(-1)), torch.ones(5))
    assert torch.equal(
        metrics.iia(logits[:, 2], labels, None), (logits[:, 2].argmax(-1) == labels).float()
    )


def test_logit_diff_at_positions(logits):
    correct, wrong = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([6, 5, 4, 3, 2])
    expected = torch.stack(
        [logits[i, POS[i], correct[i]] - logits[i, POS[i], wrong[i]] for i in range(5)]
    )
    torch.testing.assert_close(metrics.logit_diff(logits, correct, wrong, POS), expected)
    last = metrics.logit_diff(logits, correct, wrong)
    torch.testing.assert_close(last, logits[ROWS, -1, correct] - logits[ROWS, -1, wrong])


def test_kl_to_counterfactual(logits):
    assert torch.equal(metrics.kl_to_counterfactual(logits, logits.clone()), torch.zeros(5))
    other = logits.flip(0) * 2
    for pos in (-1, POS, 2):
        p = F.log_softmax(metrics.at_position(logits, pos), -1)  # intervened
        q = F.log_softmax(metrics.at_position(other, pos), -1)  # counterfactual
        expected = F.kl_div(p, q, log_target=True, reduction="none").sum(-1)
        kl = metrics.kl_to_counterfactual(logits, other, pos)
        torch.testing.assert_close(kl, expected)
        assert torch.all(kl > 0)


def test_cross_entropy_at_positions(logits):
    labels = torch.tensor([1, 2, 3, 4, 5])
    expected = F.cross_entropy(logits[ROWS, POS], labels, reduction="none")
    torch.testing.assert_close(metrics.cross_entropy(logits, labels, POS), expected)
    half = metrics.cross_entropy(logits.bfloat16(), labels)
    assert half.dtype == torch.float32


def test_metrics_read_results_and_model_outputs(planted):
    model = iv.wrap(planted.model, backend="torch")
    batch = planted.batches(1, size=8)[0]
    result = interchange(model, iv.Interchange()).run(model, batch["base"], [batch["source"]])
    logits = result.output.logits
    for x in (result, result.output, logits, (logits,)):
        assert metrics.logits_of(x) is logits
    source = planted.model(batch["source"])  # the last position is the source's exactly
    assert torch.equal(metrics.iia(result, batch["labels"]), torch.ones(8))
    assert torch.all(metrics.kl_to_counterfactual(result, source) < 1e-6)
    assert torch.all(metrics.kl_to_counterfactual(result, source, 0) > 1e-3)  # base's there
    with pytest.raises(TypeError, match="cannot find logits in a dict"):
        metrics.logits_of({"x": 1})


def test_evaluate_averages_over_examples_and_weighs_scalar_metrics(planted):
    model = iv.wrap(planted.model, backend="torch")
    program = interchange(model, iv.Interchange())
    data = planted.batches(2, size=8) + planted.batches(1, size=16, seed=5)
    assert iv.evaluate(program, model, data, progress=False) == 1.0
    per_batch = [4.0, 1.0, 7.0]
    values = iter(per_batch)
    mean = iv.evaluate(program, model, data, lambda r, b: torch.tensor(next(values)),
                       progress=False)  # fmt: skip
    assert mean == pytest.approx((4 * 8 + 1 * 8 + 7 * 16) / 32)


# -- errors ------------------------------------------------------------------------------
@pytest.fixture
def mlp_setup():
    return mlp_program(make("RotatedSpace", d=16))


def test_a_batch_without_base_is_refused(mlp_setup):
    net, program = mlp_setup
    with pytest.raises(TypeError, match=r"base inputs under 'base'.*keys \['labels', 'source'\]"):
        iv.train(program, net, [{"source": torch.randn(2, 4), "labels": torch.zeros(2).long()}],
                 progress=False)  # fmt: skip
    with pytest.raises(TypeError, match="must be a dict .* got a tuple"):
        iv.train(program, net, [(torch.randn(2, 4), torch.randn(2, 4))], progress=False)


def test_a_missing_placeholder_is_named():
    intervention = make("RotatedSpace", d=16)
    net = models.mlp()
    with iv.trace(net) as t:
        scale = t.arg("scale")
        src = t.source()
        t.module("0").output = intervention(t.module("0").output, src.module("0").output) * scale
    with pytest.raises(KeyError, match=r"needs placeholder\(s\) \['scale'\]"):
        iv.train(t.program, net, mlp_batches(1), progress=False)
    batch = {**mlp_batches(1)[0], "scale": 2.0}
    assert len(iv.train(t.program, net, [batch], progress=False).loss) == 1


def test_a_program_without_trainable_parameters_is_refused():
    net = models.mlp()
    with iv.trace(net) as t:
        src = t.source()
        t.module("0").output = iv.Interchange()(t.module("0").output, src.module("0").output)
    with pytest.raises(ValueError, match="no trainable parameters"):
        iv.train(t.program, net, mlp_batches(1), progress=False)


def test_a_loss_that_is_not_a_scalar_is_refused(mlp_setup):
    net, program = mlp_setup
    per_example = lambda r, b: metrics.cross_entropy(r, b["labels"])  # noqa: E731
    with pytest.raises(ValueError, match=r"scalar tensor, got \(16,\); take \.mean\(\)"):
        iv.train(program, net, mlp_batches(1), per_example, progress=False)
    with pytest.raises(ValueError, match="scalar tensor, got float"):
        iv.train(program, net, mlp_batches(1), lambda r, b: 1.0, progress=False)


def test_a_loss_that_ignores_the_intervention_is_refused(mlp_setup):
    net, program = mlp_setup
    detached = lambda r, b: metrics.cross_entropy(r.output.detach(), b["labels"]).mean()  # noqa: E731
    with pytest.raises(ValueError, match="does not depend on any trainable intervention"):
        iv.train(program, net, mlp_batches(1), detached, progress=False)


def test_missing_labels_name_the_fix(mlp_setup):
    net, program = mlp_setup
    batch = {k: v for k, v in mlp_batches(1)[0].items() if k != "labels"}
    with pytest.raises(KeyError, match="lacks .*add labels or pass loss_fn"):
        iv.train(program, net, [batch], progress=False)


def test_a_one_shot_iterator_trains_one_epoch_only(mlp_setup):
    net, program = mlp_setup
    with pytest.raises(TypeError, match="one-shot iterator, but training runs more than one"):
        iv.train(program, net, iter(mlp_batches(2)), epochs=2, progress=False)
    assert len(iv.train(program, net, iter(mlp_batches(2)), progress=False).loss) == 2
    with pytest.raises(TypeError, match="lr_schedule='cosine' needs the number of steps"):
        iv.train(program, net, iter(mlp_batches(2)), lr_schedule="cosine", progress=False)


def test_bad_settings_are_refused(mlp_setup):
    net, program = mlp_setup
    data = mlp_batches(1)
    with pytest.raises(
        ValueError, match=r"optimizer='adagrad': choose one of \('adam', 'adamw', 'sgd'\)"
    ):
        iv.train(program, net, data, optimizer="adagrad", progress=False)
    with pytest.raises(
        ValueError, match=r"lr_schedule='step': choose one of \('constant', 'linear', 'cosine'\)"
    ):
        iv.train(program, net, data, lr_schedule="step", progress=False)
    with pytest.raises(ValueError, match="epochs=0 and grad_accum=1 must be at least 1"):
        iv.train(program, net, data, epochs=0, progress=False)
    with pytest.raises(ValueError, match="temperature=0.5: use 'auto', \\(start, end\\) or None"):
        iv.train(program, net, data, temperature=0.5, progress=False)


def test_evaluate_on_empty_data_is_refused(mlp_setup):
    net, program = mlp_setup
    with pytest.raises(ValueError, match="evaluate\\(\\) got no batches: data is empty"):
        iv.evaluate(program, net, [], progress=False)


# -- the user's hooks survive (acceptance) ---------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_users_hook_survives_train_and_evaluate(backend):
    planted = models.planted()
    hf, calls = planted.model, []
    handle = hf.transformer.h[0].register_forward_hook(lambda m, i, o: calls.append(1))
    model = iv.wrap(hf, backend=backend)
    rotation = make("RotatedSpace").eval()
    program = interchange(model, rotation)
    iv.train(program, model, planted.batches(2), epochs=2, progress=False)
    iv.evaluate(program, model, planted.batches(1), progress=False)

    def boom_in_loss(result, batch):  # fails after the second run
        boom_in_loss.calls += 1
        if boom_in_loss.calls == 2:
            raise RuntimeError("boom in the loss")
        return metrics.cross_entropy(result, batch["labels"]).mean()

    def boom_in_forward(module, args):  # fails inside the second run, hooks installed
        boom_in_forward.calls += 1
        if boom_in_forward.calls == 2:
            raise RuntimeError("boom in the forward")

    boom_in_loss.calls = boom_in_forward.calls = 0
    with pytest.raises(RuntimeError, match="boom in the loss"):
        iv.train(program, model, planted.batches(3), boom_in_loss, progress=False)
    pre = rotation.register_forward_pre_hook(boom_in_forward)
    with pytest.raises(Exception, match="boom in the forward"):
        iv.train(program, model, planted.batches(3), progress=False)
    pre.remove()

    assert list(hf.transformer.h[0]._forward_hooks) == [handle.id]
    hooks = [h for m in hf.modules() for h in (*m._forward_hooks, *m._forward_pre_hooks)]
    assert hooks == [handle.id]  # and no hook of tracevene's is left behind
    assert all(p.requires_grad for p in hf.parameters())
    assert not rotation.training
    calls.clear()
    hf(planted.batches(1)[0]["base"])
    assert calls == [1]
    handle.remove()


# -- progress bars ---------------------------------------------------------------------
def test_progress_bars_show_the_loss_and_metric(mlp_setup, capsys):
    net, program = mlp_setup
    iv.train(program, net, mlp_batches(3), metric_fn=iv.training.default_metric,
             eval_data=mlp_batches(1), progress=True)  # fmt: skip
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "metric=" in err
    iv.evaluate(program, net, mlp_batches(2), progress=True)
    assert "evaluate" in capsys.readouterr().err
    iv.train(program, net, mlp_batches(3), progress=False)
    assert capsys.readouterr().err == ""


def test_history_records_metric_and_eval_per_epoch(mlp_setup):
    net, program = mlp_setup
    history = iv.train(program, net, mlp_batches(3), epochs=2, eval_data=mlp_batches(1),
                       metric_fn=iv.training.default_metric, progress=False)  # fmt: skip
    assert len(history.loss) == 6 and len(history.metric) == 2 and len(history.eval) == 2
    assert all(0 <= m <= 1 for m in history.metric + history.eval)


def test_data_is_iterated_once_per_epoch():
    class Counting:
        def __init__(self, batches):
            self.batches, self.iterations = batches, 0

        def __len__(self) -> int:
            return len(self.batches)

        def __iter__(self):
            self.iterations += 1
            return iter(self.batches)

    data = Counting(mlp_batches(2))
    net, program = mlp_program(make("RotatedSpace", d=16))
    history = iv.train(program, net, data, epochs=3, lr_schedule="linear", progress=False)
    assert data.iterations == 3 and len(history.loss) == 6


# -- logits at the last position only ---------------------------------------------------
def _kwargs_seen(hf: nn.Module) -> tuple[list[dict], object]:
    seen: list[dict] = []
    handle = hf.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
def test_default_loss_computes_logits_at_the_last_position_only(planted, backend):
    model = iv.wrap(planted.model, backend=backend)
    data = planted.batches(2, seed=3)
    losses = {}
    for keep in (None, 0):  # 0: HF's "all positions", i.e. the plain computation
        torch.manual_seed(0)
        program = interchange(model, make("RotatedSpace", k=1))
        seen, handle = _kwargs_seen(planted.model)
        try:
            kwargs = {} if keep is None else {"forward_kwargs": {"logits_to_keep": keep}}
            losses[keep] = iv.train(program, model, data, lr=1e-2, progress=False, **kwargs).loss
        finally:
            handle.remove()
        assert {kw.get("logits_to_keep") for kw in seen} == {1 if keep is None else keep}
    numerics.assert_close(
        torch.tensor(losses[None]), torch.tensor(losses[0]), what="losses, logits_to_keep 1 vs all",
        ulps=numerics.TRAINED,
    )  # fmt: skip


def test_logits_are_kept_whole_when_anything_else_reads_them(planted):
    model = iv.wrap(planted.model, backend="torch")
    data = planted.batches(1, seed=3)
    cases = {
        "own loss": dict(loss_fn=lambda r, b: metrics.cross_entropy(r, b["labels"]).mean()),
        "own metric": dict(metric_fn=mean_ce),
    }
    for name, kwargs in cases.items():
        seen, handle = _kwargs_seen(planted.model)
        try:
            iv.train(interchange(model, make("RotatedSpace", k=1)), model, data,
                     progress=False, **kwargs)  # fmt: skip
        finally:
            handle.remove()
        assert all("logits_to_keep" not in kw for kw in seen), name
    with iv.trace(model) as t:  # the program reads the logits itself
        src = t.source()
        rot = make("RotatedSpace", k=1)
        t.layer[0].resid_post[:, -1] = rot(
            t.layer[0].resid_post[:, -1], src.layer[0].resid_post[:, -1]
        )
        t.logits[:, 0].save("first")
    seen, handle = _kwargs_seen(planted.model)
    try:
        iv.evaluate(t.program, model, data, progress=False)
    finally:
        handle.remove()
    assert all("logits_to_keep" not in kw for kw in seen)

"""``program.bind(model)``: a program bound to a model is a regular ``nn.Module``.

Its parameters and state are exactly the intervention modules' (never the model's),
calling it is ``program.run``, its state dict round-trips into a fresh binding, and
it trains inside a user's own module with a plain ``torch.optim.Adam`` while the
model's weights stay bit-identical.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import tracevene as iv

BACKENDS = ["torch", "nnsight", "transformer_lens"]
B, P, D, K = 8, 6, 32, 4


@functools.cache
def wrapped(backend: str = "torch") -> iv.Model:
    return iv.wrap(models.gpt2(), backend=backend)


class Gain(nn.Module):
    """A learned per-dimension gain: a plain module of the user's own."""

    def __init__(self, d: int):
        super().__init__()
        self.log_gain = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.log_gain.exp()


def das(model: iv.Model, seed: int = 0) -> iv.Program:
    """DAS on layer 1 at ``pos``, then a learned gain, saving the last logits."""
    torch.manual_seed(seed)
    rotation, gain = iv.RotatedSpace(d=D, k=K), Gain(D)
    with iv.trace(model) as t:
        src, pos = t.source(), t.arg("pos")
        mixed = rotation(t.layer[1].resid_post[:, pos], src.layer[1].resid_post[:, pos])
        t.layer[1].resid_post[:, pos] = gain(mixed)
        t.logits[:, -1].save("logits")
    return t.program


def data(seed: int = 1) -> dict[str, torch.Tensor]:
    """Bases and sources; the label is the source's own next-token prediction."""
    base, source = models.tokens(B, P, seed=seed), models.tokens(B, P, seed=seed + 100)
    with torch.no_grad():
        labels = wrapped().module(source).logits[:, -1].argmax(-1)
    return {"base": base, "source": source, "labels": labels}


def model_state(model: iv.Model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.module.state_dict().items()}


class Probe(nn.Module):
    """A user's own module holding a bound program."""

    def __init__(self, bound: iv.BoundProgram):
        super().__init__()
        self.das = bound

    def forward(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.das(base, [source], pos=-1)["logits"]


def adam(probe: nn.Module, batch: dict, steps: int = 6) -> list[float]:
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(probe(batch["base"], batch["source"]), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# -- the module ------------------------------------------------------------------------------
def test_parameters_are_exactly_the_interventions():
    model = wrapped()
    program = das(model)
    bound = program.bind(model)
    assert isinstance(bound, nn.Module)
    ours = [p for m in program.modules.values() for p in m.parameters()]
    assert [id(p) for p in bound.parameters()] == [id(p) for p in ours]
    assert not {id(p) for p in bound.parameters()} & {id(p) for p in model.module.parameters()}
    assert all(k.startswith(("interventions.m0.", "interventions.m1.")) for k in bound.state_dict())
    assert bound.interventions["m0"] is program.modules["m0"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_calling_it_is_program_run(backend):
    model, batch = wrapped(backend), data()
    program = das(model)
    bound = program.bind(model, pos=-1)
    result = bound(batch["base"], [batch["source"]])
    assert isinstance(result, iv.Result)
    want = program.run(model, batch["base"], [batch["source"]], pos=-1)
    assert torch.equal(result["logits"], want["logits"])
    assert torch.equal(result.output.logits, want.output.logits)
    other = bound(batch["base"], [batch["source"]], pos=2)  # a call's own values win
    assert torch.equal(
        other["logits"], program.run(model, batch["base"], [batch["source"]], pos=2)["logits"]
    )


def test_train_and_eval_reach_the_interventions_not_the_model():
    model = wrapped()
    bound = das(model).bind(model)
    was = model.module.training
    bound.train()
    assert all(m.training for m in bound.interventions.modules())
    bound.eval()
    assert not any(m.training for m in bound.interventions.modules())
    assert model.module.training == was
    assert "program=<Program: " in repr(bound) and "GPT2LMHeadModel on 'torch'" in repr(bound)


# -- state dict ------------------------------------------------------------------------------
def test_state_dict_round_trips_into_a_fresh_binding():
    model, batch = wrapped(), data()
    trained = Probe(das(model).bind(model))
    adam(trained, batch, steps=3)
    fresh = Probe(das(model, seed=5).bind(model))  # recorded again, untrained
    with torch.no_grad():
        want = trained(batch["base"], batch["source"])
        assert not torch.equal(fresh(batch["base"], batch["source"]), want)
        fresh.load_state_dict(trained.state_dict())
        assert torch.equal(fresh(batch["base"], batch["source"]), want)
    assert set(trained.state_dict()) == set(fresh.state_dict())
    assert all(k.startswith("das.interventions.") for k in trained.state_dict())


def test_state_dict_round_trips_through_a_file(tmp_path):
    model, batch = wrapped(), data()
    trained = das(model).bind(model, pos=-1)
    adam(Probe(trained), batch, steps=2)
    torch.save(trained.state_dict(), tmp_path / "das.pt")
    fresh = das(model, seed=3).bind(model, pos=-1)
    fresh.load_state_dict(torch.load(tmp_path / "das.pt", weights_only=True))
    with torch.no_grad():
        want = trained(batch["base"], [batch["source"]])["logits"]
        assert torch.equal(fresh(batch["base"], [batch["source"]])["logits"], want)


def test_load_state_dict_checks_keys():
    model = wrapped()
    bound = das(model).bind(model)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*interventions.m1"):
        bound.load_state_dict({k: v for k, v in bound.state_dict().items() if ".m1." not in k})


# -- training inside a user's module ---------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "nnsight"])
def test_trains_inside_a_user_module_with_plain_adam(backend):
    model, batch = wrapped(backend), data()
    before = model_state(model)
    grads = [p.requires_grad for p in model.module.parameters()]
    program = das(model)
    probe = Probe(program.bind(model))
    start = {k: v.clone() for k, v in probe.state_dict().items()}
    losses = adam(probe, batch)
    assert losses[-1] < losses[0], losses
    assert any(not torch.equal(start[k], v) for k, v in probe.state_dict().items())
    after = model_state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "the model's weights moved"
    assert [p.requires_grad for p in model.module.parameters()] == grads
    assert all(p.grad is None for p in model.module.parameters())
    # the program itself was trained: its own run gives the trained numbers
    with torch.no_grad():
        want = probe(batch["base"], batch["source"])
        got = program.run(model, batch["base"], [batch["source"]], pos=-1)["logits"]
    assert torch.equal(got, want)


# -- errors ----------------------------------------------------------------------------------
def test_unknown_placeholders_are_refused():
    model = wrapped()
    program = das(model)
    with pytest.raises(
        iv.ArgumentError, match=r"^bind: \['post'\] are not placeholders.*\['pos'\]"
    ):
        program.bind(model, post=-1)
    bound = program.bind(model)
    batch = data()
    with pytest.raises(iv.ArgumentError, match=r"^call: \['p'\] are not placeholders"):
        bound(batch["base"], [batch["source"]], p=-1)
    with pytest.raises(iv.ArgumentError, match=r"placeholders: program needs \['pos'\]; missing"):
        bound(batch["base"], [batch["source"]])

"""The plan cache (tracevene.runtime.plan.PlanCache): reuse, misses, and no poisoned entries."""

from __future__ import annotations

import pytest
import torch

import tracevene as iv
from models import gpt2


@pytest.fixture
def setup():
    hf = gpt2()
    model = iv.wrap(hf, backend="torch")
    ids = torch.randint(0, hf.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with iv.trace(model) as t:
        t.layer[1].resid_post.save("h")
    return hf, model, ids, t.program


def hooked(hf, ids) -> torch.Tensor:
    """The independent computation: block 1's output through a plain forward hook."""
    kept = []
    keep = lambda m, a, o: kept.append(o if isinstance(o, torch.Tensor) else o[0])  # noqa: E731
    handle = hf.transformer.h[1].register_forward_hook(keep)
    try:
        with torch.no_grad():
            hf(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return kept[0]


def test_second_run_reuses_the_plan_and_gives_the_same_numbers(setup) -> None:
    hf, model, ids, program = setup
    cache = model.backend.plans
    first = program.run(model, ids)
    hits = cache.hits
    second = program.run(model, ids)
    assert cache.hits == hits + 1
    assert second.plan is first.plan
    assert torch.equal(second["h"], first["h"])
    assert torch.equal(second["h"], hooked(hf, ids))


def test_other_schedule_or_program_misses(setup) -> None:
    hf, model, ids, program = setup
    cache = model.backend.plans
    program.run(model, ids)
    misses = cache.misses
    program.run(model, ids, schedule="batched")
    assert cache.misses == misses + 1
    with iv.trace(model) as t:
        t.layer[1].resid_post.save("h")
    again = t.program.run(model, ids)
    assert cache.misses == misses + 2
    assert torch.equal(again["h"], hooked(hf, ids))


def test_new_shapes_reuse_a_plan_that_does_not_depend_on_them(setup) -> None:
    hf, model, ids, program = setup
    program.run(model, ids)
    longer = torch.cat([ids, ids], dim=1)
    assert torch.equal(program.run(model, longer)["h"], hooked(hf, longer))
    assert torch.equal(program.run(model, ids[:1])["h"], hooked(hf, ids[:1]))


def test_a_run_that_raised_keeps_no_plan(setup) -> None:
    hf, model, ids, _ = setup
    with iv.trace(model) as t:
        t.layer[0].resid_post = t.layer[1].resid_post
    for _ in range(2):
        with pytest.raises(iv.ScheduleError):
            t.program.run(model, ids)
    assert model.backend.plans.hits == 0


def test_device_is_read_afresh_as_parameters_walk(setup) -> None:
    """model.device finds the first parameter as nn.Module.parameters() does."""
    hf, model, _, _ = setup
    assert model.device == next(hf.parameters()).device == torch.device("cpu")
    hf.transformer.wte = torch.nn.Embedding(*hf.transformer.wte.weight.shape, device="meta")
    assert model.device == next(hf.parameters()).device == torch.device("meta")
    hf.to("meta")
    assert model.device == torch.device("meta")
    bare = iv.wrap(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Sequential()))
    assert bare.device == torch.device("cpu")  # no parameters at all


def test_a_moved_model_runs_right_from_its_cached_plan(setup) -> None:
    hf, model, ids, program = setup
    program.run(model, ids)
    hits = model.backend.plans.hits
    hf.double()  # new parameter data, same plan
    again = program.run(model, ids)
    assert model.backend.plans.hits == hits + 1
    assert again["h"].dtype == torch.float64
    assert torch.equal(again["h"], hooked(hf, ids))
    if torch.cuda.is_available():
        hf.to("cuda")
        on_gpu = program.run(model, ids)  # ids on the CPU: moved to the model's device
        assert on_gpu["h"].device.type == "cuda"
        assert torch.equal(on_gpu["h"], hooked(hf, ids.cuda()))

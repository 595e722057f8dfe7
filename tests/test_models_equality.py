"""tracevene.models.equality: EqualityMLP, its checkpoint format and train_mlp.

The task's data and the DAS recipe are tested in tests/test_recipe_das.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests import numerics
from tracevene.errors import ArgumentError
from tracevene.models import equality
from tracevene.models.equality import EqualityMLP, train_mlp
from tracevene.tasks import hierarchical_equality as he

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "hierarchical_equality"


def test_forward_is_the_stacked_relu_layers_then_the_head():
    model = EqualityMLP(hidden=8, n_layers=2, entity_seed=3)
    assert [name for name, _ in model.named_children()] == ["layer1", "layer2", "head"]
    assert model.layer_names == ["layer1", "layer2"]
    numerics.assert_exact(model.entities, he.entity_pool(seed=3), what="the entity buffer")
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    h = x
    for name in ("layer1", "layer2"):
        linear = getattr(model, name)[0]
        h = torch.clamp(h @ linear.weight.T + linear.bias, min=0)
    want = h @ model.head.weight.T + model.head.bias
    with torch.no_grad():
        numerics.assert_close(model(x), want, what="EqualityMLP vs its layers by hand")


def test_bad_sizes_are_refused():
    with pytest.raises(ArgumentError, match=r"n_layers=0 and hidden=16 must be at least 1"):
        EqualityMLP(n_layers=0)


def test_bundled_checkpoint_loads_and_solves_the_task():
    model = EqualityMLP.load(BUNDLED)
    assert not model.training
    assert model.config == json.loads((BUNDLED / "config.json").read_text())
    numerics.assert_close(model.entities, he.entity_pool(seed=0), what="entities", ulps=numerics.OP)
    x, y = he.factual_data(model.entities, 4000, seed=123)
    assert he.accuracy(model, x, y) >= 0.99


def test_load_refuses_another_model_type(tmp_path):
    EqualityMLP().save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ArgumentError, match=r"has model_type='gpt2', not 'hierarchical_equ"):
        EqualityMLP.load(tmp_path)


def test_train_mlp_learns_the_task_and_repeats_for_a_seed():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order, so the two runs are bit-identical
    try:
        model = train_mlp(seed=0, steps=800)
        again = train_mlp(seed=0, steps=800)
    finally:
        torch.set_num_threads(threads)
    for name, value in model.state_dict().items():
        numerics.assert_exact(again.state_dict()[name], value, what=f"{name} of a second run")
    x, y = he.factual_data(model.entities, 4000, seed=7)
    untrained = EqualityMLP().eval()
    assert he.accuracy(model, x, y) >= 0.9
    assert abs(he.accuracy(untrained, x, y) - 0.5) < 0.1  # labels are fair coins


def test_train_mlp_takes_the_given_pool():
    pool = he.entity_pool(seed=7)
    model = train_mlp(pool, steps=1, batch_size=4)
    numerics.assert_exact(model.entities, pool, what="the trained model's entities")
    with pytest.raises(ArgumentError, match=r"pool has shape \(20, 3\), the model expects \(20, 4"):
        train_mlp(he.entity_pool(dim=3), steps=1)


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"batch_size": 0}, {"warmup": -1}])
def test_train_mlp_refuses_an_empty_schedule(kwargs):
    state = torch.random.get_rng_state()
    with pytest.raises(ArgumentError, match=r"steps and batch_size must be at least 1"):
        train_mlp(**kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # refused before seeding


def test_learning_rate_warms_up_linearly_then_decays_as_a_cosine():
    factor = equality._lr_factor
    assert factor(0, 8, 4) == pytest.approx(0.25)  # (0 + 1) / 4 of the way up, cosine at 1
    assert factor(1, 8, 4) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 8)))
    assert factor(4, 8, 4) == pytest.approx(0.5)  # warm, half way down the cosine
    assert factor(8, 8, 4) == pytest.approx(0.0, abs=1e-12)
    assert factor(0, 8, 0) == pytest.approx(1.0)  # no warmup: the cosine alone

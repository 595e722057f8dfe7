"""Intervention modules: static and trainable interventions against closed forms.

Every expected value is computed independently of tracevene's intervention code: by
indexing and arithmetic on plain tensors, and, for programs, by a plain
``register_forward_hook`` on the Hugging Face module that applies the closed form
(``layer[L].resid_post`` is the output of ``transformer.h[L]``), the way
tests/conformance_refs.py writes its references. Rotations are checked against
"rotate, swap coordinates, rotate back" with an explicit orthogonal matrix.
"""

from __future__ import annotations

import copy
import json
import math

import numerics
import pytest
import torch
from torch import Tensor, nn

import models
import tracevene as iv
from tracevene.errors import ExecutionError, RegistryError, ShapeError
from tracevene.interventions import registry

BACKENDS = ["torch", "nnsight", "transformer_lens"]
D = 32  # d_model of models.gpt2()
TRAINABLE = ["RotatedSpace", "LowRankRotatedSpace", "BoundlessRotatedSpace", "SigmoidMask"]


def close(
    a: Tensor, b: Tensor, ulps: int = numerics.MODEL, what: str = "intervention output"
) -> None:
    """``a`` (the intervention, in a program or on tensors) against its closed form or a
    plain-hook run; ``numerics.OP`` where both sides are a few tensor operations."""
    numerics.assert_close(a, b, what=what, ulps=ulps)


BF16_EPS = 2.0**-8  # bfloat16's relative rounding step (7 stored mantissa bits)


@pytest.fixture(scope="module")
def hf():
    return models.gpt2()


@pytest.fixture(scope="module")
def wrapped(hf):
    """``wrapped(backend)``: the GPT-2 under that backend (wrapped once per module)."""
    cache: dict[str, iv.Model] = {}

    def get(backend: str) -> iv.Model:
        if backend not in cache:
            cache[backend] = iv.wrap(hf, backend=backend)
        return cache[backend]

    return get


@pytest.fixture(scope="module")
def clean(hf):
    """``clean(ids, layer)``: :func:`block_output`, computed once per input and layer."""
    cache: dict[tuple[bytes, int], Tensor] = {}

    def get(ids: Tensor, layer: int) -> Tensor:
        key = (ids.numpy().tobytes() + str(tuple(ids.shape)).encode(), layer)
        if key not in cache:
            cache[key] = block_output(hf, ids, layer)
        return cache[key]

    return get


# -- independent references ----------------------------------------------------------------
def block_output(hf, ids: Tensor, layer: int) -> Tensor:
    """``transformer.h[layer]``'s output on a clean run (a plain hook, no tracevene)."""
    got = []
    handle = hf.transformer.h[layer].register_forward_hook(lambda m, a, o: got.append(o))
    try:
        with torch.no_grad():
            hf(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    assert isinstance(got[0], Tensor)  # GPT2Block returns a tensor in transformers 5
    return got[0].detach().clone()


def hooked_logits(hf, ids: Tensor, layer: int, edit) -> Tensor:
    """Logits with ``transformer.h[layer]``'s output replaced by ``edit(output)``."""
    handle = hf.transformer.h[layer].register_forward_hook(lambda m, a, o: edit(o.clone()))
    try:
        with torch.no_grad():
            return hf(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()


def rotate_swap(base: Tensor, source: Tensor, rotation: Tensor, weights: Tensor) -> Tensor:
    """Rotate both into the basis ``rotation`` (columns), take coordinate ``i`` from the
    source with weight ``weights[i]`` (1 = swap, 0 = keep), rotate back."""
    rb, rs = base @ rotation, source @ rotation
    return (rb * (1 - weights) + rs * weights) @ rotation.T


def first(k: int, d: int) -> Tensor:
    """Hard weights: the first ``k`` of ``d`` coordinates."""
    w = torch.zeros(d)
    w[:k] = 1
    return w


def complete(columns: Tensor) -> Tensor:
    """A ``d x d`` orthogonal matrix whose first columns are ``columns`` (orthonormal)."""
    d, k = columns.shape
    g = torch.Generator().manual_seed(123)
    q, _ = torch.linalg.qr(torch.cat([columns, torch.randn(d, d - k, generator=g)], 1))
    return torch.cat([columns, q[:, k:]], 1)


def make(name: str, d: int) -> nn.Module:
    """A trainable intervention with random (not initial) parameters."""
    module = {
        "RotatedSpace": lambda: iv.RotatedSpace(d, 3),
        "LowRankRotatedSpace": lambda: iv.LowRankRotatedSpace(d, 3),
        "BoundlessRotatedSpace": lambda: iv.BoundlessRotatedSpace(d, temperature=0.1),
        "SigmoidMask": lambda: iv.SigmoidMask(d, temperature=0.5),
    }[name]()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3 if p.dim() else 0.5)
    return module


def hand(module: nn.Module):
    """The closed form of a trainable intervention, from its parameters, per vector."""
    with torch.no_grad():
        if isinstance(module, iv.SigmoidMask):
            m = torch.sigmoid(module.logits / module.temperature)
            return lambda b, s: (1 - m) * b + m * s
        if isinstance(module, iv.BoundlessRotatedSpace):
            d = module.d
            boundary = d * torch.sigmoid(module.theta)
            m = torch.sigmoid((boundary - torch.arange(d) - 0.5) / (module.temperature * d))
            r = module.rotation.weight.detach().clone()
            return lambda b, s: rotate_swap(b, s, r, m)
        w = module.rotation.weight.detach().clone()
        r = complete(w) if isinstance(module, iv.LowRankRotatedSpace) else w
        return lambda b, s: rotate_swap(b, s, r, first(module.k, module.d))


def original(module: nn.Module) -> Tensor:
    """The trained (unconstrained) tensor behind a rotation."""
    return module.rotation.parametrizations.weight.original


def trained_grads(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad for n, p in module.named_parameters()}


# -- static interventions: closed forms on plain tensors --------------------------------------
MEAN = torch.linspace(-1, 1, D)
VECTOR = torch.cos(torch.arange(D, dtype=torch.float32))
SUB = [1, 5, 7]


def _put(x: Tensor, idx: list[int], s: Tensor) -> Tensor:
    y = x.clone()
    for i in idx:
        y[..., i] = s[..., i]
    return y


def _noise(shape, std: float, seed: int) -> Tensor:
    return std * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# (id, module, extra call kwargs, closed form (base, source) -> new value)
STATIC = [
    ("zero", lambda: iv.Zero(), {}, lambda b, s: b * 0),
    ("mean", lambda: iv.MeanAblate(MEAN), {}, lambda b, s: MEAN + 0 * b),
    ("add", lambda: iv.Add(VECTOR, scale=2.5), {}, lambda b, s: b + 2.5 * VECTOR),
    ("scale", lambda: iv.Scale(-0.5), {}, lambda b, s: -0.5 * b),
    ("noise", lambda: iv.Noise(0.3, seed=7), {}, lambda b, s: b + _noise(b.shape, 0.3, 7)),
    ("interchange", lambda: iv.Interchange(), {}, lambda b, s: s + 0 * b),
    ("subspace", lambda: iv.Interchange(subspace=SUB), {}, lambda b, s: _put(b, SUB, s)),
    (
        "variable",
        lambda: iv.Interchange(variables={"a": [0, 3], "b": [4, 5, 6]}),
        {"variable": "b"},
        lambda b, s: _put(b, [4, 5, 6], s),
    ),
    (
        "all_variables",
        lambda: iv.Interchange(variables={"a": [0, 3], "b": [4, 5, 6]}),
        {},
        lambda b, s: _put(b, [0, 3, 4, 5, 6], s),
    ),
]
STATIC_IDS = [c[0] for c in STATIC]


@pytest.mark.parametrize("case", STATIC, ids=STATIC_IDS)
def test_static_closed_form_on_tensors(case):
    _, build, kwargs, expected = case
    base, source = torch.randn(2, 5, D), torch.randn(2, 5, D)
    out = build()(base, source, **kwargs)
    close(out, expected(base, source), ulps=numerics.OP)
    assert out.shape == base.shape and out.dtype == base.dtype
    # on a single vector, and in float64 (the dtype of the base is kept)
    base64, source64 = base[0, 0].double(), source[0, 0].double()
    out64 = build()(base64, source64, **kwargs)
    assert out64.dtype == torch.float64
    close(out64, expected(base[0, 0], source[0, 0]).double(), ulps=numerics.OP)


@pytest.mark.parametrize("case", STATIC, ids=STATIC_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_static_in_program_matches_a_plain_hook(hf, wrapped, clean, backend, case):
    _, build, kwargs, expected = case
    module = build()
    base, source = models.tokens(3, 6, seed=1), models.tokens(3, 6, seed=2)
    with iv.trace(wrapped(backend), base) as t:
        src = t.source(source)
        site = t.layer[1].resid_post
        site[:, 2] = module(site[:, 2], src.layer[1].resid_post[:, 2], **kwargs)
        written = t.layer[1].resid_post[:, 2].save()
        logits = t.logits.save()

    s = clean(source, 1)

    def edit(o):
        o[:, 2] = expected(o[:, 2], s[:, 2])
        return o

    close(logits.value, hooked_logits(hf, base, 1, edit))
    close(written.value, expected(clean(base, 1)[:, 2], s[:, 2]))
    assert not torch.allclose(written.value, clean(base, 1)[:, 2], atol=1e-3)  # it did something


def test_interchange_broadcasts_the_source():
    swap = iv.Interchange(subspace=[0, 2])
    out = swap(torch.zeros(2, 4), torch.tensor([1.0, 2.0, 3.0, 4.0]))  # source broadcasts
    close(out, torch.tensor([[1.0, 0, 3.0, 0]] * 2))


# -- Noise ---------------------------------------------------------------------------------
def test_noise_is_reproducible_and_seeded():
    x = torch.randn(3, 4, D)
    a, b = iv.Noise(0.5, seed=1)(x), iv.Noise(0.5, seed=1)(x)
    assert torch.equal(a, b)
    noise = iv.Noise(0.5, seed=1)
    assert torch.equal(noise(x), noise(x))  # every call draws the same noise
    assert not torch.allclose(iv.Noise(0.5, seed=2)(x), a)
    close(a - x, _noise(x.shape, 0.5, 1), ulps=numerics.OP, what="the noise added")
    assert torch.equal(iv.Noise(0.0, seed=1)(x), x)


@pytest.mark.parametrize("shape", [(D,), (2, 6, D), (2, 6, 4, 8)], ids=["d", "bpd", "bphd"])
def test_noise_is_shape_agnostic(shape):
    x = torch.randn(shape)
    out = iv.Noise(0.2, seed=5)(x)
    assert out.shape == x.shape
    close(out, x + _noise(shape, 0.2, 5), ulps=numerics.OP)


def test_noise_std_and_mean():
    x = torch.zeros(400, 500)
    n = iv.Noise(0.7, seed=3)(x)
    assert abs(n.std().item() - 0.7) < 0.007
    assert abs(n.mean().item()) < 0.005


def test_noise_is_the_same_on_every_backend(wrapped):
    base = models.tokens(2, 6, seed=1)
    noise = iv.Noise(1.0, seed=11)
    with iv.trace(wrapped("torch")) as t:
        t.layer[0].resid_post[:, 1:4].save("clean")
        t.layer[0].resid_post[:, 1:4] = noise(t.layer[0].resid_post[:, 1:4])
        t.layer[0].resid_post[:, 1:4].save("noisy")
    diffs = []
    for backend in BACKENDS:
        r = t.program.run(wrapped(backend), base)
        diffs.append(r["noisy"] - r["clean"])
    for d in diffs:
        close(d, _noise((2, 3, D), 1.0, 11), what="the noise added in a program")


# -- rotations ------------------------------------------------------------------------------
@pytest.mark.parametrize("orthogonal_map", ["cayley", "matrix_exp"])
@pytest.mark.parametrize("cls", [iv.RotatedSpace, iv.BoundlessRotatedSpace])
def test_rotation_is_orthogonal(cls, orthogonal_map):
    kwargs = {"k": 4} if cls is iv.RotatedSpace else {}
    rot = cls(16, orthogonal_map=orthogonal_map, **kwargs)
    with torch.no_grad():
        original(rot).normal_(0, 1.0)  # far from the start
    w = rot.rotation.weight
    assert w.shape == (16, 16)
    close(w.T @ w, torch.eye(16))
    close(w @ w.T, torch.eye(16))
    assert not torch.allclose(w, rot.rotation.parametrizations.weight[0].start, atol=1e-3)


def test_the_two_maps_differ():
    a, b = iv.RotatedSpace(8, 2), iv.RotatedSpace(8, 2, orthogonal_map="matrix_exp")
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        original(a).normal_()
        original(b).copy_(original(a))
    assert not torch.allclose(a.rotation.weight, b.rotation.weight, atol=1e-3)


def test_low_rank_has_orthonormal_columns():
    rot = iv.LowRankRotatedSpace(16, 5)
    with torch.no_grad():
        original(rot).normal_()
    w = rot.rotation.weight
    assert w.shape == (16, 5)
    close(w.T @ w, torch.eye(5))
    close(rot.basis, w.detach())


@pytest.mark.parametrize("orthogonal_map", ["cayley", "matrix_exp"])
def test_rotated_space_is_rotate_swap_rotate_back(orthogonal_map):
    rot = iv.RotatedSpace(12, 4, orthogonal_map=orthogonal_map)
    with torch.no_grad():
        original(rot).normal_(0, 0.5)
    base, source = torch.randn(3, 5, 12), torch.randn(3, 5, 12)
    r = rot.rotation.weight.detach()
    want = rotate_swap(base, source, r, first(4, 12))
    close(rot(base, source), want)
    # the first k rotated coordinates are the source's, the others the base's
    out = rot(base, source) @ r
    close(out[..., :4], (source @ r)[..., :4])
    close(out[..., 4:], (base @ r)[..., 4:])
    close(rot.basis, r[:, :4])


def test_low_rank_is_rotate_swap_rotate_back():
    rot = iv.LowRankRotatedSpace(12, 3)
    with torch.no_grad():
        original(rot).normal_()
    base, source = torch.randn(4, 12), torch.randn(4, 12)
    full = complete(rot.rotation.weight.detach())
    close(full.T @ full, torch.eye(12))
    close(rot(base, source), rotate_swap(base, source, full, first(3, 12)))


@pytest.mark.parametrize("cls", [iv.RotatedSpace, iv.LowRankRotatedSpace])
def test_variables_swap_only_their_block(cls):
    rot = cls(12, variables={"x": 2, "y": 3})
    assert rot.k == 5
    with torch.no_grad():
        original(rot).normal_()
    w = rot.rotation.weight.detach()
    r = complete(w[:, :5]) if cls is iv.LowRankRotatedSpace else w
    base, source = torch.randn(3, 12), torch.randn(3, 12)
    wx, wy = torch.zeros(12), torch.zeros(12)
    wx[0:2], wy[2:5] = 1, 1
    close(rot(base, source, variable="x"), rotate_swap(base, source, r, wx))
    close(rot(base, source, variable="y"), rotate_swap(base, source, r, wy))
    close(rot(base, source), rotate_swap(base, source, r, first(5, 12)))  # all variables
    # disjoint: swapping x then y is swapping both; swapping x leaves y's block alone
    both = rot(rot(base, source, variable="x"), source, variable="y")
    close(both, rot(base, source))
    only_x = rot(base, source, variable="x") @ r
    close(only_x[..., 2:], (base @ r)[..., 2:])


def test_boundless_mask_closed_form():
    rot = iv.BoundlessRotatedSpace(10, init_boundary=0.3, temperature=0.5)
    assert rot.boundary == pytest.approx(3.0, abs=1e-5)
    with torch.no_grad():
        rot.theta.fill_(0.4)
    b = 10 / (1 + math.exp(-0.4))
    assert rot.boundary == pytest.approx(b, abs=1e-5)
    want = torch.tensor([1 / (1 + math.exp(-(b - i - 0.5) / (0.5 * 10))) for i in range(10)])
    close(rot.mask(), want)
    base, source = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    close(rot(base, source), rotate_swap(base, source, rot.rotation.weight.detach(), want))


@pytest.mark.parametrize("boundary", [5.3, 2.7, 8.4])
def test_boundless_at_low_temperature_is_a_hard_swap(boundary):
    d = 16
    rot = iv.BoundlessRotatedSpace(d)
    with torch.no_grad():
        original(rot).normal_(0, 0.5)
        rot.theta.fill_(math.log(boundary / (d - boundary)))
    rot.set_temperature(1e-4)
    assert rot.boundary == pytest.approx(boundary, abs=1e-4)
    close(rot.mask(), first(round(boundary), d))
    base, source = torch.randn(4, d), torch.randn(4, d)
    r = rot.rotation.weight.detach()
    close(rot(base, source), rotate_swap(base, source, r, first(round(boundary), d)))


def test_sigmoid_mask_closed_form():
    mask = iv.SigmoidMask(6, temperature=0.5)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([-3.0, -0.2, -0.05, 0.4, 2.0, 9.0]))
    m = torch.tensor([1 / (1 + math.exp(-v / 0.5)) for v in [-3.0, -0.2, -0.05, 0.4, 2.0, 9.0]])
    close(mask.mask(), m)
    base, source = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    close(mask(base, source), (1 - m) * base + m * source)
    mask.set_temperature(1e-4)  # hard: the dimensions with positive logits
    close(mask(base, source), _put(base, [3, 4, 5], source))


@pytest.mark.parametrize("name", TRAINABLE)
def test_gradients_reach_every_parameter(name):
    module = make(name, 8)
    base, source = torch.randn(5, 8), torch.randn(5, 8)
    target = torch.randn(5, 8)
    (module(base, source) - target).pow(2).sum().backward()
    grads = trained_grads(module)
    assert grads and all(g is not None for g in grads.values()), grads
    for n, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, n


@pytest.mark.parametrize("cls", [iv.BoundlessRotatedSpace, iv.SigmoidMask])
def test_temperature_is_a_buffer(cls):
    module = cls(8, temperature=0.7)
    assert "temperature" in dict(module.named_buffers())
    assert "temperature" not in dict(module.named_parameters())
    assert module.state_dict()["temperature"].item() == pytest.approx(0.7)
    assert cls.temperature_schedule is not None
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    before = module.mask().clone()
    module.set_temperature(0.05)
    assert module.temperature.item() == pytest.approx(0.05)
    assert not torch.allclose(module.mask(), before)
    assert iv.RotatedSpace.temperature_schedule is None


# -- programs: weight tying, materialisation, batches ---------------------------------------
SITES = [(0, 2), (1, 3), (2, 4)]  # (layer, position): three sites


def run_at_sites(model, modules, base, source):
    """One program writing ``modules[i]`` at ``SITES[i]``; returns the logits."""
    with iv.trace(model) as t:
        src = t.source()
        for (layer, pos), m in zip(SITES, modules, strict=True):
            b = t.layer[layer].resid_post[:, pos]
            t.layer[layer].resid_post[:, pos] = m(b, src.layer[layer].resid_post[:, pos])
        t.logits.log_softmax(-1).save("logp")
    return t.program.run(model, base, [source])["logp"]


@pytest.mark.parametrize("name", TRAINABLE)
def test_weight_tying_sums_the_gradients_of_every_site(wrapped, name):
    model = wrapped("torch")
    base, source = models.tokens(2, 6, seed=1), models.tokens(2, 6, seed=2)
    tied = make(name, D)
    copies = [copy.deepcopy(tied) for _ in SITES]
    out_tied = run_at_sites(model, [tied] * 3, base, source)
    out_sep = run_at_sites(model, copies, base, source)
    close(out_tied, out_sep)
    out_tied[..., 5].sum().backward()
    out_sep[..., 5].sum().backward()
    per_site = [trained_grads(c) for c in copies]
    for n, g in trained_grads(tied).items():
        assert g is not None and g.abs().sum() > 0, n
        close(g, sum(p[n] for p in per_site), what=f"tied gradient of {n} = sum of per-site")
        # every site contributes its own (different) gradient
        assert not torch.allclose(per_site[0][n], per_site[1][n], atol=1e-7), n
        assert not torch.allclose(per_site[0][n], per_site[2][n], atol=1e-7), n


@pytest.mark.parametrize("name", ["RotatedSpace", "LowRankRotatedSpace", "BoundlessRotatedSpace"])
def test_deep_copies_keep_their_own_weights_in_a_program(wrapped, clean, name):
    # torch's deepcopy of a parametrized module caches under the original's id in
    # parametrize.cached(), which every program run uses: copies must not share it
    model = wrapped("torch")
    base, source = models.tokens(2, 6, seed=1), models.tokens(2, 6, seed=2)
    rot = make(name, D)
    other = copy.deepcopy(rot)
    with torch.no_grad():
        original(other).normal_(0, 0.5)
    want = hand(other)
    assert not torch.allclose(other.rotation.weight, rot.rotation.weight, atol=1e-3)
    with iv.trace(model) as t:
        src = t.source()
        b = t.layer[1].resid_post[:, 2]
        rot(b, src.layer[1].resid_post[:, 2]).save("rot")
        other(b, src.layer[1].resid_post[:, 2]).save("other")
    r = t.program.run(model, base, [source])
    h, s = clean(base, 1)[:, 2], clean(source, 1)[:, 2]
    close(r["other"], want(h, s))
    close(r["rot"], hand(rot)(h, s))


@pytest.mark.parametrize("name", ["RotatedSpace", "LowRankRotatedSpace", "BoundlessRotatedSpace"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_is_materialised_once_per_run(wrapped, backend, name):
    rot = make(name, D)
    calls = []
    hook = rot.rotation.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1))
    base, source = models.tokens(2, 6, seed=1), models.tokens(2, 6, seed=2)
    try:
        logp = run_at_sites(wrapped(backend), [rot] * 3, base, source)
        assert len(calls) == 1
        logp.sum().backward()  # the backward pass does not rerun it
        assert len(calls) == 1
        run_at_sites(wrapped(backend), [rot] * 3, base, source)
        assert len(calls) == 2  # once per run: a new run sees the current parameters
        x = torch.randn(D)
        for _ in range(3):  # outside a program, every call materialises the weight
            rot(x, x)
        assert len(calls) == 5
    finally:
        hook.remove()


POSITIONS = [1, 2, 3]


@pytest.mark.parametrize("name", TRAINABLE)
@pytest.mark.parametrize(
    "backend, schedule",
    [("torch", "sequential"), ("torch", "batched"), ("nnsight", "batched"),
     ("transformer_lens", "batched")],
)  # fmt: skip
def test_batch_of_32_with_several_positions(hf, wrapped, clean, backend, schedule, name):
    module = make(name, D)
    base, source = models.tokens(32, 6, seed=3), models.tokens(32, 6, seed=4)
    with iv.trace(wrapped(backend), base, schedule=schedule) as t:
        src = t.source(source)
        b = t.layer[1].resid_post[:, POSITIONS]
        t.layer[1].resid_post[:, POSITIONS] = module(b, src.layer[1].resid_post[:, POSITIONS])
        logits = t.logits.save()

    closed_form = hand(module)
    s = clean(source, 1)

    def edit(o):  # one example and one position at a time
        for i in range(o.shape[0]):
            for p in POSITIONS:
                o[i, p] = closed_form(o[i, p], s[i, p])
        return o

    close(logits.value, hooked_logits(hf, base, 1, edit))
    logits.value[:, -1].log_softmax(-1)[:, 7].mean().backward()
    grads = trained_grads(module)
    for n, g in grads.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n


# -- bf16 -------------------------------------------------------------------------------------
def planted_task(n: int = 256, d: int = 8, coord: int = 3):
    """bf16 base / source; the target is the base with one coordinate from the source."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, d, generator=g).bfloat16()
    source = torch.randn(n, d, generator=g).bfloat16()
    target = base.clone()
    target[:, coord] = source[:, coord]
    return base, source, target


def train_steps(module, base, source, target, steps: int = 25, lr: float = 0.05):
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = module(base, source)
        assert out.dtype == torch.bfloat16
        loss = (out.float() - target.float()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for p in module.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
        opt.step()
        losses.append(loss.item())
    return losses


def make_k1(name: str, d: int) -> nn.Module:
    return {
        "RotatedSpace": lambda: iv.RotatedSpace(d, 1),
        "LowRankRotatedSpace": lambda: iv.LowRankRotatedSpace(d, 1),
        "BoundlessRotatedSpace": lambda: iv.BoundlessRotatedSpace(d),
        "SigmoidMask": lambda: iv.SigmoidMask(d),
    }[name]()


@pytest.mark.parametrize("name", TRAINABLE)
def test_bf16_activations(name):
    module = make(name, 8)
    base, source = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    out = module(base.bfloat16(), source.bfloat16())
    assert out.dtype == torch.bfloat16
    # float32 inside: equal to the float32 result up to bf16 rounding of inputs/output
    want = module(base.bfloat16().float(), source.bfloat16().float())
    bf16 = 2 * BF16_EPS * numerics.magnitude(want)  # the output's rounding to bf16, and slack
    torch.testing.assert_close(out.float(), want, atol=bf16, rtol=0)
    assert all(p.dtype == torch.float32 for p in module.parameters())


@pytest.mark.parametrize("name", TRAINABLE)
def test_bf16_training_reduces_the_loss(name):
    losses = train_steps(make_k1(name, 8), *planted_task())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", TRAINABLE)
def test_module_cast_to_bf16(name):
    module = make(name, 8)
    module32 = copy.deepcopy(module)
    module = module.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    base, source = torch.randn(4, 8), torch.randn(4, 8)
    out = module(base.bfloat16(), source.bfloat16())
    assert out.dtype == torch.bfloat16
    # bf16 weights and inputs: a few bf16 roundings per product, summed over d=8 terms
    want = module32(base, source)
    torch.testing.assert_close(
        out.float(), want, atol=8 * BF16_EPS * numerics.magnitude(base, source), rtol=0
    )
    losses = train_steps(make_k1(name, 8).to(torch.bfloat16), *planted_task())
    assert losses[-1] < 0.8 * losses[0], losses


def test_float32_rotation_in_a_bf16_model():
    hf16 = models.gpt2().to(torch.bfloat16)
    model = iv.wrap(hf16, backend="torch")
    rot = iv.RotatedSpace(D, 2)
    base, source = models.tokens(2, 6, seed=1), models.tokens(2, 6, seed=2)
    with iv.trace(model, base) as t:
        src = t.source(source)
        b = t.layer[1].resid_post[:, 2]
        t.layer[1].resid_post[:, 2] = rot(b, src.layer[1].resid_post[:, 2])
        written = t.layer[1].resid_post[:, 2].save()
        logits = t.logits.save()
    assert written.value.dtype == torch.bfloat16
    logits.value.float().logsumexp(-1).mean().backward()
    g = original(rot).grad
    assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
    assert g.abs().sum() > 0


# -- errors -----------------------------------------------------------------------------------
def test_wrong_width():
    rot = iv.RotatedSpace(8, 2)
    with pytest.raises(
        ShapeError, match=r"RotatedSpace\(d=8\) was given a base of shape \(3, 7\); its last "
        r"dimension must be 8"
    ):  # fmt: skip
        rot(torch.randn(3, 7), torch.randn(3, 7))
    with pytest.raises(ShapeError, match=r"given a source of shape \(3, 6\)"):
        rot(torch.randn(3, 8), torch.randn(3, 6))
    for module in (iv.BoundlessRotatedSpace(8), iv.SigmoidMask(8), iv.LowRankRotatedSpace(8, 2)):
        with pytest.raises(ShapeError, match=rf"{type(module).__name__}\(d=8\) was given a base"):
            module(torch.randn(7), torch.randn(7))
    with pytest.raises(ShapeError, match=r"was given a base of shape \(\)"):
        rot(torch.tensor(1.0), torch.tensor(1.0))


def test_wrong_width_in_a_program_names_the_site(wrapped):
    rot = iv.RotatedSpace(8, 2)
    with pytest.raises(ShapeError, match=r"base\.layer\[1\]\.resid_post.*RotatedSpace\(d=8\)"):
        with iv.trace(wrapped("torch"), models.tokens(1, 4)) as t:
            src = t.source(models.tokens(1, 4, seed=2))
            b = t.layer[1].resid_post[:, 1]
            t.layer[1].resid_post[:, 1] = rot(b, src.layer[1].resid_post[:, 1])


@pytest.mark.parametrize(
    "module",
    [iv.RotatedSpace(8, 2), iv.LowRankRotatedSpace(8, 2), iv.BoundlessRotatedSpace(8),
     iv.SigmoidMask(8), iv.Interchange()],
    ids=lambda m: type(m).__name__,
)  # fmt: skip
def test_missing_source(module):
    name = type(module).__name__
    with pytest.raises(ValueError, match=rf"{name} swaps values in from a source: call it as"):
        module(torch.randn(2, 8))


def test_missing_source_in_a_program(wrapped):
    with pytest.raises(ExecutionError, match=r"RotatedSpace swaps values in from a source"):
        with iv.trace(wrapped("torch"), models.tokens(1, 4)) as t:
            t.layer[1].resid_post = iv.RotatedSpace(D, 2)(t.layer[1].resid_post)


def test_unknown_variable():
    rot = iv.RotatedSpace(8, variables={"x": 1, "y": 2})
    with pytest.raises(ValueError, match=r"RotatedSpace has no variable 'z'; its variables: x, y"):
        rot(torch.randn(8), torch.randn(8), variable="z")
    with pytest.raises(ValueError, match=r"no variable 'x'; its variables: none"):
        iv.LowRankRotatedSpace(8, 2)(torch.randn(8), torch.randn(8), variable="x")
    swap = iv.Interchange(variables={"a": [0]})
    with pytest.raises(ValueError, match=r"Interchange has no variable 'b'; its variables: a"):
        swap(torch.randn(8), torch.randn(8), variable="b")


def test_bad_interchange_arguments():
    with pytest.raises(ValueError, match=r"variables 'a' and 'b' both own dimension 1"):
        iv.Interchange(variables={"a": [0, 1], "b": [1, 2]})
    with pytest.raises(ValueError, match=r"either subspace=\[\.\.\.\] or variables"):
        iv.Interchange(subspace=[0], variables={"a": [1]})
    with pytest.raises(ShapeError, match=r"Interchange swaps dimension 9"):
        iv.Interchange(subspace=[2, 9])(torch.randn(8), torch.randn(8))


def test_bad_rotation_arguments():
    with pytest.raises(ValueError, match=r"k=9 must be between 1 and d=8"):
        iv.RotatedSpace(8, 9)
    with pytest.raises(ValueError, match=r"k=0 must be between 1 and d=8"):
        iv.LowRankRotatedSpace(8, 0)
    with pytest.raises(ValueError, match=r"k=9 must be between 1 and d=8"):
        iv.RotatedSpace(8, variables={"x": 4, "y": 5})
    with pytest.raises(ValueError, match=r"k=3 but the variables' sizes"):
        iv.RotatedSpace(8, 3, variables={"x": 1, "y": 1})
    with pytest.raises(ValueError, match=r"give the number of interchanged dimensions k"):
        iv.RotatedSpace(8)
    with pytest.raises(ValueError, match=r"orthogonal_map='qr': choose one of"):
        iv.RotatedSpace(8, 2, orthogonal_map="qr")
    with pytest.raises(ValueError, match=r"orthogonal_map='qr': choose one of"):
        iv.BoundlessRotatedSpace(8, orthogonal_map="qr")
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"init_boundary={bad} must be a fraction in \(0,"):
            iv.BoundlessRotatedSpace(8, init_boundary=bad)


# -- the base class: specs, registry, saving ---------------------------------------------------
BUILT_IN_IDS = [
    "zero",
    "mean",
    "add",
    "scale",
    "noise",
    "interchange",
    "subspace",
    "variables",
    "rotated",
    "rotated_variables",
    "low_rank",
    "boundless",
    "mask",
]
BUILT_INS = [
    lambda: iv.Zero(),
    lambda: iv.MeanAblate(torch.randn(8)),
    lambda: iv.Add(torch.randn(8), scale=2.0),
    lambda: iv.Scale(-0.5),
    lambda: iv.Noise(0.3, seed=4),
    lambda: iv.Interchange(),
    lambda: iv.Interchange(subspace=[1, 2]),
    lambda: iv.Interchange(variables={"a": [0], "b": [2, 3]}),
    lambda: iv.RotatedSpace(8, 3),
    lambda: iv.RotatedSpace(8, variables={"x": 1, "y": 2}, orthogonal_map="matrix_exp"),
    lambda: iv.LowRankRotatedSpace(8, 2),
    lambda: iv.BoundlessRotatedSpace(8, init_boundary=0.3, temperature=0.5),
    lambda: iv.SigmoidMask(8, temperature=0.5),
]


@pytest.mark.parametrize("build", BUILT_INS, ids=BUILT_IN_IDS)
def test_spec_round_trip(build):
    module = build()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    spec = json.loads(json.dumps(module.spec()))  # JSON through and through
    name, described = registry.describe(module)
    assert name == type(module).__name__ and described == module.spec()
    rebuilt = type(module).from_spec(spec)
    assert type(rebuilt) is type(module) and rebuilt.spec() == module.spec()
    rebuilt.load_state_dict(module.state_dict())
    base, source = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.equal(rebuilt(base, source), module(base, source))
    assert repr(rebuilt) == repr(module)


def test_spec_contents():
    assert iv.Add(torch.ones(4), scale=2).spec() == {
        "vector": {"tensor": [4], "dtype": "float32"},
        "scale": 2,
    }
    assert iv.RotatedSpace(8, variables={"x": 2}).spec() == {
        "d": 8, "k": None, "variables": {"dict": {"x": 2}}, "orthogonal_map": "cayley"
    }  # fmt: skip
    assert iv.Zero().spec() == {}


def test_repr_shows_the_configuration():
    assert repr(iv.Add(torch.ones(4), scale=2.0)) == "Add(vector=tensor[4], scale=2.0)"
    assert repr(iv.Noise(0.5, seed=3)) == "Noise(std=0.5, seed=3)"
    assert repr(iv.RotatedSpace(8, 2)).startswith(
        "RotatedSpace(\n  d=8, k=2, variables=None, orthogonal_map='cayley'"
    )
    assert "init_boundary=0.25, temperature=1.0" in repr(iv.BoundlessRotatedSpace(8, 0.25))


class SteerAlong(iv.Intervention):
    """A user's intervention with a tensor argument: a learned multiple of a direction."""

    def __init__(self, direction: Tensor, rank: int = 1):
        super().__init__()
        self.register_buffer("direction", direction.detach().clone())
        self.coef = nn.Parameter(torch.zeros(rank))

    def forward(self, base, source=None):
        return base + (self.coef.sum() * self.direction).to(base.dtype)


def test_a_subclass_registers_and_saves_in_a_program(wrapped, tmp_path):
    steer = SteerAlong(torch.randn(D), rank=2)
    with torch.no_grad():
        steer.coef.copy_(torch.tensor([0.5, 1.5]))
    assert registry.describe(steer) == (
        "SteerAlong", {"direction": {"tensor": [D], "dtype": "float32"}, "rank": 2}
    )  # fmt: skip
    rot = iv.BoundlessRotatedSpace(D, init_boundary=0.2)
    with torch.no_grad():
        original(rot).normal_(0, 0.3)
    model = wrapped("torch")
    with iv.trace(model) as t:
        src = t.source()
        t.layer[0].resid_post[:, 1] = steer(t.layer[0].resid_post[:, 1])
        b = t.layer[1].resid_post[:, 2]
        t.layer[1].resid_post[:, 2] = rot(b, src.layer[1].resid_post[:, 2])
        t.logits.save("logits")
    base, source = models.tokens(2, 6, seed=1), models.tokens(2, 6, seed=2)
    want = t.program.run(model, base, [source])["logits"]
    t.program.save(tmp_path / "prog")
    loaded = iv.Program.load(tmp_path / "prog")
    mods = list(loaded.modules.values())
    assert [type(m) for m in mods] == [SteerAlong, iv.BoundlessRotatedSpace]
    assert torch.equal(mods[0].direction, steer.direction)
    numerics.assert_exact(loaded.run(model, base, [source])["logits"], want, what="loaded program")
    # the steering did something
    no_steer = copy.deepcopy(t.program)
    list(no_steer.modules.values())[0].coef.data.zero_()
    assert not torch.allclose(no_steer.run(model, base, [source])["logits"], want)


def test_a_name_collision_suggests_name():
    with pytest.raises(RegistryError, match=r"the intervention name 'Zero' is already taken by "
                       r"tracevene\.interventions\.static\.Zero.*name='\.\.\.'"):  # fmt: skip

        class Zero(iv.Intervention):
            def forward(self, base, source=None):
                return base * 0

    class Zero(iv.Intervention, name="test_interventions.Zero"):  # noqa: F811
        def forward(self, base, source=None):
            return base * 0

    assert registry.describe(Zero()) == ("test_interventions.Zero", {})
    assert registry.describe(iv.Zero()) == ("Zero", {})


def test_redefining_the_same_class_is_allowed():
    def define():
        class Redefined(iv.Intervention):
            def __init__(self, factor: float = 2.0):
                super().__init__()
                self.factor = factor

            def forward(self, base, source=None):
                return base * self.factor

        return Redefined

    first_class, second_class = define(), define()  # same module and qualname
    assert first_class is not second_class
    assert registry.describe(second_class(3.0)) == ("Redefined", {"factor": 3.0})
    assert type(registry.build("Redefined", {"factor": 3.0})) is second_class


def test_a_non_json_argument_cannot_be_saved(wrapped, tmp_path):
    class CallsFunction(iv.Intervention):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, base, source=None):
            return self.fn(base)

    module = CallsFunction(torch.tanh)
    with iv.trace(wrapped("torch"), models.tokens(1, 4)) as t:
        t.layer[0].resid_post = module(t.layer[0].resid_post)
    with pytest.raises(RegistryError, match=r"CallsFunction: constructor argument fn=.*tanh.* "
                       r"cannot be saved; use numbers, strings"):  # fmt: skip
        t.program.save(tmp_path / "prog")


def test_star_args_cannot_be_recorded():
    class Varargs(iv.Intervention):
        def __init__(self, *sizes):
            super().__init__()

    with pytest.raises(RegistryError, match=r"Varargs: \*sizes arguments cannot be saved"):
        Varargs(1, 2)


def test_interchange_refuses_an_empty_index_set():
    with pytest.raises(ValueError, match="empty index set"):
        iv.Interchange(subspace=[])
    with pytest.raises(ValueError, match="empty index set"):
        iv.Interchange(variables={"a": [0], "b": []})


def test_sigmoid_mask_checks_the_source_width():
    with pytest.raises(iv.ShapeError, match=r"SigmoidMask\(d=4\) was given a source of shape"):
        iv.SigmoidMask(4)(torch.zeros(2, 4), torch.zeros(2, 5))

"""Property tests: tracevene's site indexing is torch indexing.

For random shapes and random index expressions (ints including negative ones, slices
with steps, ``...``, ``None``, integer lists, index tensors, boolean masks), a write
``t.module("0").output[index] = value`` gives exactly what ``x[index] = value`` gives on
a plain tensor (seen by a plain hook downstream), and a read ``site[index]`` equals
``x[index]``.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

import tracevene as iv

D_IN = 3
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_model(d_out: int) -> tuple[nn.Module, iv.Model]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(D_IN, d_out), nn.Identity()).eval()
    return module, iv.wrap(module, backend="torch")


def shapes():
    return st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


@st.composite
def component(draw, n: int, advanced_len: int, advanced: bool, mask: bool):
    """One index component for a dim of size ``n``: (component, kind)."""
    kinds = ["int", "slice", "full"]
    if advanced and advanced_len <= n:
        kinds += ["list", "tensor"]
    if mask:
        kinds.append("mask")
    kind = draw(st.sampled_from(kinds))
    if kind == "int":
        return draw(st.integers(-n, n - 1)), kind
    if kind == "full":
        return slice(None), kind
    if kind == "slice":
        bound = st.none() | st.integers(-n - 1, n + 1)
        step = draw(st.none() | st.integers(1, 3))
        return slice(draw(bound), draw(bound), step), kind
    if kind == "mask":
        bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        return torch.tensor(bits, dtype=torch.bool), kind
    # distinct positions (no duplicate writes), each maybe written as a negative index
    picks = draw(st.permutations(range(n)))[:advanced_len]
    picks = [p - n if draw(st.booleans()) else p for p in picks]
    return (picks if kind == "list" else torch.tensor(picks)), kind


@st.composite
def index_for(draw, shape: tuple[int, ...]):
    """A valid index expression for a tensor of ``shape``."""
    ndim = len(shape)
    consumed = draw(st.integers(0, ndim))
    ellipsis_at = draw(st.none() | st.integers(0, consumed))
    # dims the components apply to: the first ones, then (after ...) the last ones
    before = consumed if ellipsis_at is None else ellipsis_at
    dims = list(range(before)) + list(range(ndim - (consumed - before), ndim))
    advanced_len = draw(st.integers(1, 3))
    # lists and index tensors share one length (they broadcast together); a boolean
    # mask comes alone (its length is its number of True entries)
    parts, has_advanced, has_mask = [], False, False
    for d in dims:
        free = not has_mask and not has_advanced
        part, kind = draw(component(shape[d], advanced_len, not has_mask, free))
        has_mask |= kind == "mask"
        has_advanced |= kind in ("list", "tensor")
        parts.append(part)
    if ellipsis_at is not None:
        parts.insert(ellipsis_at, Ellipsis)
    if draw(st.integers(0, 5)) == 0:
        parts.insert(draw(st.integers(0, len(parts))), None)
    if len(parts) == 1 and draw(st.booleans()):
        return parts[0]  # a bare index: x[2], x[[0, 1]], x[mask], ...
    return tuple(parts)


@st.composite
def write_case(draw):
    shape = draw(shapes())
    index = draw(index_for(shape))
    target = torch.empty(shape)[index].shape
    # a value that broadcasts to the target: a suffix of its dims, some of them 1
    k = draw(st.integers(0, len(target)))
    value_shape = tuple(1 if draw(st.booleans()) else n for n in target[len(target) - k :])
    seed = draw(st.integers(0, 2**16))
    if not value_shape and draw(st.booleans()):
        value = draw(st.floats(-10, 10, allow_nan=False))
    else:
        value = torch.randn(value_shape, generator=torch.Generator().manual_seed(seed))
    return shape, index, value


NO_EDIT = object()


def run_plain(module: nn.Module, inp: torch.Tensor, index=NO_EDIT, value=None):
    """The module's output as a plain hook downstream sees it, with ``x[index] = value``."""
    seen = {}

    def edit(m, a, out):
        if index is NO_EDIT:
            return None
        out = out.clone()
        out[index] = value
        return out

    h1 = module[0].register_forward_hook(edit)
    h2 = module[1].register_forward_hook(lambda m, a, o: seen.__setitem__("x", o.clone()))
    try:
        with torch.no_grad():
            module(inp)
    finally:
        h1.remove()
        h2.remove()
    return seen["x"]


def downstream(module: nn.Module):
    seen = {}
    handle = module[1].register_forward_hook(lambda m, a, o: seen.__setitem__("x", o.clone()))
    return seen, handle


def inputs_for(shape):
    return torch.randn(*shape[:-1], D_IN, generator=torch.Generator().manual_seed(1))


@SETTINGS
@given(write_case())
def test_write_equals_plain_setitem(case):
    shape, index, value = case
    module, model = make_model(shape[-1])
    inp = inputs_for(shape)
    expected = run_plain(module, inp, index, value)
    seen, handle = downstream(module)
    try:
        with iv.trace(model, inp) as t:
            t.module("0").output[index] = value
            out = t.module("1").output.save()
    finally:
        handle.remove()
    assert torch.equal(seen["x"], expected)  # what the plain hook downstream saw
    assert torch.equal(out.value, expected)


@SETTINGS
@given(write_case())
def test_inplace_add_equals_plain(case):
    shape, index, value = case
    module, model = make_model(shape[-1])
    inp = inputs_for(shape)
    with torch.no_grad():
        x = module[0](inp)
        x[index] += value
        expected = x
    with iv.trace(model, inp) as t:
        t.module("0").output[index] += value
        out = t.module("1").output.save()
    assert torch.equal(out.value, expected)


@SETTINGS
@given(st.data())
def test_read_equals_plain_indexing(data):
    shape = data.draw(shapes())
    index = data.draw(index_for(shape))
    module, model = make_model(shape[-1])
    inp = inputs_for(shape)
    x = run_plain(module, inp)
    with iv.trace(model, inp) as t:
        y = t.module("0").output[index].save()
    assert torch.equal(y.value, x[index])


@SETTINGS
@given(st.data())
def test_whole_site_write_equals_plain(data):
    shape = data.draw(shapes())
    k = data.draw(st.integers(0, len(shape)))
    value_shape = tuple(1 if data.draw(st.booleans()) else n for n in shape[len(shape) - k :])
    value = torch.randn(value_shape, generator=torch.Generator().manual_seed(2))
    module, model = make_model(shape[-1])
    inp = inputs_for(shape)
    expected = run_plain(module, inp, Ellipsis, value)
    with iv.trace(model, inp) as t:
        t.module("0").output = value
        out = t.module("1").output.save()
    assert torch.equal(out.value, expected)
    assert out.value.shape == shape


@pytest.mark.parametrize(
    "index",
    [
        (Ellipsis, None),
        (None, Ellipsis, 0),
        (slice(None, None, 2), [0, -1]),
        (torch.tensor([[0, 1], [1, 0]]),),
        ([True, False, True],),
    ],
    ids=["ellipsis-none", "none-ellipsis-int", "step-list", "2d-index-tensor", "bool-list"],
)
def test_examples(index):
    module, model = make_model(4)
    inp = inputs_for((3, 2, 4))
    x = run_plain(module, inp)
    with iv.trace(model, inp) as t:
        y = t.module("0").output[index].save()
        t.module("0").output[index] = 0.5
        out = t.module("1").output.save()
    assert torch.equal(y.value, x[index])
    x[index] = 0.5
    assert torch.equal(out.value, x)

"""The with-block front-end: reads, writes, computation, module calls, saves, errors.

Every number is checked against an independent computation: a plain forward hook
registered by the test, or plain tensor code.
"""

from __future__ import annotations

import re
import sys

import numerics
import pytest
import torch
from torch import nn

import models
import tracevene as iv

B, P, D = 2, 6, 32


# -- independent reference: plain hooks ---------------------------------------------
def hooked(module: nn.Module, inputs: dict, read=(), edit=None):
    """Run ``module(**inputs)`` with plain forward hooks.

    ``read``: paths whose outputs are captured; ``edit``: ``path -> fn(output) -> new``.
    Returns ``(captured outputs by path, model output)``.
    """
    mods = dict(module.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for path, fn in (edit or {}).items():
        handles.append(mods[path].register_forward_hook(lambda m, a, o, fn=fn: fn(o.clone())))
    for path in read:
        handles.append(
            mods[path].register_forward_hook(
                lambda m, a, o, path=path: captured.__setitem__(path, o.detach().clone())
            )
        )
    try:
        with torch.no_grad():
            out = module(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured, out


def set_at(index, value):
    """An edit function doing ``out[index] = value`` on a plain tensor."""

    def fn(out):
        out[index] = value
        return out

    return fn


@pytest.fixture(scope="module")
def gpt2():
    return models.gpt2()


@pytest.fixture(scope="module")
def model(gpt2):
    return iv.wrap(gpt2, backend="torch")


@pytest.fixture(scope="module")
def base():
    return models.tokens(B, P, seed=1)


@pytest.fixture(scope="module")
def source():
    return models.tokens(B, P, seed=2)


@pytest.fixture(scope="module")
def clean(gpt2, base):
    """Plain-hook activations of the unpatched base run."""
    paths = [f"transformer.h.{i}" for i in range(3)] + [f"transformer.h.{i}.mlp" for i in range(3)]
    captured, out = hooked(gpt2, {"input_ids": base}, read=paths)
    captured["logits"] = out.logits
    return captured


def here() -> int:
    """Line number of the caller (for checking file:line in program listings)."""
    return sys._getframe(1).f_lineno


# -- reads ---------------------------------------------------------------------------
INDEXES = [
    pytest.param((), id="whole"),
    pytest.param(0, id="int"),
    pytest.param(-1, id="negative-int"),
    pytest.param((slice(None), -1), id="last-position"),
    pytest.param((slice(None), slice(1, None, 2)), id="slice-step"),
    pytest.param((slice(None), slice(-3, None), slice(0, 8)), id="negative-slice"),
    pytest.param((Ellipsis, 3), id="ellipsis"),
    pytest.param((1, Ellipsis, slice(None, 4)), id="int-ellipsis-slice"),
    pytest.param([1, 0], id="list"),
    pytest.param((slice(None), [0, 2, 4]), id="list-positions"),
    pytest.param(torch.tensor([1, 0, 1]), id="index-tensor"),
    pytest.param((torch.tensor([0, 1]), torch.tensor([5, 2])), id="two-index-tensors"),
    pytest.param((-1, -2, -3), id="negative-ints"),
    pytest.param((None, slice(None), 0), id="none"),
]


@pytest.mark.parametrize("index", INDEXES)
def test_read_index_matches_plain_indexing(model, base, clean, index):
    with iv.trace(model, base) as t:
        x = t.layer[1].resid_post[index].save("x")
    assert torch.equal(x.value, clean["transformer.h.1"][index])


def test_read_index_with_bool_mask(model, base, clean):
    mask = clean["transformer.h.2"] > 0
    with iv.trace(model, base) as t:
        x = t.layer[2].resid_post[mask].save()
    assert torch.equal(x.value, clean["transformer.h.2"][mask])


def test_per_example_positions_with_placeholder(model, base, clean):
    pos = torch.tensor([4, 1])
    with iv.trace(model) as t:
        p = t.arg("pos")
        t.layer[0].mlp.out[torch.arange(B), p].save("x")
    result = t.program.run(model, base, pos=pos)
    assert torch.equal(result["x"], clean["transformer.h.0.mlp"][torch.arange(B), pos])
    # A second run binds a different value to the same program.
    other = torch.tensor([0, 5])
    result = t.program.run(model, base, pos=other)
    assert torch.equal(result["x"], clean["transformer.h.0.mlp"][torch.arange(B), other])


def test_placeholder_bound_by_trace_keyword(model, base, clean):
    pos = torch.tensor([2, 3])
    with iv.trace(model, base, pos=pos) as t:
        x = t.layer[2].resid_post[torch.arange(B), t.arg("pos")].save()
    assert torch.equal(x.value, clean["transformer.h.2"][torch.arange(B), pos])


def test_write_at_per_example_positions(gpt2, model, base):
    pos = torch.tensor([3, 0])
    rows = torch.arange(B)
    with iv.trace(model, base, pos=pos) as t:
        t.layer[1].resid_post[rows, t.arg("pos")] = 0.0
        logits = t.logits.save()
    _, ref = hooked(gpt2, {"input_ids": base}, edit={"transformer.h.1": set_at((rows, pos), 0.0)})
    assert torch.equal(logits.value, ref.logits)


# -- writes ----------------------------------------------------------------------------
def test_whole_site_attribute_assignment(gpt2, model, base):
    value = torch.randn(B, P, D)
    with iv.trace(model, base) as t:
        t.layer[0].mlp.out = value
        logits = t.logits.save()
    _, ref = hooked(gpt2, {"input_ids": base}, edit={"transformer.h.0.mlp": lambda o: value})
    assert torch.equal(logits.value, ref.logits)


def test_whole_site_write_broadcasts(gpt2, model, base):
    vec = torch.randn(D)
    with iv.trace(model, base) as t:
        t.layer[1].mlp.out = vec
        logits = t.logits.save()
    _, ref = hooked(
        gpt2, {"input_ids": base}, edit={"transformer.h.1.mlp": lambda o: vec.expand(B, P, D)}
    )
    assert torch.equal(logits.value, ref.logits)


def test_indexed_write_of_number(gpt2, model, base):
    with iv.trace(model, base) as t:
        t.layer[1].mlp.out[:, 2] = 0.0
        logits = t.logits.save()
    _, ref = hooked(
        gpt2, {"input_ids": base}, edit={"transformer.h.1.mlp": set_at((slice(None), 2), 0.0)}
    )
    assert torch.equal(logits.value, ref.logits)


def _inplace(op, x, y):
    if op == "+=":
        x += y
    elif op == "-=":
        x -= y
    elif op == "*=":
        x *= y
    else:
        x /= y
    return x


@pytest.mark.parametrize("op", ["+=", "-=", "*=", "/="])
def test_inplace_operator_on_whole_site(gpt2, model, base, op):
    vec = torch.randn(D) + 2.0
    with iv.trace(model, base) as t:
        layer = t.layer[1]
        if op == "+=":
            layer.resid_post += vec
        elif op == "-=":
            layer.resid_post -= vec
        elif op == "*=":
            layer.resid_post *= vec
        else:
            layer.resid_post /= vec
        logits = t.logits.save()
    _, ref = hooked(
        gpt2, {"input_ids": base}, edit={"transformer.h.1": lambda o: _inplace(op, o, vec)}
    )
    assert torch.equal(logits.value, ref.logits)


@pytest.mark.parametrize("op", ["+=", "-=", "*=", "/="])
def test_inplace_operator_on_indexed_site(gpt2, model, base, op):
    with iv.trace(model, base) as t:
        site = t.layer[0].mlp.out
        if op == "+=":
            site[:, -1] += 3.0
        elif op == "-=":
            site[:, -1] -= 3.0
        elif op == "*=":
            site[:, -1] *= 3.0
        else:
            site[:, -1] /= 3.0
        logits = t.logits.save()

    def edit(o):
        o[:, -1] = _inplace(op, o[:, -1].clone(), 3.0)
        return o

    _, ref = hooked(gpt2, {"input_ids": base}, edit={"transformer.h.0.mlp": edit})
    assert torch.equal(logits.value, ref.logits)


def test_interchange_from_source(gpt2, model, base, source):
    with iv.trace(model, base) as t:
        src = t.source(source)
        t.layer[1].mlp.out[:, 4] = src.layer[1].mlp.out[:, 4]
        logits = t.logits.save()
    got, _ = hooked(gpt2, {"input_ids": source}, read=["transformer.h.1.mlp"])
    patch = got["transformer.h.1.mlp"][:, 4]
    _, ref = hooked(
        gpt2, {"input_ids": base}, edit={"transformer.h.1.mlp": set_at((slice(None), 4), patch)}
    )
    assert torch.equal(logits.value, ref.logits)
    assert torch.equal(t.output.logits, ref.logits)


def test_reads_and_writes_take_effect_in_program_order(model, base, clean):
    with iv.trace(model, base) as t:
        before = t.layer[1].mlp.out.save("before")
        t.layer[1].mlp.out[:, 0] = 7.0
        after = t.layer[1].mlp.out.save("after")
        site = t.layer[2].mlp.out
        site[:, 1] = -1.0  # a site value proxy: assigning into it writes the site
        again = site.save("again")
    assert torch.equal(before.value, clean["transformer.h.1.mlp"])
    expected = clean["transformer.h.1.mlp"].clone()
    expected[:, 0] = 7.0
    assert torch.equal(after.value, expected)
    assert (again.value[:, 1] == -1.0).all()


def test_setitem_on_computed_value_is_a_copy(model, base, clean):
    with iv.trace(model, base) as t:
        x = t.layer[0].mlp.out * 1.0
        x[:, 0] = 0.0
        y = x.save()
        orig = t.layer[0].mlp.out.save()
    expected = clean["transformer.h.0.mlp"].clone()
    expected[:, 0] = 0.0
    assert torch.equal(y.value, expected)
    assert torch.equal(orig.value, clean["transformer.h.0.mlp"])  # the site is untouched


def test_chained_index_assignment_writes_through_the_view(gpt2, model, base):
    """As in torch, x[:, 0][1] = v writes x through the view x[:, 0]."""
    with iv.trace(model, base) as t:
        t.layer[0].mlp.out[:, 0][1] = 5.0
        logits = t.logits.save()
    _, ref = hooked(gpt2, {"input_ids": base}, edit={"transformer.h.0.mlp": set_at((1, 0), 5.0)})
    numerics.assert_close(logits.value, ref.logits, what="logits after out[:, 0][1] = 5")


def test_item_assignment_on_a_saved_value_is_not_a_silent_no_op(model, base):
    with pytest.raises(
        iv.TraceError,
        match=r"line test_tracing\.py:\d+: this assignment changes a copy of a computed value",
    ):
        with iv.trace(model, base) as t:
            saved = t.layer[0].mlp.out.save()
            saved[:, 0] = 0.0


# -- in-place operators on aliases of a site and on computed values ------------------------
def _structure(program: iv.Program) -> list[tuple]:
    """A program's nodes without their file:line."""
    return [(n.op, n.target, n.run, n.args, n.kwargs) for n in program.nodes]


@pytest.mark.parametrize("op", ["+=", "-=", "*=", "/="])
def test_inplace_operator_on_site_alias_writes_the_site(gpt2, model, base, op):
    vec = torch.randn(D) + 2.0
    with iv.trace(model, base) as t:
        x = t.layer[1].resid_post
        x = _inplace(op, x, vec)
        logits = t.logits.save()
    with iv.trace(model) as direct:
        if op == "+=":
            direct.layer[1].resid_post += vec
        elif op == "-=":
            direct.layer[1].resid_post -= vec
        elif op == "*=":
            direct.layer[1].resid_post *= vec
        else:
            direct.layer[1].resid_post /= vec
        direct.logits.save()
    assert _structure(t.program) == _structure(direct.program)
    _, ref = hooked(
        gpt2, {"input_ids": base}, edit={"transformer.h.1": lambda o: _inplace(op, o, vec)}
    )
    numerics.assert_close(logits.value, ref.logits, what=f"logits after x = site; x {op} vec")


def test_alias_add_equals_site_add(model, base, clean):
    """Issue 10: x = site; x += 100.0 used to leave the logits unchanged."""
    with iv.trace(model, base) as t:
        x = t.layer[0].mlp.out
        x += 100.0
        after = x.save()
        logits = t.logits.save()
    with iv.trace(model, base) as direct:
        direct.layer[0].mlp.out += 100.0
        want = direct.logits.save()
    numerics.assert_exact(logits.value, want.value, what="logits: x += 100 vs site += 100")
    assert not torch.allclose(logits.value, clean["logits"])
    numerics.assert_close(
        after.value, clean["transformer.h.0.mlp"] + 100.0, what="x after x += 100", ulps=numerics.OP
    )


@pytest.mark.parametrize("op", ["+=", "-=", "*=", "/="])
def test_inplace_operator_on_slice_alias_writes_the_slice(gpt2, model, base, op):
    with iv.trace(model, base) as t:
        x = t.layer[0].mlp.out[:, -1]
        x = _inplace(op, x, 3.0)
        logits = t.logits.save()

    def edit(o):
        o[:, -1] = _inplace(op, o[:, -1].clone(), 3.0)
        return o

    _, ref = hooked(gpt2, {"input_ids": base}, edit={"transformer.h.0.mlp": edit})
    numerics.assert_close(logits.value, ref.logits, what=f"logits after x = site[:, -1]; x {op} 3")


def test_inplace_operator_on_view_of_view_writes_and_rebinds(gpt2, model, base, clean):
    """x = site[:, 2]; w = x[1]; w += 1 writes site[1, 2]; site, x and w see the write."""
    with iv.trace(model, base) as t:
        site = t.layer[0].mlp.out
        x = site[:, 2]
        w = x[1]
        w += 1.0
        saves = [v.save() for v in (site, x, w)]
        logits = t.logits.save()
    expected = clean["transformer.h.0.mlp"].clone()
    expected[1, 2] += 1.0
    wants = (expected, expected[:, 2], expected[1, 2])
    for saved, want, name in zip(saves, wants, "sxw", strict=True):
        numerics.assert_close(saved.value, want, what=f"{name} after w += 1", ulps=numerics.OP)

    def edit(o):
        o[1, 2] += 1.0
        return o

    _, ref = hooked(gpt2, {"input_ids": base}, edit={"transformer.h.0.mlp": edit})
    numerics.assert_close(logits.value, ref.logits, what="logits after w = site[:, 2][1]; w += 1")


def test_advanced_index_of_a_site_is_a_copy(model, base, clean):
    """As in torch, site[:, [0, 2]] is a copy: += on it rebinds, and unused it raises."""
    with iv.trace(model, base) as t:
        y = t.layer[0].mlp.out[:, [0, 2]]
        y += 1.0
        y = y.save()
        logits = t.logits.save()
    want = clean["transformer.h.0.mlp"][:, [0, 2]] + 1.0
    numerics.assert_close(y.value, want, what="y = site[:, [0, 2]]; y += 1", ulps=numerics.OP)
    numerics.assert_exact(logits.value, clean["logits"], what="logits (the site is untouched)")
    with pytest.raises(iv.TraceError, match=r"this `\+=` changes a copy of a computed value"):
        with iv.trace(model) as t:
            y = t.layer[0].mlp.out[:, [0, 2]]
            y += 1.0


def test_indexed_inplace_operator_records_one_write(model):
    """``site[i] += v`` runs ``y = site[i]; y += v; site[i] = y``: the last step is no write."""
    with iv.trace(model) as t:
        t.layer[0].mlp.out[:, 2] += 1.0
        t.layer[0].mlp.out[:, 2][0] += 1.0
        t.layer[0].mlp.out += 1.0
    assert [n.op for n in t.program.nodes].count("write") == 3


@pytest.mark.parametrize(
    "op", ["+=", "-=", "*=", "/=", "//=", "%=", "**=", "@=", "&=", "|=", "^=", "<<=", ">>="]
)
def test_inplace_operator_on_unused_computed_value_raises(model, op):
    other = "torch.ones(D, D)" if op == "@=" else "1"
    code = f"y = t.layer[0].mlp.out * 2\ny {op} {other}\n"
    message = (
        rf"line inplace\.py:2: this `{re.escape(op)}` changes a copy of a computed "
        "value that nothing uses afterwards, so it would have no effect.*apply the change "
        "to the site"
    )
    with pytest.raises(iv.TraceError, match=message):
        with iv.trace(model) as t:
            exec(compile(code, "inplace.py", "exec"), {"t": t, "torch": torch, "D": D})


def test_inplace_operator_on_computed_value_names_the_line(model):
    with pytest.raises(iv.TraceError) as info:
        with iv.trace(model) as t:
            y = t.layer[0].mlp.out.sum(-1)
            y += 1.0
            line = here() - 1
    assert str(info.value).startswith(f"line test_tracing.py:{line}: this `+=` changes a copy")
    with pytest.raises(iv.TraceError, match=r"this `-=` changes a copy of a computed value"):
        with iv.trace(model) as t:
            saved = t.layer[0].mlp.out.save()
            saved -= 1.0


def test_inplace_operator_on_computed_value_then_used_rebinds(model, base, clean):
    with iv.trace(model, base) as t:
        y = t.layer[0].mlp.out * 2.0
        y += 1.0
        y = y.save()
        logits = t.logits.save()
    want = clean["transformer.h.0.mlp"] * 2.0 + 1.0
    numerics.assert_close(y.value, want, what="y = site * 2; y += 1", ulps=numerics.OP)
    numerics.assert_exact(logits.value, clean["logits"], what="logits (the site is untouched)")


def test_write_of_unsupported_type_raises(model, base):
    with pytest.raises(iv.TraceError, match="cannot write a str to a site"):
        with iv.trace(model, base) as t:
            t.layer[0].mlp.out = "zero"


# -- computation ------------------------------------------------------------------------
W = torch.randn(D, 5, generator=torch.Generator().manual_seed(3))
VEC = torch.randn(D, generator=torch.Generator().manual_seed(4))
LEFT = torch.randn(3, P, generator=torch.Generator().manual_seed(5))

COMPUTATIONS = {
    "add": lambda x: x + 1,
    "radd-number": lambda x: 2.5 + x,
    "radd-tensor": lambda x: VEC + x,
    "sub": lambda x: x - VEC,
    "rsub": lambda x: 1 - x,
    "mul": lambda x: x * VEC,
    "rmul": lambda x: 3 * x,
    "truediv": lambda x: x / 4,
    "rtruediv": lambda x: 2 / (x.abs() + 1),
    "pow": lambda x: x**2,
    "rpow": lambda x: 2**x,
    "neg": lambda x: -x,
    "abs": lambda x: abs(x),
    "matmul": lambda x: x @ W,
    "rmatmul": lambda x: LEFT @ x,
    "value-matmul-value": lambda x: x @ x.transpose(-1, -2),
    "compare-where": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "sum": lambda x: x.sum(-1),
    "sum-all": lambda x: x.sum(),
    "mean": lambda x: x.mean(dim=1, keepdim=True),
    "norm": lambda x: x.norm(dim=-1),
    "reshape": lambda x: x.reshape(B, -1),
    "reshape-shape": lambda x: x.reshape(x.shape[0], -1),
    "transpose": lambda x: x.transpose(0, 1),
    "clone": lambda x: x.clone(),
    "detach": lambda x: x.detach(),
    "softmax": lambda x: x.softmax(-1),
    "torch.cat": lambda x: torch.cat([x, x * 2], dim=0),
    "torch.stack": lambda x: torch.stack([x, -x], dim=1),
    "torch.where": lambda x: torch.where(x > 0, x, 0.0),
    "F.softmax": lambda x: torch.nn.functional.softmax(x, dim=-1),
    "torch.einsum": lambda x: torch.einsum("bpd,de->bpe", x, W),
    "chain": lambda x: ((x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True))[:, -1] @ W,
}


@pytest.mark.parametrize("name", list(COMPUTATIONS))
def test_computation_matches_plain_tensor_code(model, base, clean, name):
    fn = COMPUTATIONS[name]
    with iv.trace(model, base) as t:
        y = fn(t.layer[1].resid_post).save()
    expected = fn(clean["transformer.h.1"])
    assert y.value.shape == expected.shape
    numerics.assert_close(y.value, expected, what=f"{name} on a traced value", ulps=numerics.OP)


def test_values_from_two_runs_combine(gpt2, model, base, source):
    with iv.trace(model, base) as t:
        src = t.source(source)
        diff = (src.layer[2].resid_post - t.layer[2].resid_post).save("diff")
    got_s, _ = hooked(gpt2, {"input_ids": source}, read=["transformer.h.2"])
    got_b, _ = hooked(gpt2, {"input_ids": base}, read=["transformer.h.2"])
    assert torch.equal(diff.value, got_s["transformer.h.2"] - got_b["transformer.h.2"])


# -- module calls --------------------------------------------------------------------------
class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.inner = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, D))

    def forward(self, x, scale=1.0):
        self.calls += 1
        return self.inner(x) * scale


def test_module_call_records_one_node(model, base, clean):
    module = Counting()
    with iv.trace(model, base) as t:
        y = module(t.layer[1].resid_post, scale=0.5).save("y")
        assert module.calls == 0  # recording does not run it
    assert module.calls == 1
    listing = str(t.program)
    calls = [line for line in listing.splitlines() if "[Counting]" in line]
    assert len(calls) == 1 and "scale=0.5" in calls[0]
    assert "Linear" not in listing and "ReLU" not in listing
    assert sum(n.op == "call_module" for n in t.program.nodes) == 1
    with torch.no_grad():
        expected = module(clean["transformer.h.1"], scale=0.5)
    torch.testing.assert_close(y.value, expected, rtol=0, atol=0)


def test_module_runs_with_its_weights_at_run_time(model, base, clean):
    lin = nn.Linear(D, D)
    with iv.trace(model) as t:
        t.layer[1].resid_post[:, -1].save("before")
        lin(t.layer[1].resid_post[:, -1]).save("y")
    with torch.no_grad():
        lin.weight.copy_(torch.eye(D) * 2)
        lin.bias.fill_(1.0)
    result = t.program.run(model, base)
    expected = clean["transformer.h.1"][:, -1] * 2 + 1
    numerics.assert_close(result["y"], expected, what="module called at run time", ulps=numerics.OP)


def test_module_output_written_back(gpt2, model, base):
    lin = nn.Linear(D, D)
    with iv.trace(model, base) as t:
        t.layer[1].resid_post = lin(t.layer[1].resid_post)
        logits = t.logits.save()
    with torch.no_grad():
        _, ref = hooked(gpt2, {"input_ids": base}, edit={"transformer.h.1": lin})
    numerics.assert_close(logits.value, ref.logits, what="logits after a module write vs hooks")


def test_module_called_on_plain_tensors_inside_block_runs_normally(model, base):
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with iv.trace(model, base) as t:
        y = lin(x)  # no traced value among the arguments: an ordinary call
        t.layer[0].mlp.out.save()
    assert isinstance(y, torch.Tensor) and y.shape == (4, 2)
    assert all(n.op != "call_module" for n in t.program.nodes)


# -- saves, results, output --------------------------------------------------------------------
def test_named_saves_in_result(model, base, clean):
    with iv.trace(model) as t:
        t.layer[0].mlp.out.save("mlp0")
        t.layer[2].resid_post[:, -1].save("last")
        unnamed = t.layer[1].resid_post.save()
    result = t.program.run(model, base)
    assert set(result.saves) == {"mlp0", "last"}
    assert torch.equal(result["mlp0"], clean["transformer.h.0.mlp"])
    assert torch.equal(result["last"], clean["transformer.h.2"][:, -1])
    assert t.program.saves == ["mlp0", "last"]
    with pytest.raises(KeyError, match="no save named 'nope'; named saves: mlp0, last"):
        result["nope"]
    assert torch.equal(result[unnamed], clean["transformer.h.1"])  # the handle's program


def test_duplicate_save_name_raises(model):
    with pytest.raises(iv.TraceError, match="save name 'x' is already used"):
        with iv.trace(model) as t:
            t.layer[0].mlp.out.save("x")
            t.layer[1].mlp.out.save("x")


def test_value_before_run_raises(model, base):
    with iv.trace(model) as t:
        x = t.layer[0].mlp.out.save("x")
    with pytest.raises(iv.NotRunError, match="has no value yet.*t.program.run"):
        x.value
    with iv.trace(model, base) as t:
        y = t.layer[0].mlp.out.save()
        with pytest.raises(iv.NotRunError, match="has no value yet"):
            y.value
    assert y.value.shape == (B, P, D)


def test_output_is_the_base_model_output(gpt2, model, base, clean):
    with iv.trace(model, base) as t:
        t.layer[0].mlp.out.save()
    assert torch.equal(t.output.logits, clean["logits"])
    with iv.trace(model) as t2:
        t2.layer[0].mlp.out.save()
    with pytest.raises(iv.NotRunError, match="t.output exists after a with-block that was given"):
        t2.output


def test_program_before_block_end_raises(model):
    with iv.trace(model) as t:
        with pytest.raises(iv.TraceError, match="available after the with-block"):
            t.program


# -- printing ---------------------------------------------------------------------------------
def test_program_listing_one_line_per_node_with_location(model):
    lin = nn.Linear(D, D)
    with iv.trace(model) as t:
        src = t.source()
        line1 = here() + 1
        t.layer[1].mlp.out[:, 4] = src.layer[1].mlp.out[:, 4]
        line2 = here() + 1
        lin(t.layer[-1].resid_post).save("y")
    program = t.program
    lines = str(program).splitlines()
    assert lines[0] == "Program (1 source; args: none)"
    assert len(lines) == len(program.nodes) + 1
    for node, line in zip(program.nodes, lines[1:], strict=True):
        assert line.lstrip().startswith(f"%{node.id} = ")
        expected = line1 if node.op in ("read", "getitem", "write") and node.id < 3 else line2
        assert line.endswith(f"# test_tracing.py:{expected}"), line
    text = str(program)
    assert "read src1.layer[1].mlp.out" in text
    assert "write base.layer[1].mlp.out[:, 4] = %1" in text
    assert "read base.layer[2].resid_post" in text  # layer[-1] resolved
    assert "m0[Linear](%" in text
    assert "as 'y'" in text


# -- placeholders --------------------------------------------------------------------------------
def test_placeholder_errors(model, base):
    with iv.trace(model) as t:
        t.layer[0].mlp.out[:, t.arg("pos")].save("x")
    assert t.program.args == ["pos"]
    with pytest.raises(
        ValueError, match=r"program needs \['pos'\]; missing \['pos'\], unexpected \[\]"
    ):
        t.program.run(model, base)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['foo'\]"):
        t.program.run(model, base, pos=1, foo=2)
    assert t.program.run(model, base, pos=1)["x"].shape == (B, D)


def test_placeholder_defined_twice_raises(model):
    with pytest.raises(iv.TraceError, match="placeholder 'pos' is already defined"):
        with iv.trace(model) as t:
            t.arg("pos")
            t.arg("pos")


def test_wrong_number_of_sources_raises(model, base):
    with iv.trace(model) as t:
        t.source().layer[0].mlp.out.save()
    with pytest.raises(ValueError, match=r"1 source run\(s\) but got 0 source input\(s\)"):
        t.program.run(model, base)


def test_source_without_inputs_in_a_running_block_raises(model, base):
    with pytest.raises(iv.TraceError, match=r"source\(s\) \[1\] have no inputs"):
        with iv.trace(model, base) as t:
            t.source().layer[0].mlp.out.save()


# -- Python control flow -------------------------------------------------------------------------
def _if(x):
    if x:
        pass


def _while(x):
    while x:
        break


def _and(x):
    return x and 1


def _iterate(x):
    for _ in x:
        pass


def _unpack(x):
    a, b = x
    return a, b


CONTROL_FLOW = {
    "if": (_if, r"cannot branch on \(if / while / and / or\).*torch\.where\(cond, a, b\)"),
    "while": (_while, r"cannot branch on.*torch\.where"),
    "and": (_and, r"cannot branch on.*torch\.where"),
    "bool": (bool, r"cannot branch on.*\.save\(\) it and read saved\.value"),
    "len": (len, r"cannot take len\(\) of it.*Use x\.size\(dim\)"),
    "iter": (_iterate, r"cannot iterate over it.*for p in range\(n\)"),
    "unpack": (_unpack, r"cannot iterate over it"),
    "int": (int, r"cannot take int\(\), float\(\), range\(\) or a list index of it.*saved\.value"),
    "float": (float, r"cannot take int\(\), float\(\).*saved\.value"),
    "range": (range, r"cannot take int\(\), float\(\), range\(\)"),
    "list-index": (lambda x: [1, 2][x], r"or a list index of it"),
    "in": (lambda x: 1 in x, r"cannot test membership in it"),
}


@pytest.mark.parametrize("name", list(CONTROL_FLOW))
def test_python_control_flow_raises_trace_error(model, base, name):
    fn, message = CONTROL_FLOW[name]
    with pytest.raises(iv.TraceError, match=message):
        with iv.trace(model, base) as t:
            fn(t.layer[0].mlp.out.sum())


@pytest.mark.parametrize("method", ["add_", "mul_", "zero_", "copy_"])
def test_inplace_tensor_method_rejected(model, method):
    out_of_place = method[:-1]
    with pytest.raises(iv.TraceError, match=f"in-place tensor method '{method}'.*'{out_of_place}'"):
        with iv.trace(model) as t:
            getattr(t.layer[0].mlp.out, method)


INPLACE_FUNCTIONS = {
    "relu_": (
        torch.relu_,
        {},
        r"'torch.nn.functional.relu_'.*out-of-place torch.nn.functional.relu",
    ),
    "inplace=True": (
        torch.nn.functional.relu,
        {"inplace": True},
        r"'torch.nn.functional.relu'.*drop inplace=True",
    ),
    "out=": (torch.neg, {"out": torch.empty(B, P, D)}, r"'torch.neg'.*drop out="),
}


@pytest.mark.parametrize("name", list(INPLACE_FUNCTIONS))
def test_inplace_torch_function_rejected(gpt2, model, base, clean, name):
    fn, kwargs, message = INPLACE_FUNCTIONS[name]
    with pytest.raises(iv.TraceError, match=f"in-place function {message}"):
        with iv.trace(model, base) as t:
            fn(t.layer[0].mlp.out, **kwargs)
    # Nothing ran, and the model is untouched.
    assert torch.equal(gpt2(base).logits, clean["logits"])


def test_tensor_inplace_operator_with_traced_right_side_rejected(model):
    v = torch.zeros(B, P, D)
    with pytest.raises(iv.TraceError, match="in-place tensor method 'add_'"):
        with iv.trace(model) as t:
            v += t.layer[0].mlp.out


def test_unknown_tensor_method_rejected(model):
    with pytest.raises(iv.TraceError, match="'frobnicate' is not a tensor method"):
        with iv.trace(model) as t:
            t.layer[0].mlp.out.frobnicate()


def test_dtype_of_traced_value_raises(model):
    with pytest.raises(iv.TraceError, match="'dtype' of a traced value is not known"):
        with iv.trace(model) as t:
            t.layer[0].mlp.out.dtype


def test_traced_values_after_block_raise(model, base):
    with iv.trace(model, base) as t:
        x = t.layer[0].mlp.out
        s = x.save()
    ended = "this with-block has ended; traced values cannot be used after it"
    with pytest.raises(iv.TraceError, match=ended):
        x + 1
    with pytest.raises(iv.TraceError, match=ended):
        s.sum()
    with pytest.raises(iv.TraceError, match=ended):
        x.save()
    with pytest.raises(iv.TraceError, match=ended):
        t.layer[1].mlp.out
    with pytest.raises(iv.TraceError, match=ended):
        t.layer[1].mlp.out = 0.0
    assert s.value.shape == (B, P, D)  # saved values stay readable


def test_value_from_another_block_raises(model):
    with iv.trace(model) as outer:
        x = outer.layer[0].mlp.out
        with pytest.raises(iv.TraceError, match="from another with-block"):
            with iv.trace(model) as inner:
                inner.layer[0].mlp.out = x


# -- layers ------------------------------------------------------------------------------------
def test_loop_over_layers_unrolls(model, base, clean):
    saved = []
    with iv.trace(model, base) as t:
        for layer in range(model.n_layers):
            saved.append(t.layer[layer].resid_post[:, -1].save(f"L{layer}"))
    reads = [n.target for n in t.program.nodes if n.op == "read"]
    assert reads == [f"layer.{i}.resid_post" for i in range(3)]
    for i, s in enumerate(saved):
        assert torch.equal(s.value, clean[f"transformer.h.{i}"][:, -1])


def test_iterating_over_layers_unrolls(model, base, clean):
    with iv.trace(model, base) as t:
        outs = [layer.mlp.out.save() for layer in t.layer]
    assert len(outs) == 3
    for i, s in enumerate(outs):
        assert torch.equal(s.value, clean[f"transformer.h.{i}.mlp"])


def test_negative_layer_index(model, base, clean):
    with iv.trace(model, base) as t:
        last = t.layer[-1].resid_post.save()
        second = t.layer[-2].mlp.out.save()
    assert torch.equal(last.value, clean["transformer.h.2"])
    assert torch.equal(second.value, clean["transformer.h.1.mlp"])
    assert "base.layer[2].resid_post" in str(t.program)
    with pytest.raises(iv.SiteError, match="out of range: this model has layers 0..2"):
        with iv.trace(model) as t:
            t.layer[-4].resid_post


def test_non_int_layer_index_raises(model):
    with pytest.raises(iv.SiteError, match=r"index layers with a plain int"):
        with iv.trace(model) as t:
            t.layer[0:2]


# -- text inputs --------------------------------------------------------------------------------
def test_text_inputs_are_tokenized():
    tok = models.minilm_tokenizer()
    bert = models.minilm()
    model = iv.wrap(bert, backend="torch", tokenizer=tok)
    texts = ["Mary gave John a book", "Tom met Alice at the station today"]
    with iv.trace(model, texts) as t:
        x = t.layer[2].resid_post.save()
        t.layer[3].mlp.out[:, 0] = 0.0
        out = t.layer[-1].resid_post.save()
    enc = dict(tok(texts, return_tensors="pt", padding=True))
    assert x.value.shape[:2] == enc["input_ids"].shape
    mods = dict(bert.named_modules())
    captured = {}
    h1 = mods["encoder.layer.2"].register_forward_hook(
        lambda m, a, o: captured.__setitem__("x", o.clone())
    )
    h2 = mods["encoder.layer.3.output.dense"].register_forward_hook(
        lambda m, a, o: set_at((slice(None), 0), 0.0)(o.clone())
    )
    try:
        with torch.no_grad():
            ref = bert(**enc).last_hidden_state
    finally:
        h1.remove()
        h2.remove()
    assert torch.equal(x.value, captured["x"])
    torch.testing.assert_close(out.value, ref, rtol=0, atol=0)
    torch.testing.assert_close(t.output.last_hidden_state, ref, rtol=0, atol=0)


# -- the model's own in-place operations -------------------------------------------------------
class AddOneInPlace(nn.Module):
    def forward(self, x):
        return x.add_(1.0)


def inplace_model():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), AddOneInPlace(), nn.ReLU(inplace=True)).eval()
    return module, iv.wrap(module, backend="torch")


def test_read_keeps_its_value_when_the_model_later_modifies_in_place():
    module, model = inplace_model()
    x = torch.randn(2, 3)
    with iv.trace(model, x) as t:
        before = t.module("0").output.save()
        after = t.module("1").output.save()
    with torch.no_grad():
        expected = module[0](x)
    assert torch.equal(before.value, expected)
    assert torch.equal(after.value, expected + 1)


@pytest.mark.parametrize("shape", [(2, 4), (4,), ()], ids=["same-shape", "broadcast", "scalar"])
def test_whole_site_write_survives_in_place_ops_downstream(shape):
    module, model = inplace_model()
    x = torch.randn(2, 3)
    value = torch.full(shape, -0.5)
    with iv.trace(model) as t:
        t.module("0").output = value
        t.module("2").output.save("out")
    first = t.program.run(model, x)["out"].clone()
    second = t.program.run(model, x)["out"]
    assert torch.equal(value, torch.full(shape, -0.5))  # the caller's tensor is untouched
    assert torch.equal(first, torch.full((2, 4), 0.5))
    assert torch.equal(second, first)


def test_write_value_with_extra_leading_singleton_dims_like_torch(gpt2, model, base):
    value = torch.arange(32.0).reshape(1, 1, 32)
    with iv.trace(model, base) as t:
        t.layer[0].mlp.out[0, 2] = value
        out = t.logits.save()

    def edit(m, i, o):
        o = o.clone()
        o[0, 2] = value  # torch drops the leading singleton dims
        return o

    h = gpt2.transformer.h[0].mlp.register_forward_hook(edit)
    try:
        expected = gpt2(base).logits
    finally:
        h.remove()
    torch.testing.assert_close(out.value, expected, rtol=0, atol=0)


def test_unnamed_save_handle_indexes_a_result_of_its_own_program(model, base, source):
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].resid_pre[:, 2] = src.layer[1].resid_pre[:, 2]
        logits = t.logits.save()
    result = t.program.run(model, base, [source])
    assert torch.equal(result[logits], result.output.logits)
    with iv.trace(model) as other:
        other.logits.save()
    with pytest.raises(iv.TraceError, match="belongs to another program"):
        other.program.run(model, base)[logits]


def test_logit_lens_calls_model_modules_that_also_hold_sites(gpt2, model, base):
    with iv.trace(model, base) as t:
        h = t.layer[1].resid_post
        lens = gpt2.lm_head(gpt2.transformer.ln_f(h)).save()
        logits = t.logits.save()
    hidden = {}
    hook = gpt2.transformer.h[1].register_forward_hook(lambda m, i, o: hidden.update(h=o))
    try:
        expected_logits = gpt2(base).logits
    finally:
        hook.remove()
    expected_lens = gpt2.lm_head(gpt2.transformer.ln_f(hidden["h"]))
    torch.testing.assert_close(lens.value, expected_lens, rtol=0, atol=0)
    torch.testing.assert_close(logits.value, expected_logits, rtol=0, atol=0)

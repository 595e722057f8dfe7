"""Scheduling programs onto forward passes: batched vs sequential, dependencies between
runs in any layer order, impossible programs, unused sources and early stops.

Numbers are checked against hand-made computations with plain forward hooks.
"""

from __future__ import annotations

import numerics
import pytest
import torch
from torch import nn

import models
import tracevene as iv

B, P, D = 2, 6, 32


def close(a, b, what="program result vs the plain-hook reference"):
    numerics.assert_close(a, b, what=what)


def forward(module: nn.Module, ids: torch.Tensor, read=(), edit=None):
    """One plain forward with hooks; returns ``(captured outputs by path, logits)``."""
    mods = dict(module.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [
        mods[path].register_forward_hook(lambda m, a, o, fn=fn: fn(o.clone()))
        for path, fn in (edit or {}).items()
    ]
    handles += [
        mods[path].register_forward_hook(
            lambda m, a, o, path=path: captured.__setitem__(path, o.detach().clone())
        )
        for path in read
    ]
    try:
        with torch.no_grad():
            out = module(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured, out.logits


def set_at(index, value):
    def fn(out):
        out[index] = value
        return out

    return fn


def h(i: int) -> str:
    return f"transformer.h.{i}"


@pytest.fixture(scope="module")
def gpt2():
    return models.gpt2()


@pytest.fixture(scope="module")
def model(gpt2):
    return iv.wrap(gpt2, backend="torch")


@pytest.fixture(scope="module")
def ids():
    return [models.tokens(B, P, seed=s) for s in (1, 2, 3)]


def record(model, fn):
    with iv.trace(model) as t:
        fn(t)
    return t.program


def runs_of(result) -> list[list[int]]:
    return [p.runs for p in result.plan.passes]


# -- batched and sequential give the same numbers ------------------------------------------
def _rich_program(t):
    src = t.source()
    t.layer[1].mlp.out[:, 4] = src.layer[1].mlp.out[:, 4]
    t.layer[2].resid_post[:, -1] += 0.5 * src.layer[0].resid_post[:, -1]
    (src.layer[2].resid_post - t.layer[2].resid_post).norm(dim=-1).save("diff")
    src.logits.save("src_logits")
    t.logits.save("logits")


def test_batched_and_sequential_agree(gpt2, model, ids):
    program = record(model, _rich_program)
    seq = program.run(model, ids[0], [ids[1]], schedule="sequential")
    bat = program.run(model, ids[0], [ids[1]], schedule="batched")
    for name in ("diff", "src_logits", "logits"):
        close(seq[name], bat[name], what=f"{name}: sequential vs batched schedule")
    close(seq.output.logits, bat.output.logits, what="logits: sequential vs batched schedule")
    assert bat.output.logits.shape == (B, P, models.VOCAB)  # the base's rows only
    assert (seq.plan.mode, bat.plan.mode) == ("sequential", "batched")
    assert bat.plan.describe().splitlines() == ["pass 1: base+src1 (batched, 4 hook points)"]
    described = seq.plan.describe().splitlines()
    assert [line.split(" (")[0] for line in described] == ["pass 1: src1", "pass 2: base"]
    # ... and both equal a hand-made computation.
    got, src_logits = forward(gpt2, ids[1], read=[h(0), h(1) + ".mlp", h(2)])

    def last(o):
        o[:, -1] += 0.5 * got[h(0)][:, -1]
        return o

    edit = {h(1) + ".mlp": set_at((slice(None), 4), got[h(1) + ".mlp"][:, 4]), h(2): last}
    base, logits = forward(gpt2, ids[0], read=[h(2)], edit=edit)
    close(seq["logits"], logits)
    close(seq["src_logits"], src_logits)
    # the read of base.layer[2].resid_post follows the write in program order
    close(seq["diff"], (got[h(2)] - base[h(2)]).norm(dim=-1))


def test_auto_is_sequential_on_cpu(model, ids):
    program = record(model, _rich_program)
    assert program.run(model, ids[0], [ids[1]]).plan.mode == "sequential"


def test_unknown_schedule_raises(model, ids):
    program = record(model, _rich_program)
    with pytest.raises(ValueError, match="schedule='fast': choose 'auto', 'batched'"):
        program.run(model, ids[0], [ids[1]], schedule="fast")


# -- dependencies between runs in any layer order ---------------------------------------------
@pytest.mark.parametrize("schedule", ["sequential", "batched"])
@pytest.mark.parametrize("read_layer", [0, 1, 2])
@pytest.mark.parametrize("write_layer", [0, 1, 2])
def test_base_written_from_source_any_layer_order(
    gpt2, model, ids, schedule, read_layer, write_layer
):
    def program(t):
        src = t.source()
        t.layer[write_layer].resid_post[:, 2:] = src.layer[read_layer].resid_post[:, 2:]
        t.logits.save("logits")

    result = record(model, program).run(model, ids[0], [ids[1]], schedule=schedule)
    got, _ = forward(gpt2, ids[1], read=[h(read_layer)])
    edit = {h(write_layer): set_at((slice(None), slice(2, None)), got[h(read_layer)][:, 2:])}
    _, expected = forward(gpt2, ids[0], edit=edit)
    close(result["logits"], expected)
    if schedule == "batched" and read_layer <= write_layer:
        assert runs_of(result) == [[0, 1]]
    else:  # the source must be ahead of the base: it runs first
        assert runs_of(result) == [[1], [0]]


@pytest.mark.parametrize("schedule", ["sequential", "batched"])
def test_source_written_from_later_base_site(gpt2, model, ids, schedule):
    def program(t):
        src = t.source()
        src.layer[0].resid_post = t.layer[2].resid_post
        src.layer[1].resid_post.save("src1")
        t.logits.save("logits")

    result = record(model, program).run(model, ids[0], [ids[1]], schedule=schedule)
    assert runs_of(result) == [[0], [1]]  # the base runs first this time
    got, logits = forward(gpt2, ids[0], read=[h(2)])
    src, _ = forward(gpt2, ids[1], read=[h(1)], edit={h(0): lambda o: got[h(2)]})
    close(result["src1"], src[h(1)])
    close(result["logits"], logits)
    close(result.output.logits, logits)


@pytest.mark.parametrize("schedule", ["sequential", "batched"])
def test_write_into_source_feeding_base(gpt2, model, ids, schedule):
    def program(t):
        src = t.source()
        src.layer[0].mlp.out[:, 1] = 0.0
        t.layer[2].resid_post[:, -1] = src.layer[2].resid_post[:, -1]
        t.logits.save("logits")

    result = record(model, program).run(model, ids[0], [ids[1]], schedule=schedule)
    got, _ = forward(gpt2, ids[1], read=[h(2)], edit={h(0) + ".mlp": set_at((slice(None), 1), 0.0)})
    _, expected = forward(gpt2, ids[0], edit={h(2): set_at((slice(None), -1), got[h(2)][:, -1])})
    close(result["logits"], expected)


@pytest.mark.parametrize("schedule", ["sequential", "batched"])
@pytest.mark.parametrize("strict", [False, True], ids=["same-layers", "later-layers"])
def test_three_runs_chained(gpt2, model, ids, schedule, strict):
    """src2 -> src1 -> base."""
    l2, l1 = (2, 0) if strict else (1, 1)  # src2's layer l2 feeds src1's layer l1

    def program(t):
        src1, src2 = t.source(), t.source()
        src1.layer[l1].mlp.out[:, 2] = src2.layer[l2].mlp.out[:, 2]
        t.layer[1].resid_post[:, -1] = src1.layer[2].resid_post[:, -1]
        t.logits.save("logits")

    result = record(model, program).run(model, ids[0], [ids[1], ids[2]], schedule=schedule)
    got2, _ = forward(gpt2, ids[2], read=[h(l2) + ".mlp"])
    patch2 = got2[h(l2) + ".mlp"][:, 2]
    got1, _ = forward(
        gpt2, ids[1], read=[h(2)], edit={h(l1) + ".mlp": set_at((slice(None), 2), patch2)}
    )
    _, expected = forward(gpt2, ids[0], edit={h(1): set_at((slice(None), -1), got1[h(2)][:, -1])})
    close(result["logits"], expected)
    if schedule == "sequential" or strict:
        assert runs_of(result) == [[2], [1], [0]]
    else:
        # src1 -> base is strict (layer 2 feeds layer 1), src2 -> src1 is not
        assert runs_of(result) == [[1, 2], [0]]


@pytest.mark.parametrize("schedule", ["sequential", "batched"])
def test_runs_feeding_each_other_share_one_pass(gpt2, model, ids, schedule):
    def program(t):
        src = t.source()
        src.layer[1].mlp.out[:, 0] = t.layer[0].mlp.out[:, 0]
        t.layer[1].mlp.out[:, 0] = src.layer[0].mlp.out[:, 0]
        t.logits.save("logits")
        src.logits.save("src_logits")

    result = record(model, program).run(model, ids[0], [ids[1]], schedule=schedule)
    assert runs_of(result) == [[0, 1]]  # required even when sequential was asked for
    # Hand-made: one forward over both inputs, swapping rows at the first position.
    both = torch.cat([ids[0], ids[1]])
    got, _ = forward(gpt2, both, read=[h(0) + ".mlp"])
    swapped = got[h(0) + ".mlp"][:, 0].roll(B, dims=0)
    _, logits = forward(gpt2, both, edit={h(1) + ".mlp": set_at((slice(None), 0), swapped)})
    close(result["logits"], logits[:B])
    close(result["src_logits"], logits[B:])


# -- impossible programs ----------------------------------------------------------------------
def test_own_later_site_raises(model):
    with iv.trace(model) as t:
        t.layer[0].resid_post = t.layer[2].resid_post
    message = (
        r"base\.layer\[0\]\.resid_post \(line test_schedule\.py:\d+\) is written from "
        r"base\.layer\[2\]\.resid_post \(line test_schedule\.py:\d+\), a later site of its own run"
    )
    with pytest.raises(iv.ScheduleError, match=message):
        t.program.run(model, models.tokens(B, P))


def test_own_later_site_through_computation_raises(model, ids):
    lin = nn.Linear(D, D)
    with iv.trace(model) as t:
        src = t.source()
        src.layer[1].mlp.out = lin(src.layer[2].attn.out.mean(dim=1, keepdim=True)) * 0.0
    with pytest.raises(
        iv.ScheduleError,
        match=r"src1\.layer\[1\]\.mlp\.out .* is written from src1\.layer\[2\]\.attn\.out",
    ):
        t.program.run(model, ids[0], [ids[1]])


def test_own_later_site_raises_in_running_block(model, ids):
    with pytest.raises(iv.ScheduleError, match=r"base\.layer\[1\]\.mlp\.out.*base\.logits"):
        with iv.trace(model, ids[0]) as t:
            t.layer[1].mlp.out[:, 0] = t.logits[:, 0, :D]


def test_own_same_site_is_fine(gpt2, model, ids):
    with iv.trace(model, ids[0]) as t:
        t.layer[1].mlp.out = t.layer[1].mlp.out * 2
        logits = t.logits.save()
    _, expected = forward(gpt2, ids[0], edit={h(1) + ".mlp": lambda o: o * 2})
    close(logits.value, expected)


@pytest.mark.parametrize("schedule", ["sequential", "batched"])
def test_runs_needing_each_others_later_sites_raise(model, ids, schedule):
    with iv.trace(model) as t:
        src = t.source()
        src.layer[0].mlp.out = t.layer[2].mlp.out
        t.layer[0].mlp.out = src.layer[2].mlp.out
    message = (
        r"runs base and src1 each need a later site of the other: src1\.layer\[0\]\.mlp\.out "
        r"\(line test_schedule\.py:\d+\) is written from base\.layer\[2\]\.mlp\.out"
    )
    with pytest.raises(iv.ScheduleError, match=message):
        t.program.run(model, ids[0], [ids[1]], schedule=schedule)


def test_cycle_through_a_third_run_raises(model, ids):
    with iv.trace(model) as t:
        a, b = t.source(), t.source()
        a.layer[0].resid_post = t.layer[2].resid_post
        b.layer[1].resid_post = a.layer[1].resid_post
        t.layer[1].resid_post = b.layer[1].resid_post
    with pytest.raises(iv.ScheduleError, match="each need a later site of the other"):
        t.program.run(model, ids[0], ids[1:])


# -- unused sources and early stops -------------------------------------------------------------
def test_unused_source_does_not_run(gpt2, model, ids):
    calls = []
    handle = gpt2.transformer.h[0].register_forward_pre_hook(
        lambda m, a: calls.append(a[0].shape[0])
    )
    try:
        with iv.trace(model) as t:
            t.source()  # never used
            src2 = t.source()
            t.layer[1].mlp.out = src2.layer[0].mlp.out
            t.logits.save("logits")
        seq = t.program.run(model, ids[0], ids[1:], schedule="sequential")
        assert runs_of(seq) == [[2], [0]]
        assert "src1" not in seq.plan.describe()
        assert calls == [B, B]
        calls.clear()
        bat = t.program.run(model, ids[0], ids[1:], schedule="batched")
        assert runs_of(bat) == [[0, 2]]
        assert calls == [2 * B]  # one pass, base and src2 only
    finally:
        handle.remove()
    got, _ = forward(gpt2, ids[2], read=[h(0) + ".mlp"])
    _, expected = forward(gpt2, ids[0], edit={h(1) + ".mlp": lambda o: got[h(0) + ".mlp"]})
    close(seq["logits"], expected)
    close(bat["logits"], expected)


@pytest.mark.parametrize("last_read", [0, 1])
def test_source_pass_stops_after_its_last_read(gpt2, model, ids, last_read):
    counts = {i: 0 for i in range(3)}
    counts["ln_f"] = 0
    handles = [
        gpt2.transformer.h[i].register_forward_pre_hook(
            lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1)
        )
        for i in range(3)
    ]
    handles.append(
        gpt2.transformer.ln_f.register_forward_pre_hook(
            lambda m, a: counts.__setitem__("ln_f", counts["ln_f"] + 1)
        )
    )
    try:
        with iv.trace(model, ids[0], schedule="sequential") as t:
            src = t.source(ids[1])
            t.layer[2].mlp.out[:, 3] = src.layer[last_read].mlp.out[:, 3]
            logits = t.logits.save()
    finally:
        for handle in handles:
            handle.remove()
    # The base pass reaches every layer; the source pass only up to its last read.
    for i in range(3):
        assert counts[i] == (2 if i <= last_read else 1), counts
    assert counts["ln_f"] == 1
    got, _ = forward(gpt2, ids[1], read=[h(last_read) + ".mlp"])
    patch = got[h(last_read) + ".mlp"][:, 3]
    _, expected = forward(gpt2, ids[0], edit={h(2) + ".mlp": set_at((slice(None), 3), patch)})
    close(logits.value, expected)


# -- inputs that cannot be batched ---------------------------------------------------------------
def test_different_lengths_run_sequentially_when_allowed(gpt2, model, ids):
    short = models.tokens(B, P - 2, seed=7)
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].mlp.out[:, 0] = src.layer[1].mlp.out[:, -1]
        src.layer[2].resid_post.save("src")
        t.logits.save("logits")
    result = t.program.run(model, ids[0], [short], schedule="batched")
    assert result.plan.mode == "sequential"
    assert runs_of(result) == [[1], [0]]
    got, _ = forward(gpt2, short, read=[h(1) + ".mlp", h(2)])
    patch = got[h(1) + ".mlp"][:, -1]
    _, expected = forward(gpt2, ids[0], edit={h(1) + ".mlp": set_at((slice(None), 0), patch)})
    close(result["logits"], expected)
    close(result["src"], got[h(2)])
    assert result["src"].shape == (B, P - 2, D)


def test_different_batch_sizes_still_batch(gpt2, model, ids):
    one = ids[1][:1]
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].mlp.out[:, 4] = src.layer[1].mlp.out[:, 4]  # [1, D] broadcasts to [B, D]
        t.logits.save("logits")
    result = t.program.run(model, ids[0], [one], schedule="batched")
    assert runs_of(result) == [[0, 1]]
    got, _ = forward(gpt2, one, read=[h(1) + ".mlp"])
    patch = got[h(1) + ".mlp"][:, 4]
    _, expected = forward(gpt2, ids[0], edit={h(1) + ".mlp": set_at((slice(None), 4), patch)})
    close(result["logits"], expected)
    assert result.output.logits.shape == (B, P, models.VOCAB)


@pytest.mark.parametrize("schedule", ["sequential", "batched", "auto"])
def test_required_batching_with_unbatchable_inputs_raises(model, ids, schedule):
    short = models.tokens(B, P - 1, seed=7)
    with iv.trace(model) as t:
        src = t.source()
        src.layer[1].mlp.out[:, 0] = t.layer[0].mlp.out[:, 0]
        t.layer[1].mlp.out[:, 0] = src.layer[0].mlp.out[:, 0]
    message = (
        "runs that feed each other at the same layer must share one forward pass, but their "
        "inputs cannot be batched"
    )
    with pytest.raises(iv.ScheduleError, match=message):
        t.program.run(model, ids[0], [short], schedule=schedule)


def test_module_sites_never_batch():
    mlp = models.mlp()
    model = iv.wrap(mlp, backend="torch")
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    with iv.trace(model) as t:
        src = t.source()
        t.module("2").output[:, :4] = src.module("2").output[:, :4]
        t.module("4").output.save("out")
    result = t.program.run(model, x, [y], schedule="batched")
    assert runs_of(result) == [[1], [0]]
    with torch.no_grad():
        hs = mlp[:3](y)
        hb = mlp[:3](x)
        hb[:, :4] = hs[:, :4]
        expected = mlp[3:](hb)
    close(result["out"], expected)


class Swallowing(torch.nn.Module):
    """A model whose forward catches every Exception raised by its layers."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
        self.calls = [0, 0, 0]

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            self.calls[i] += 1
            try:
                x = layer(x)
            except Exception:  # noqa: BLE001 - the point of this model
                x = x * 0
        return x


def test_early_stop_is_not_swallowed_by_a_models_except_exception():
    torch.manual_seed(0)
    net = Swallowing().eval()
    base, source = torch.randn(2, 3, 4)
    with iv.trace(iv.wrap(net), base, schedule="sequential") as t:
        src = t.source(source)
        t.module("layers.1").output = src.module("layers.0").output
        out = t.module("layers.2").output.save()
    # the source pass stopped inside layers.0: layers 1 and 2 ran for the base only
    assert net.calls == [2, 1, 1]
    expected = net.layers[2](net.layers[0](source))
    torch.testing.assert_close(out.value, expected, rtol=0, atol=0)

"""The nnsight backend: the same numbers as the reference torch backend, and a clean
caller's model whatever happens.

Every program is recorded once and run on both backends, with both schedules; every
save and the base run's output must agree within float32 rounding of a forward pass
(tests/numerics.py, ``MODEL`` ulps of each value's magnitude; in practice they are equal).
"""

from __future__ import annotations

import copy
import functools
import importlib
import sys

import numerics
import pytest
import torch
import torch.nn.modules.module as torch_module
from nnsight.intervention.source import STATE
from torch import nn

import models
import tracevene as iv
from models import Rotate, available, full_name, site
from tracevene.runtime import attention

B, P = 2, 6
ARCHS = ["gpt2", "llama", "neox", "minilm", "qwen3", "gemma2", "olmo2", "gemma3",
         "gptj"]
SCHEDULES = ["sequential", "batched"]
KINDS = [
    "embed", "resid_pre", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z",
    "attn.out", "attn.head[1].q", "attn.head[1].k", "attn.head[1].v",
    "attn.head[1].pattern", "attn.head[1].z", "attn.head[1].out", "resid_mid",
    "mlp.hidden", "mlp.out", "resid_post", "final", "logits",
]  # fmt: skip


@functools.cache
def hf(arch: str) -> nn.Module:
    return models.minilm() if arch == "minilm" else models.DECODERS[arch]()


def tokens(arch: str, seed: int) -> torch.Tensor:
    return models.arch_tokens(arch, seed, B, P)


def run_both(arch_or_module, record, n_sources: int, schedule: str, **args):
    """Record with ``record(t, sources, model)`` and run it on both backends."""
    module = hf(arch_or_module) if isinstance(arch_or_module, str) else arch_or_module
    arch = arch_or_module if isinstance(arch_or_module, str) else None
    ref = iv.wrap(module, backend="torch")
    with iv.trace(ref) as t:
        record(t, [t.source() for _ in range(n_sources)], ref)
    program = t.program
    base = tokens(arch, 1) if arch else args.pop("base")
    sources = [tokens(arch, 2 + i) for i in range(n_sources)] if arch else args.pop("sources")
    results = [
        program.run(iv.wrap(module, backend=b), base, sources, schedule=schedule, **args)
        for b in ("torch", "nnsight")
    ]
    return results


def assert_same(expected: iv.Result, got: iv.Result) -> None:
    assert set(expected.saves) == set(got.saves)
    assert expected.saves, "the program saves nothing"
    for name, want in expected.saves.items():
        close(got.saves[name], want, name)
    if expected.output is not None:
        for key in ("logits", "last_hidden_state"):
            if hasattr(expected.output, key) and getattr(expected.output, key) is not None:
                close(getattr(got.output, key), getattr(expected.output, key), key)


def close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.shape == want.shape, f"{name}: {tuple(got.shape)} != {tuple(want.shape)}"
    numerics.assert_close(got, want, what=f"{name}: this backend vs the torch backend")


# -- parity: every site kind, every architecture, both schedules ------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_interchange_at_each_site_kind(arch, kind, schedule):
    name = full_name(kind)
    if not available(iv.wrap(hf(arch), backend="nnsight"), name):
        pytest.skip(f"{name} does not exist on {arch}")

    def record(t, sources, model):
        (src,) = sources
        site(t, name).save("before")
        site(t, name)[:, 1] = site(src, name)[:, 1]
        site(t, name).save("after")
        site(src, name).save("source")
        t.layer[-1].resid_post.save("last")

    expected, got = run_both(arch, record, 1, schedule)
    assert_same(expected, got)
    assert not torch.equal(expected["before"], expected["after"])


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_site_at_once(arch, schedule):
    """Writes at every site kind of one layer, each read back after its write."""
    model = iv.wrap(hf(arch), backend="nnsight")
    names = [n for n in map(full_name, KINDS) if available(model, n)]

    def record(t, sources, model):
        (src,) = sources
        for i, name in enumerate(names):
            site(t, name)[:, 0] = site(src, name)[:, 0] * 0.5 + site(t, name)[:, 0] * 0.5
            site(t, name).save(f"s{i}")

    assert_same(*run_both(arch, record, 1, schedule))


PROGRAMS = {}


def program(n_sources: int):
    def deco(fn):
        PROGRAMS[fn.__name__] = (fn, n_sources)
        return fn

    return deco


@program(1)
def heads(t, sources, model):
    (src,) = sources
    t.layer[1].attn.head[2].z[:, -1] = src.layer[1].attn.head[2].z[:, -1]
    t.layer[0].attn.head[0].v[:, 2] *= 3.0
    t.layer[1].attn.head[3].out.save("out3")
    t.layer[2].attn.head[1].pattern.save("pattern")
    t.layer[-1].resid_post.save("last")


@program(2)
def two_sources(t, sources, model):
    a, b = sources
    t.layer[0].mlp.out[:, 0] = a.layer[0].mlp.out[:, 0]
    t.layer[1].attn.out[:, 2] = b.layer[1].attn.out[:, 2] - a.layer[1].attn.out[:, 2]
    (a.layer[2].resid_post - b.layer[2].resid_post).save("diff")
    t.layer[-1].resid_post.save("last")


@program(1)
def write_into_source(t, sources, model):
    (src,) = sources
    src.layer[0].mlp.out[:, 1] = 0.0
    src.layer[2].resid_post.save("src_last")
    t.layer[2].resid_post[:, 1] = src.layer[2].resid_post[:, 1]
    t.layer[2].resid_post.save("last")


@program(1)
def later_layer_source(t, sources, model):
    (src,) = sources
    t.layer[0].resid_post[:, 2] = src.layer[2].resid_post[:, 2]
    t.layer[0].resid_post.save("resid0")
    t.layer[-1].resid_post.save("last")


@program(2)
def source_chain(t, sources, model):
    a, b = sources
    b.layer[0].resid_post[:, 1] = a.layer[1].resid_post[:, 1]
    t.layer[1].mlp.out[:, 1] = b.layer[1].mlp.out[:, 1]
    t.layer[-1].resid_post.save("last")


@program(1)
def save_before_and_after(t, sources, model):
    (src,) = sources
    t.layer[1].resid_pre.save("pre_before")
    t.layer[1].resid_pre[:, 3] += src.layer[1].resid_pre[:, 3]
    t.layer[1].resid_pre.save("pre_after")
    t.layer[1].attn.k.save("k")
    t.layer[-1].resid_post.save("last")


@program(1)
def placeholders(t, sources, model):
    (src,) = sources
    pos, scale = t.arg("pos"), t.arg("scale")
    rows = torch.arange(B)
    t.layer[1].resid_post[rows, pos] = src.layer[1].resid_post[rows, pos] * scale
    t.layer[1].resid_post[rows, pos].save("patched")
    t.layer[-1].resid_post.save("last")


@program(1)
def module_sites(t, sources, model):
    (src,) = sources
    mlp = model.resolver.bind("layer.1.mlp.out").path
    layer = model.resolver.bind("layer.2.resid_post").path
    t.module(mlp).output[:, 2] = src.module(mlp).output[:, 2]
    t.module(mlp).input.save("mlp_in")
    t.module(layer).output.save("layer2")
    t.layer[-1].resid_post.save("last")


@program(1)
def module_call(t, sources, model):
    (src,) = sources
    d = model.d_model
    torch.manual_seed(3)
    lin = nn.Linear(d, d)
    mapped = lin(src.layer[1].resid_post[:, -1])
    mapped.save("mapped")
    t.layer[1].resid_post[:, -1] = mapped
    t.layer[-1].resid_post.save("last")


ARGS = {"placeholders": lambda: {"pos": torch.tensor([1, 4]), "scale": torch.tensor(0.5)}}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", list(PROGRAMS))
@pytest.mark.parametrize("arch", ARCHS)
def test_programs(arch, name, schedule):
    record, n_sources = PROGRAMS[name]
    args = ARGS.get(name, dict)()
    assert_same(*run_both(arch, record, n_sources, schedule, **args))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_attention_probabilities_under_sdpa(schedule):
    """The model's fused attention is swapped for the eager one with a hook for the pass."""
    gpt2 = models.gpt2(attn_implementation="sdpa")

    def record(t, sources, model):
        (src,) = sources
        t.layer[1].attn.pattern.save("before")
        t.layer[1].attn.head[2].pattern = src.layer[1].attn.head[2].pattern
        t.layer[1].attn.z.save("z")
        t.logits.save("logits")

    ids, src = tokens("gpt2", 1), tokens("gpt2", 2)
    expected, got = run_both(gpt2, record, 1, schedule, base=ids, sources=[src])
    assert_same(expected, got)
    assert gpt2.config._attn_implementation == "sdpa"


def test_logit_lens_calls_the_models_own_modules():
    """A program may call the model's own submodules on traced values (a logit lens),
    even where the same modules hold sites of the pass: the calls do not feed the trace.
    """
    gpt2, ids = hf("gpt2"), tokens("gpt2", 1)
    ln_f, lm_head = gpt2.transformer.ln_f, gpt2.lm_head
    with iv.trace(iv.wrap(gpt2, backend="torch"), ids) as t:
        resid = t.layer[1].resid_post.save()
        final, logits = t.final.save(), t.logits.save()
    for schedule in SCHEDULES:
        with iv.trace(iv.wrap(gpt2, backend="nnsight"), ids, schedule=schedule) as t:
            lens = lm_head(ln_f(t.layer[1].resid_post)).save()
            got_final, got_logits = t.final.save(), t.logits.save()
        with torch.no_grad():
            close(lens.value, lm_head(ln_f(resid.value)), "lens")
        close(got_final.value, final.value, "final")
        close(got_logits.value, logits.value, "logits")


@pytest.mark.parametrize("factory", [models.mlp, models.gru])
def test_modules_without_a_site_table(factory):
    module = factory()
    if factory is models.mlp:
        base, source, paths = torch.randn(3, 4), torch.randn(3, 4), ["1", "3"]
    else:
        base, source, paths = torch.randn(3, 7, 5), torch.randn(3, 7, 5), ["gru", "head"]

    def record(t, sources, model):
        (src,) = sources
        first, last = paths
        if factory is models.mlp:
            t.module(first).output[:, 2] = src.module(first).output[:, 2]
        else:  # a GRU returns (output, h_n): the site is its first element
            t.module(first).output[:, -1] = src.module(first).output[:, -1] * 2
        t.module(last).input.save("last_in")
        t.module(last).output.save("out")

    for schedule in SCHEDULES:
        expected, got = run_both(module, record, 1, schedule, base=base, sources=[source])
        assert_same(expected, got)
        close(got.output, expected.output, "output")


def test_to_backend_switches_engines_on_the_same_weights():
    gpt2, ids = hf("gpt2"), tokens("gpt2", 1)
    torch_model = iv.wrap(gpt2, backend="torch")
    model = torch_model.to_backend("nnsight")
    assert model.module is gpt2 and model.backend.name == "nnsight"
    assert repr(model) == "<tracevene.Model GPT-2 on 'nnsight'>"
    results = []
    for m in (torch_model, model):
        with iv.trace(m, ids) as t:
            t.layer[0].mlp.out[:, 1] = 0.0
            results.append(t.logits.save())
    close(results[1].value, results[0].value, "logits")


# -- scheduling ----------------------------------------------------------------------
def test_batched_and_sequential_plans_give_the_same_numbers():
    def record(t, sources, model):
        (src,) = sources
        t.layer[1].mlp.out[:, 2] = src.layer[1].mlp.out[:, 2]
        t.logits.save("logits")

    batched = run_both("gpt2", record, 1, "batched")
    sequential = run_both("gpt2", record, 1, "sequential")
    assert [len(r.plan.passes) for r in batched] == [1, 1]
    assert [len(r.plan.passes) for r in sequential] == [2, 2]
    assert_same(batched[0], batched[1])
    assert_same(batched[0], sequential[1])


def test_a_source_only_pass_stops_early():
    gpt2 = models.gpt2()
    model = iv.wrap(gpt2, backend="nnsight")
    calls = []
    handle = gpt2.transformer.h[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        with iv.trace(model, tokens("gpt2", 1), schedule="sequential") as t:
            src = t.source(tokens("gpt2", 2))
            t.layer[1].resid_post[:, 1] = src.layer[0].resid_post[:, 1]
            t.logits.save()
    finally:
        handle.remove()
    assert calls == [1], "the source pass should stop after layer 0"


# -- gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_match_the_torch_backend(arch, schedule):
    module = hf(arch)
    d = iv.wrap(module, backend="torch").d_model
    torch.manual_seed(0)
    rotate = Rotate(d, 4)
    grads = []
    for backend in ("torch", "nnsight"):
        rot = copy.deepcopy(rotate)
        with iv.trace(iv.wrap(module, backend=backend), tokens(arch, 1), schedule=schedule) as t:
            src = t.source(tokens(arch, 2))
            t.layer[1].resid_post[:, 2] = rot(
                t.layer[1].resid_post[:, 2], src.layer[1].resid_post[:, 2]
            )
            last = t.layer[-1].resid_post.save()
        last.value.pow(2).mean().backward()
        grads.append([p.grad.clone() for p in rot.parameters()])
    assert all(p.grad is None and p.requires_grad for p in module.parameters())
    for want, got in zip(*grads, strict=True):
        numerics.assert_close(got, want, what="rotation gradient, nnsight vs torch")
        assert want.abs().sum() > 0


# -- errors ------------------------------------------------------------------------------
def test_hook_sites_are_refused():
    model = iv.wrap(hf("gpt2"), backend="nnsight")
    with pytest.raises(iv.SiteError, match="transformer_lens backend"):
        with iv.trace(model, tokens("gpt2", 1)) as t:
            t.hook("blocks.0.hook_mlp_out").save()


def test_missing_nnsight_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nnsight", None)  # find_spec() -> None, import fails
    monkeypatch.delitem(sys.modules, "tracevene.backends.nnsight")
    with pytest.raises(iv.BackendError, match=r"pip install 'tracevene\[nnsight\]'"):
        iv.wrap(hf("gpt2"), backend="nnsight")
    assert importlib.util.find_spec("tracevene") is not None


def test_a_module_that_never_runs():
    model = iv.wrap(models.gpt2(), backend="nnsight")
    with pytest.raises(iv.ExecutionError, match="never ran during the forward pass"):
        with iv.trace(model, tokens("gpt2", 1)) as t:
            t.module("transformer.h.0.attn.attn_dropout").output.save()  # functional dropout
            t.logits.save()


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.lin(x))


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
def test_a_module_that_runs_twice(backend):
    model = iv.wrap(Twice().eval(), backend=backend)
    with pytest.raises(iv.ExecutionError, match="ran more than once"):
        with iv.trace(model, torch.randn(2, 4)) as t:
            t.module("lin").output.save()


class Backwards(nn.Module):
    """Registers ``b`` before ``a`` but runs ``a`` first."""

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(4, 4)
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x))


def test_execution_order_unlike_registration_order_is_a_clear_error():
    model = iv.wrap(Backwards().eval(), backend="nnsight")
    with pytest.raises(iv.ScheduleError, match="module 'a' ran before 'b'"):
        with iv.trace(model, torch.randn(2, 4)) as t:
            t.module("a").output.save()
            t.module("b").output.save()
    with iv.trace(model, torch.randn(2, 4)) as t:  # one of them alone is fine
        t.module("a").output.save()


# -- nothing outlives a run ------------------------------------------------------------
HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks",
)  # fmt: skip
GLOBAL_HOOKS = (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs",
    "_global_backward_hooks",
)  # fmt: skip
ORIGINAL_CALL = nn.Module.__call__


def snapshot(module: nn.Module) -> dict:
    return {
        "dicts": {name: dict(vars(m)) for name, m in module.named_modules()},
        "hooks": {
            (name, attr): dict(getattr(m, attr))
            for name, m in module.named_modules()
            for attr in HOOK_DICTS
        },
        "global": {attr: dict(getattr(torch_module, attr)) for attr in GLOBAL_HOOKS},
        "configs": {
            name: m.config._attn_implementation
            for name, m in module.named_modules()
            if getattr(m, "config", None) is not None
        },
        "requires_grad": {name: p.requires_grad for name, p in module.named_parameters()},
        "trace": sys.gettrace(),
    }


def assert_clean(gpt2, model, before, ids, logits):
    after = snapshot(gpt2)
    for name, m in gpt2.named_modules():
        assert STATE not in vars(m) and "forward" not in vars(m), name
    assert after == before
    assert all(p.grad is None for p in gpt2.parameters())
    assert attention.PATTERN_HOOKS == {}
    assert nn.Module.__call__ is ORIGINAL_CALL
    interleaver = model.backend.wrapper(gpt2).interleaver
    assert not interleaver.interleaving and interleaver.mediators == []
    with torch.no_grad():
        assert torch.equal(gpt2(ids).logits, logits)


@pytest.fixture(params=["eager", "sdpa"])
def setup(request):
    gpt2 = models.gpt2(attn_implementation=request.param)
    ids = tokens("gpt2", 1)
    with torch.no_grad():
        logits = gpt2(ids).logits
    before = snapshot(gpt2)
    model = iv.wrap(gpt2, backend="nnsight")
    with iv.trace(model, ids) as t:  # builds the private envoy
        out = t.logits.save()
    assert torch.equal(out.value, logits)
    assert_clean(gpt2, model, before, ids, logits)
    return gpt2, model, ids, logits, before


def a_program(t, src):
    t.layer[0].attn.pattern.save()
    t.layer[1].mlp.out[:, 1] = src.layer[1].mlp.out[:, 1]
    t.layer[2].attn.head[1].z.save()
    t.layer[1].resid_mid.save()


def test_wrapping_and_running_leave_the_model_as_it_was(setup):
    gpt2, model, ids, logits, before = setup
    for schedule in SCHEDULES:
        with iv.trace(model, ids, schedule=schedule) as t:
            a_program(t, t.source(tokens("gpt2", 2)))
        assert_clean(gpt2, model, before, ids, logits)


def test_user_exception_inside_the_block(setup):
    gpt2, model, ids, logits, before = setup
    with pytest.raises(RuntimeError, match="user code failed"):
        with iv.trace(model, ids) as t:
            a_program(t, t.source(tokens("gpt2", 2)))
            raise RuntimeError("user code failed")
    assert_clean(gpt2, model, before, ids, logits)


def test_error_in_the_worker(setup):
    gpt2, model, ids, logits, before = setup
    with pytest.raises(iv.ShapeError, match=r"cannot write a value of shape \(3,\)"):
        with iv.trace(model, ids) as t:
            a_program(t, t.source(tokens("gpt2", 2)))
            t.layer[2].mlp.out[:, 0] = torch.zeros(3)
    assert_clean(gpt2, model, before, ids, logits)


def test_error_in_an_intervention_module(setup):
    gpt2, model, ids, logits, before = setup

    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("intervention failed")

    with pytest.raises(iv.ExecutionError, match="intervention failed"):
        with iv.trace(model, ids) as t:
            a_program(t, t.source(tokens("gpt2", 2)))
            t.layer[1].mlp.out = Broken()(t.layer[1].mlp.out)
    assert_clean(gpt2, model, before, ids, logits)


def test_error_inside_the_models_forward(setup):
    gpt2, model, ids, logits, before = setup
    with pytest.raises(IndexError):
        with iv.trace(model, torch.full((B, P), 10_000)) as t:  # beyond the vocabulary
            a_program(t, t.source(tokens("gpt2", 2)))
    assert_clean(gpt2, model, before, ids, logits)


def test_error_in_the_attention_callback(setup):
    gpt2, model, ids, logits, before = setup
    with pytest.raises(iv.ShapeError, match="cannot write"):
        with iv.trace(model, ids) as t:
            t.layer[1].attn.pattern = torch.zeros(5)
    assert_clean(gpt2, model, before, ids, logits)


def test_early_stop_and_unreached_sites(setup):
    gpt2, model, ids, logits, before = setup
    for last in ("attn.pattern", "mlp.out"):  # stops on the model side / in the worker
        with iv.trace(model, ids, schedule="sequential") as t:
            src = t.source(tokens("gpt2", 2))
            site(t, f"layer[2].{last}")[:, 0] = site(src, f"layer[1].{last}")[:, 0]
        assert_clean(gpt2, model, before, ids, logits)
    with pytest.raises(iv.ExecutionError, match="never ran"):
        with iv.trace(model, ids) as t:
            t.module("transformer.h.0.attn.attn_dropout").output.save()
    assert_clean(gpt2, model, before, ids, logits)


def test_importing_the_backend_first_leaves_anyio_usable():
    """nnsight mounts ``.save`` on every object; anyio's lazily defined classes must
    already exist by then (else any later httpx/anyio user fails to import)."""
    import subprocess

    code = (
        "import tracevene.backends.nnsight, nnsight\n"
        "import anyio.pytest_plugin, anyio._backends._asyncio, anyio.streams.tls\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("first", ["caller", "tracevene"])
def test_alongside_the_callers_own_nnsight_envoy(first):
    """A model the caller also wraps with nnsight: both keep working, in any order."""
    import nnsight

    gpt2, ids = models.gpt2(), tokens("gpt2", 1)
    with iv.trace(iv.wrap(gpt2, backend="torch"), ids) as t:
        resid, logits = t.layer[1].resid_post.save(), t.logits.save()
    model = iv.wrap(gpt2, backend="nnsight")
    if first == "tracevene":
        with iv.trace(model, ids) as t:
            t.logits.save()
    mine = nnsight.NNsight(gpt2)
    for _ in range(2):
        with iv.trace(model, ids) as t:
            got_resid, got_logits = t.layer[1].resid_post.save(), t.logits.save()
        close(got_resid.value, resid.value, "resid")
        close(got_logits.value, logits.value, "logits")
        with mine.trace(ids):
            raw = mine.transformer.h[1].output.save()
        close(raw, resid.value, "caller's own trace")
    ours = model.backend.wrapper(gpt2).interleaver
    for m in gpt2.modules():
        assert all(r[0]() is not ours for r in vars(m)[STATE].routes)

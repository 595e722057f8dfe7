"""``iv.generate``: greedy or sampled decoding with the KV cache, the program on chosen passes.

Every generation is compared token for token with a hand-written decoding loop that
edits the Hugging Face model with its own ``register_forward_hook`` (no tracevene),
and every intervention is checked to change the tokens, so a program silently not
running would fail.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import models
import tracevene as iv
from tracevene.errors import ArgumentError, BackendError, ExecutionError

BACKENDS = ["torch", "nnsight", "transformer_lens"]
B, P, N, D = 2, 6, 6, 32
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs")


@functools.cache
def gpt2() -> nn.Module:
    """GPT-2 with larger random weights: sharper attention, varied greedy tokens."""
    return models.gpt2(initializer_range=0.3)


@functools.cache
def llama() -> nn.Module:
    return models.llama(initializer_range=0.3)


@functools.cache
def wrapped(backend: str, arch: str = "gpt2") -> iv.Model:
    return iv.wrap(gpt2() if arch == "gpt2" else llama(), backend=backend)


def vector(scale: float, seed: int = 3) -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(seed)) * scale


# -- the independent reference: plain hooks on the HF model --------------------------------
def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def reference(hf, block, ids, n, edit=None, mask=None, pick=greedy) -> torch.Tensor:
    """Decoding with the KV cache; ``edit(step, h)`` replaces ``block``'s output.

    ``pick`` chooses the next tokens ``[batch]`` from the last position's logits.
    """
    state = {"step": 0}

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        new = edit(state["step"], h.clone())
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = block.register_forward_hook(hook) if edit is not None else None
    out, cache = ids, None
    try:
        with torch.no_grad():
            for step in range(n):
                state["step"] = step
                new = out if step == 0 else out[:, -1:]
                kw = {"input_ids": new, "use_cache": True, "past_key_values": cache}
                if mask is not None:
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    kw.update(attention_mask=mask, position_ids=positions[:, -new.shape[1] :])
                output = hf(**kw)
                cache = output.past_key_values
                token = pick(output.logits[:, -1])
                out = torch.cat([out, token[:, None]], dim=1)
                if mask is not None:
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    finally:
        if handle is not None:
            handle.remove()
    return out


def steps_of(at, n: int = N) -> set[int]:
    """``at`` as step numbers, written out independently of tracevene."""
    named = {"prompt": {0}, "new": set(range(1, n)), "all": set(range(n))}
    return named[at] if isinstance(at, str) else set(at)


def steer_all(t, v):
    t.layer[1].resid_post[:] += v


def steer_prompt_pos(t, v):
    t.layer[1].resid_post[:, 2] += v


def steer_newest(t, v):
    t.layer[1].resid_post[:, -1] += v


def edit_all(v, steps):
    return lambda step, h: h + v if step in steps else None


def edit_at(pos, v, steps):
    def edit(step, h):
        if step not in steps:
            return None
        h[:, pos] += v
        return h

    return edit


#: name -> (program body, reference edit, vector scale, at modes)
PROGRAMS = {
    "steer": (steer_all, edit_all, 2.0, ["prompt", "new", "all", {0, 2}]),
    "prompt_pos": (steer_prompt_pos, functools.partial(edit_at, 2), 3.0, ["prompt", [0]]),
    "newest": (steer_newest, functools.partial(edit_at, -1), 2.0, ["new", "all", (0, 2)]),
}
CASES = [
    pytest.param(name, at, id=f"{name}-{at if isinstance(at, str) else sorted(at)}")
    for name, (*_, modes) in PROGRAMS.items()
    for at in modes
]


def record(model: iv.Model, body) -> iv.Program:
    with iv.trace(model) as t:
        body(t, t.arg("v"))
    return t.program


# -- parity with the reference loop --------------------------------------------------------
def test_reference_loop_is_greedy_generate():
    ids = models.tokens(B, P)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    expected = gpt2().generate(
        ids, attention_mask=mask, max_new_tokens=N, do_sample=False, pad_token_id=0
    )
    assert torch.equal(reference(gpt2(), None, ids, N, mask=mask), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, at", CASES)
def test_matches_hand_written_hooks(backend, name, at):
    body, edit, scale, _ = PROGRAMS[name]
    v, ids, hf = vector(scale), models.tokens(B, P), gpt2()
    model = wrapped(backend)
    got = iv.generate(record(model, body), model, ids, max_new_tokens=N, at=at, v=v)
    expected = reference(hf, hf.transformer.h[1], ids, N, edit(v, steps_of(at)))
    assert got.shape == (B, P + N)
    assert torch.equal(got, expected)
    assert not torch.equal(got, reference(hf, None, ids, N)), "the program changed nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_mask_left_padding(backend):
    """A left-padded row generates what the same prompt alone generates."""
    v, ids, hf = vector(1.0), models.tokens(B, P), gpt2()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    model = wrapped(backend)
    program = record(model, steer_newest)
    prompt = {"input_ids": ids, "attention_mask": mask}
    got = iv.generate(program, model, prompt, max_new_tokens=N, at="all", v=v)
    block = hf.transformer.h[1]
    steps = steps_of("all")
    assert torch.equal(got, reference(hf, block, ids, N, edit_at(-1, v, steps), mask=mask))
    alone = iv.generate(program, model, ids[:1, 2:], max_new_tokens=N, at="all", v=v)
    assert torch.equal(got[:1, 2:], alone)
    assert not torch.equal(got, reference(hf, None, ids, N, mask=mask))


def test_sources_are_clean_runs_of_their_inputs():
    ids, source, hf = models.tokens(B, P), models.tokens(B, P, seed=7), gpt2()
    model = wrapped("torch")
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].resid_post[:, -1] += src.layer[1].resid_post[:, -1] * 0.5
    got = iv.generate(t.program, model, ids, max_new_tokens=N, at="new", sources=[source])
    with torch.no_grad():
        clean = hf(source, use_cache=False, output_hidden_states=True).hidden_states[2]

    def patch(step, h):
        if step == 0:
            return None
        h[:, -1] = h[:, -1] + clean[:, -1] * 0.5
        return h

    assert torch.equal(got, reference(hf, hf.transformer.h[1], ids, N, patch))
    assert not torch.equal(got, reference(hf, None, ids, N))


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama(backend):
    hf = llama()
    model = wrapped(backend, "llama")
    v, ids = vector(2.0), models.tokens(B, P)
    with iv.trace(model) as t:
        t.layer[0].mlp.out[:, -1] += t.arg("v")
    got = iv.generate(t.program, model, ids, max_new_tokens=N, at="new", v=v)
    expected = reference(hf, hf.model.layers[0].mlp, ids, N, edit_at(-1, v, steps_of("new")))
    assert torch.equal(got, expected)
    assert not torch.equal(got, reference(hf, None, ids, N))


# -- sampling ------------------------------------------------------------------------------
SEEDS = [0, 1, 2]
#: name -> sampling arguments of iv.generate (besides do_sample=True and the seed)
SAMPLING = {
    "plain": {},
    "temperature-top_k-top_p": {"temperature": 0.7, "top_k": 8, "top_p": 0.9},
    "top_p": {"temperature": 1.3, "top_p": 0.6},
    "top_k": {"top_k": 3},
}


def hand_sampler(generator, temperature=1.0, top_k=None, top_p=1.0):
    """Sampling written out by hand: temperature, top-k, nucleus (top-p), one draw per row.

    The nucleus is computed the other way round from tracevene (most likely first:
    a token stays while the tokens more likely than it hold less than ``top_p``).
    """

    def pick(logits):
        scores = logits.float() / temperature
        if top_k is not None:
            kth = scores.topk(top_k, dim=-1).values[:, -1:]
            scores = torch.where(scores < kth, float("-inf"), scores)
        if top_p < 1.0:
            probs, order = scores.softmax(-1).sort(-1, descending=True)
            outside = probs.cumsum(-1) - probs >= top_p
            outside[:, 0] = False
            drop = torch.zeros_like(outside).scatter(1, order, outside)
            scores = torch.where(drop, float("-inf"), scores)
        return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]

    return pick


@pytest.mark.parametrize("config", SAMPLING)
def test_hand_sampler_is_transformers_sampling(config):
    """The hand-written loop samples as transformers' generate does (same global RNG)."""
    kw, ids, hf = SAMPLING[config], models.tokens(B, P), gpt2()
    hf_kw = {"top_k": 0, **kw}  # transformers' default top_k is 50; 0 turns it off
    for seed in SEEDS:
        torch.manual_seed(seed)
        expected = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N,
            do_sample=True,
            pad_token_id=0,
            **hf_kw,
        )
        torch.manual_seed(seed)
        got = reference(hf, None, ids, N, pick=hand_sampler(torch.default_generator, **kw))
        assert torch.equal(got, expected), f"seed {seed}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", SAMPLING)
def test_sampling_matches_hand_written_hooks(backend, config):
    kw, v, ids, hf = SAMPLING[config], vector(2.0), models.tokens(B, P), gpt2()
    model = wrapped(backend)
    program, block, edit = record(model, steer_all), hf.transformer.h[1], edit_all(v, {*range(N)})
    outs = []
    for seed in SEEDS:
        got = iv.generate(
            program, model, ids, max_new_tokens=N, at="all", v=v, do_sample=True, seed=seed, **kw
        )
        pick = hand_sampler(torch.Generator().manual_seed(seed), **kw)
        assert torch.equal(got, reference(hf, block, ids, N, edit, pick=pick)), f"seed {seed}"
        plain = reference(hf, None, ids, N, pick=hand_sampler(torch.Generator().manual_seed(seed)))
        assert not torch.equal(got, plain), f"seed {seed}: the program changed nothing"
        outs.append(got)
    assert len({tuple(o.flatten().tolist()) for o in outs}) == len(SEEDS), "seeds agree"
    assert not torch.equal(outs[0], reference(hf, block, ids, N, edit)), "sampling is greedy"


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_is_advanced_not_reseeded(backend):
    """Two calls with one generator continue its stream, as the hand-written loop does."""
    kw, v, ids, hf = SAMPLING["top_p"], vector(2.0), models.tokens(B, P), gpt2()
    model = wrapped(backend)
    program, edit = record(model, steer_newest), edit_at(-1, v, {*range(N)})
    mine, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = [
        iv.generate(
            program, model, ids, max_new_tokens=N, v=v, do_sample=True, generator=mine, **kw
        )
        for _ in range(2)
    ]
    pick = hand_sampler(theirs, **kw)
    expected = [reference(hf, hf.transformer.h[1], ids, N, edit, pick=pick) for _ in range(2)]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(got[0], got[1])


def test_global_generator_without_seed():
    kw, v, ids, hf = SAMPLING["temperature-top_k-top_p"], vector(2.0), models.tokens(B, P), gpt2()
    model = wrapped("torch")
    torch.manual_seed(11)
    got = iv.generate(
        record(model, steer_all), model, ids, max_new_tokens=N, v=v, do_sample=True, **kw
    )
    torch.manual_seed(11)
    pick = hand_sampler(torch.default_generator, **kw)
    edit = edit_all(v, {*range(N)})
    assert torch.equal(got, reference(hf, hf.transformer.h[1], ids, N, edit, pick=pick))


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"temperature": 0}, ArgumentError, r"^temperature=0: must be a finite float > 0"),
        ({"temperature": -0.5}, ArgumentError, r"^temperature=-0.5: must be a finite float"),
        ({"temperature": float("nan")}, ArgumentError, r"^temperature=nan: must be a finite"),
        ({"temperature": "hot"}, TypeError, r"^temperature='hot': pass a float > 0"),
        ({"top_p": 0.0}, ArgumentError, r"^top_p=0.0: must lie in \(0, 1\]"),
        ({"top_p": 1.5}, ArgumentError, r"^top_p=1.5: must lie in \(0, 1\]"),
        ({"top_p": -0.1}, ArgumentError, r"^top_p=-0.1: must lie in \(0, 1\]"),
        ({"top_k": 0}, ArgumentError, r"^top_k=0: must be an int >= 1.*or None"),
        ({"top_k": -3}, ArgumentError, r"^top_k=-3: must be an int >= 1"),
        ({"top_k": 2.5}, TypeError, r"^top_k=2.5: pass an int >= 1"),
        ({"seed": 1, "generator": torch.Generator()}, ArgumentError, r"seed= or generator=, not"),
        ({"seed": "1"}, TypeError, r"^seed='1': pass an int"),
        ({"generator": 3}, TypeError, r"^generator=3: pass a torch.Generator"),
        ({"do_sample": "yes"}, TypeError, r"^do_sample='yes': pass True"),
        (
            {"do_sample": False, "temperature": 0.5, "seed": 0},
            ArgumentError,
            r"^temperature=0.5, seed=0: sampling arguments, but do_sample=False.*do_sample=True",
        ),
    ],
)
def test_bad_sampling_arguments(kw, error, match):
    model = wrapped("torch")
    kw = {"do_sample": True, **kw}
    with pytest.raises(error, match=match):
        iv.generate(
            record(model, steer_all), model, models.tokens(), max_new_tokens=2, v=vector(1), **kw
        )


def test_sampling_errors_are_value_errors():
    assert issubclass(ArgumentError, ValueError) and issubclass(ArgumentError, iv.TraceveneError)


# -- stopping ------------------------------------------------------------------------------
def test_eos_stops_early_and_pads_finished_rows():
    v, ids = vector(1.0), models.tokens(B, P)
    model = wrapped("torch")
    program = record(model, steer_all)
    full = iv.generate(program, model, ids, max_new_tokens=8, at="all", v=v)
    new = full[:, P:].tolist()
    eos, first = eos_that_finishes_rows_apart(new)
    got = iv.generate(program, model, ids, max_new_tokens=8, at="all", v=v, eos_token_id=eos)
    assert got.shape == (B, P + max(first) + 1)  # stopped early: every row has finished
    for row, k in enumerate(first):
        assert torch.equal(got[row, : P + k + 1], full[row, : P + k + 1])
        assert (got[row, P + k :] == eos).all()  # finished rows are padded with eos
    assert not torch.equal(got, full[:, : got.shape[1]])  # ... where they would have gone on


def eos_that_finishes_rows_apart(new: list[list[int]]) -> tuple[int, list[int]]:
    """A token both rows produce, at different steps, the earlier row not repeating it."""
    for eos in sorted(set(new[0][:-1]) & set(new[1][:-1])):
        first = [row.index(eos) for row in new]
        early = new[first.index(min(first))]
        if first[0] != first[1] and any(t != eos for t in early[min(first) : max(first) + 1]):
            return eos, first
    raise AssertionError(f"test setup: no token finishes the rows apart in {new}")


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "at, error, match",
    [
        ("first", ValueError, r"at='first' is not a generation mode \(closest: 'prompt'\)"),
        ("News", ValueError, r"not a generation mode.*valid: 'prompt' \(step 0.*'new'.*'all'"),
        (set(), ValueError, r"chooses no step"),
        ({0, 9}, ValueError, r"step\(s\) \[9\] never run with max_new_tokens=4 \(steps 0..3"),
        ([-1], ValueError, r"step\(s\) \[-1\] never run"),
        ([1.0], TypeError, r"non-integer steps \[1.0\]"),
        ([True], TypeError, r"non-integer steps \[True\]"),
        (3, TypeError, r"at=3 is neither a mode nor an iterable of steps"),
    ],
)
def test_bad_at(at, error, match):
    model = wrapped("torch")
    program = record(model, steer_all)
    with pytest.raises(error, match=match):
        iv.generate(program, model, models.tokens(B, P), max_new_tokens=4, at=at, v=vector(1))


def test_new_needs_a_second_token():
    model = wrapped("torch")
    with pytest.raises(ValueError, match=r"at='new' chooses no pass with max_new_tokens=1"):
        iv.generate(
            record(model, steer_all),
            model,
            models.tokens(),
            max_new_tokens=1,
            at="new",
            v=vector(1),
        )


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_max_new_tokens(bad):
    model = wrapped("torch")
    with pytest.raises(ValueError, match=r"max_new_tokens=.*pass a positive int"):
        iv.generate(
            record(model, steer_all), model, models.tokens(), max_new_tokens=bad, v=vector(1)
        )


def test_bad_prompts():
    model, program = wrapped("torch"), record(wrapped("torch"), steer_all)
    ids = models.tokens(B, P)
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    cases = [
        ("some text", ValueError, r"text prompts need a tokenizer"),
        ({"input_ids": ids, "attention_mask": mask}, ValueError, r"row\(s\) \[1\] end in padding"),
        ({"input_ids": ids, "token_type_ids": ids}, ValueError, r"'token_type_ids'.*forward_kw"),
        (ids[0], ValueError, r"\[batch, pos\].*shape \(6,\)"),
        (3.0, TypeError, r"cannot generate from a float"),
    ]
    for prompt, error, match in cases:
        with pytest.raises(error, match=match):
            iv.generate(program, model, prompt, max_new_tokens=2, v=vector(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_names_the_step(backend):
    model = wrapped(backend)
    with iv.trace(model) as t:
        t.layer[1].resid_post[:, 2] += 1.0
    with pytest.raises(
        ExecutionError,
        match=r"^generation step 1 \(a new-token pass of length 1\).*index 2 is out of bounds",
    ):
        iv.generate(t.program, model, models.tokens(B, P), max_new_tokens=3, at="all")


def test_placeholder_errors_name_the_step():
    model = wrapped("torch")
    with pytest.raises(
        ValueError, match=r"^generation step 0 \(the prompt pass of length 6\).*missing \['v'\]"
    ):
        iv.generate(record(model, steer_all), model, models.tokens(B, P), max_new_tokens=2)


def test_tl_engine_built_by_the_caller_is_refused():
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    hf = copy.deepcopy(gpt2())
    bridge = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config)
    model = iv.wrap(bridge)
    with iv.trace(model) as t:
        t.layer[1].resid_post[:] += 1.0
    with pytest.raises(
        BackendError,
        match=r"KV cache is not available on the transformer_lens.*backend='torch' or 'nnsight'",
    ):
        iv.generate(t.program, model, models.tokens(), max_new_tokens=2)


# -- the model is left as it was -----------------------------------------------------------
def snapshot(module: nn.Module) -> dict:
    return {
        name: ({a: dict(getattr(m, a)) for a in HOOK_DICTS}, set(vars(m)))
        for name, m in module.named_modules()
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_user_hook_survives(backend):
    hf = gpt2()
    calls = []
    handle = hf.transformer.h[0].register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        before = snapshot(hf)
        model = wrapped(backend)
        v, ids = vector(6.0), models.tokens(B, P)
        got = iv.generate(record(model, steer_all), model, ids, max_new_tokens=4, at={0, 2}, v=v)
        assert got.shape == (B, P + 4)
        assert snapshot(hf) == before
        assert len(calls) == (4 if backend != "transformer_lens" else 0)  # TL: a private copy
        del calls[:]
        with torch.no_grad():
            hf(ids)
        assert len(calls) == 1
    finally:
        handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_hooks_left_after_a_failing_step(backend):
    hf, ids = gpt2(), models.tokens(B, P)
    model = wrapped(backend)
    before, engine = snapshot(hf), snapshot(model.module)
    with torch.no_grad():
        plain = hf(ids).logits
    with iv.trace(model) as t:
        t.layer[1].resid_post[:, 5] += 100.0
    with pytest.raises(ExecutionError, match=r"generation step 1"):
        iv.generate(t.program, model, ids, max_new_tokens=4, at="all")
    assert snapshot(hf) == before
    assert snapshot(model.module) == engine
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, plain)

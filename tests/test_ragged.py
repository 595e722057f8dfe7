"""Ragged batches: prompts of different lengths, padded left or right.

At every real token, a padded batch must give exactly the values of each prompt run
alone (within float32 rounding), on every backend, in ``iv.trace``, ``program.run``,
training, patching and generation: tracevene derives position ids from the attention
mask (GPT-2's learned positions would otherwise shift under left padding). Under right
padding, a negative position of a site (``[:, -1]``) is padding for the shorter
prompts, so it is refused with an error that says how to index the last real token.
"""

from __future__ import annotations

import functools

import numerics
import pytest
import tokenizers
import torch
import transformers
from tokenizers import pre_tokenizers

import models
import tracevene as iv
from tracevene.errors import ArgumentError, ArgumentTypeError, ExecutionError
from tracevene.patching import activation
from tracevene.training import default_metric

BACKENDS = ["torch", "nnsight", "transformer_lens"]
ARCHS = ["gpt2", "llama"]
SIDES = ["left", "right"]
PROMPTS = ["w5 w9 w3 w7 w1", "w2 w8", "w4 w6 w11 w13"]
SOURCES = ["w15 w19 w13 w17 w11", "w12 w18", "w14 w16 w21 w23"]  # same lengths
LENGTHS = [5, 2, 4]
B, P, N = len(PROMPTS), max(LENGTHS), 4


# -- models and tokenizers -------------------------------------------------------------
@functools.cache
def tokenizer(side: str) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary: ``w{i}`` is token i."""
    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, models.VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", padding_side=side
    )


@functools.cache
def hf(arch: str) -> torch.nn.Module:
    """The tiny decoder, with larger weights: sharper attention, varied greedy tokens."""
    return models.DECODERS[arch](initializer_range=0.3)


@functools.cache
def wrapped(arch: str, backend: str, side: str) -> iv.Model:
    return iv.wrap(hf(arch), backend=backend, tokenizer=tokenizer(side))


def encoded(side: str, prompts: list[str] = PROMPTS) -> dict[str, torch.Tensor]:
    return dict(tokenizer(side)(prompts, return_tensors="pt", padding=True))


def real(side: str, i: int) -> slice:
    """The positions of prompt ``i``'s real tokens in the padded batch."""
    return slice(P - LENGTHS[i], P) if side == "left" else slice(0, LENGTHS[i])


def assert_rows_match(batched: torch.Tensor, alone: list[torch.Tensor], side: str, what: str):
    """Each prompt's real tokens in ``batched`` ``[B, P, ...]`` equal the prompt alone."""
    for i, value in enumerate(alone):
        numerics.assert_close(batched[i, real(side, i)], value[0], what=f"{what}, prompt {i}")


# -- iv.trace ----------------------------------------------------------------------------
SITES = ("embed", "layer[0].resid_post", "layer[2].resid_post", "layer[1].attn.z", "logits")


def read_sites(model: iv.Model, inputs) -> dict[str, torch.Tensor]:
    with iv.trace(model, inputs) as t:
        saved = {name: models.site(t, name).save() for name in SITES}
    return {name: s.value for name, s in saved.items()}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_trace_reads_match_each_prompt_alone(arch, backend, side):
    model = wrapped(arch, backend, side)
    batched = read_sites(model, PROMPTS)
    alone = [read_sites(model, [p]) for p in PROMPTS]
    for name in SITES:
        assert_rows_match(batched[name], [a[name] for a in alone], side, f"{arch} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padding_is_not_a_no_op(backend):
    """Without the derived positions GPT-2's left-padded rows differ (the test can fail)."""
    model = wrapped("gpt2", backend, "left")
    batch = encoded("left")
    with iv.trace(model, {**batch, "position_ids": torch.arange(P).expand(B, P)}) as t:
        shifted = t.logits[:, -1].save()
    with iv.trace(model, [PROMPTS[1]]) as t:
        alone = t.logits[:, -1].save()
    assert (shifted.value[1] - alone.value[0]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", SIDES)
def test_position_ids_only_where_padding_moves_a_token(side, backend):
    """Left-padded rows get positions from the mask; right-padded rows keep the defaults."""
    model = wrapped("gpt2", backend, side)
    _, kwargs = model.backend.to_call(model, PROMPTS, {})
    if side == "right":
        assert "position_ids" not in kwargs
        return
    want = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 0, 1], [0, 0, 1, 2, 3]])
    assert torch.equal(kwargs["position_ids"], want)
    _, kwargs = model.backend.to_call(model, [PROMPTS[0]], {})
    assert "position_ids" not in kwargs  # nothing padded: the model's own defaults


# -- program.run, with a source and writes at the last real token ----------------------------
def interchange_program(model: iv.Model) -> iv.Program:
    with iv.trace(model) as t:
        rows, last = t.arg("rows"), t.arg("last")
        src = t.source()
        t.layer[1].resid_post[rows, last] = src.layer[1].resid_post[rows, last]
        t.layer[0].mlp.out[rows, last] *= 0.5
        t.layer[2].resid_post.save("resid")
        t.logits[rows, last].save("last_logits")
        t.logits.save("logits")
    return t.program


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_program_run_matches_each_prompt_alone(arch, backend, side):
    model = wrapped(arch, backend, side)
    program = interchange_program(model)
    last = iv.last_token_positions(encoded(side))
    got = program.run(model, PROMPTS, [SOURCES], rows=torch.arange(B), last=last)
    alone = [
        program.run(model, [p], [s], rows=torch.arange(1), last=torch.tensor([n - 1]))
        for p, s, n in zip(PROMPTS, SOURCES, LENGTHS, strict=True)
    ]
    for key in ("resid", "logits"):
        assert_rows_match(got[key], [a[key] for a in alone], side, f"{arch} patched {key}")
    want = torch.cat([a["last_logits"] for a in alone])
    numerics.assert_close(got["last_logits"], want, what=f"{arch} logits at the last token")
    clean = program.run(model, PROMPTS, [PROMPTS], rows=torch.arange(B), last=last)
    assert not torch.allclose(clean["last_logits"], got["last_logits"]), "the patch changed nothing"


# -- training ------------------------------------------------------------------------------
def last_logit(result: iv.Result, batch: dict) -> torch.Tensor:
    """Per example: the logit of token 7 at the example's last real token."""
    return result["logits"][torch.arange(len(batch["last"])), batch["last"], 7]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_and_evaluate_batches_match_each_prompt_alone(backend, side):
    model = wrapped("gpt2", backend, side)
    shift = torch.nn.Linear(1, 32, bias=False)
    with iv.trace(model) as t:
        rows, last = t.arg("rows"), t.arg("last")
        t.layer[1].resid_post[rows, last] += shift(t.arg("one"))
        t.logits.save("logits")
    program = t.program
    one = torch.ones(1)

    def batch(prompts, last):
        return {"base": prompts, "rows": torch.arange(len(prompts)), "last": last, "one": one}

    ragged = batch(PROMPTS, iv.last_token_positions(encoded(side)))
    singles = [batch([p], torch.tensor([n - 1])) for p, n in zip(PROMPTS, LENGTHS, strict=True)]
    got = iv.evaluate(program, model, [ragged], last_logit, progress=False)
    want = iv.evaluate(program, model, singles, last_logit, progress=False)
    numerics.assert_close(got, want, what="evaluate: ragged batch vs prompts alone")

    def loss_fn(result, b):
        return -last_logit(result, b).mean()

    expected = torch.stack([loss_fn(program.run(model, s["base"], **_args(s)), s)
                            for s in singles]).mean()  # fmt: skip
    history = iv.train(program, model, [ragged], loss_fn, optimizer="sgd", lr=0.0,
                       progress=False, seed=0)  # fmt: skip
    numerics.assert_close(history.loss[0], expected, what="train loss: ragged vs alone")


def _args(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "base"}


def shift_program(model: iv.Model) -> iv.Program:
    """A trainable shift of the residual stream at each prompt's last real token."""
    shift = torch.nn.Linear(1, 32, bias=False)
    with iv.trace(model) as t:
        rows, last = t.arg("rows"), t.arg("last")
        t.layer[1].resid_post[rows, last] += shift(t.arg("one"))
    return t.program


def labelled(prompts, side: str) -> dict:
    last = iv.last_token_positions(encoded(side, prompts))
    return {"base": prompts, "rows": torch.arange(len(prompts)), "last": last,
            "one": torch.ones(1), "labels": torch.tensor([7, 9, 11])[: len(prompts)]}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_loss_and_metric_left_padded_match_each_prompt_alone(backend):
    """Left padding: position -1 is every prompt's last token, so the defaults hold."""
    model = wrapped("gpt2", backend, "left")
    program = shift_program(model)
    ragged = labelled(PROMPTS, "left")
    singles = [{**labelled([p], "left"), "labels": ragged["labels"][i : i + 1]}
               for i, p in enumerate(PROMPTS)]  # fmt: skip
    got = iv.evaluate(program, model, [ragged], progress=False)
    want = iv.evaluate(program, model, singles, progress=False)
    assert got == want  # accuracies: a share of 3 examples
    history = iv.train(program, model, [ragged], optimizer="sgd", lr=0.0, progress=False)
    alone = iv.train(program, model, singles, optimizer="sgd", lr=0.0, progress=False)
    numerics.assert_close(history.loss[0], sum(alone.loss) / len(alone.loss),
                          what="default loss: left-padded batch vs prompts alone")  # fmt: skip


RIGHT_PADDED_LAST = (
    r"the default loss and metric read the logits at the last position, but the batch's "
    r"base is right-padded: row\(s\) \[1, 2\] end in padding .* Pad on the left "
    r"\(tokenizer.padding_side = 'left'\), or pass loss_fn / metric_fn that read each "
    r"prompt's last token, e.g. iv.metrics.cross_entropy\(result, batch\['labels'\], "
    r"position=batch\['last'\]\)"
)


@pytest.mark.parametrize("base", ["text", "dict"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_default_loss_and_metric_refuse_right_padding(backend, base):
    """Right padding: position -1 is padding for the shorter prompts, so it is an error."""
    model = wrapped("gpt2", backend, "right")
    program = shift_program(model)
    batch = labelled(PROMPTS, "right")
    if base == "dict":
        batch["base"] = encoded("right")
    runs = {
        "train": lambda: iv.train(program, model, [batch], progress=False),
        "evaluate": lambda: iv.evaluate(program, model, [batch], progress=False),
        "train with the default metric": lambda: iv.train(
            program, model, [batch], loss_fn=lambda r, b: r.output.logits.sum(),
            metric_fn=default_metric, progress=False),
    }  # fmt: skip
    for run in runs.values():
        with pytest.raises(ArgumentError, match=RIGHT_PADDED_LAST):
            run()
    full = {**batch, "base": [PROMPTS[0], SOURCES[0], PROMPTS[0]]}  # nothing padded
    iv.evaluate(program, model, [full], progress=False)


# -- activation patching ----------------------------------------------------------------------
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_activation_patching_matches_each_prompt_alone(arch, backend, side):
    """Per prompt, a metric at its last real token: each real cell equals the prompt alone."""
    model = wrapped(arch, backend, side)
    clean, corrupted = encoded(side), encoded(side, SOURCES)
    assert torch.equal(clean["attention_mask"], corrupted["attention_mask"])
    last = iv.last_token_positions(clean)
    patching = functools.partial(iv.patching.activation_patching, model, progress=False)
    with iv.trace(model, corrupted) as t:
        logits = t.logits.save()
    scale = numerics.magnitude(logits.value)  # a logit difference: the logits' magnitude
    for i in (0, 1):  # the longest prompt and the shortest

        def metric(logits, row=i, pos=int(last[i])):
            return logits[row, pos, 7] - logits[row, pos, 8]

        got = patching(clean, corrupted, metric).values
        ids = [tokenizer(side)(text, return_tensors="pt")["input_ids"]
               for text in (PROMPTS[i], SOURCES[i])]  # fmt: skip
        want = patching(*ids, lambda x: x[0, -1, 7] - x[0, -1, 8]).values
        numerics.assert_close(got[:, real(side, i)], want, what=f"{arch} patching, prompt {i}",
                              scale=scale)  # fmt: skip
        padding = [p for p in range(P) if p not in range(P)[real(side, i)]]
        if padding:  # patching only padding leaves the prompt as it was
            unpatched = metric(logits.value).expand(got.shape[0], len(padding))
            numerics.assert_close(got[:, padding], unpatched, scale=scale,
                                  what=f"{arch} patching padding of prompt {i}")  # fmt: skip


def last_metric(row: int, pos: int):
    """A logit difference at one prompt's last real token (``pos``) of its row."""
    return lambda logits: logits[row, pos, 7] - logits[row, pos, 8]


def patch_sweeps(model: iv.Model, clean, corrupted, metric) -> dict[str, torch.Tensor]:
    """Every patching function on text: name -> values with a position axis or none."""
    patching = iv.patching
    out = {"activation": patching.activation_patching(model, clean, corrupted, metric,
                                                      progress=False).values,
           "activation z": patching.activation_patching(model, clean, corrupted, metric,
                                                        site="z", heads=True,
                                                        progress=False).values}  # fmt: skip
    estimates = patching.attribution_patching(model, clean, corrupted, metric,
                                              sites=("resid_pre", "z"))  # fmt: skip
    out |= {f"attribution {k}": v.values for k, v in estimates.items()}
    for form in ("two_pass", "single_pass"):
        out[f"path {form}"] = patching.path_patching(model, corrupted, clean, metric,
                                                     form=form, progress=False).values  # fmt: skip
    return out


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_patching_text_matches_each_prompt_alone(arch, backend, side):
    """list[str] in all three functions; at each prompt's real tokens, the prompt alone (str)."""
    model = wrapped(arch, backend, side)
    last = iv.last_token_positions(encoded(side))
    with iv.trace(model, SOURCES) as t:
        logits = t.logits.save()
    scale = numerics.magnitude(logits.value)  # differences of logits
    for i in (0, 1):  # the longest prompt and the shortest
        got = patch_sweeps(model, PROMPTS, SOURCES, last_metric(i, int(last[i])))
        want = patch_sweeps(model, PROMPTS[i], SOURCES[i], last_metric(0, -1))
        for name, value in want.items():
            what = f"{arch} {side}-padded {name}, prompt {i}"
            cells = got[name] if name.startswith("path") else got[name][:, real(side, i)]
            numerics.assert_close(cells, value, what=what, scale=scale)
            if name.startswith("attribution"):  # padding has no gradient
                pad = [p for p in range(P) if p not in range(P)[real(side, i)]]
                numerics.assert_close(got[name][:, pad], 0 * got[name][:, pad], what=what,
                                      scale=numerics.magnitude(value))  # fmt: skip


def test_patching_text_is_the_tokenised_batch():
    """Text is tokenised as iv.trace tokenises it: the same numbers as the padded dicts."""
    model = wrapped("gpt2", "torch", "left")
    metric = last_metric(1, P - 1)
    got = patch_sweeps(model, PROMPTS, SOURCES, metric)
    want = patch_sweeps(model, encoded("left"), encoded("left", SOURCES), metric)
    for name, value in want.items():
        numerics.assert_exact(got[name], value, what=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_patching_kv_lever_with_left_padding_matches_whole_passes(arch, backend, monkeypatch):
    """Passes that start at the patched position (a left-padded KV cache) = whole passes."""
    model = wrapped(arch, backend, "left")
    clean, corrupted = encoded("left"), encoded("left", SOURCES)
    metric = last_metric(1, P - 1)
    got = iv.patching.activation_patching(model, clean, corrupted, metric, progress=False)
    monkeypatch.setattr(activation, "_generates", lambda model: False)
    whole = iv.patching.activation_patching(model, clean, corrupted, metric, progress=False)
    with iv.trace(model, corrupted) as t:
        logits = t.logits.save()
    numerics.assert_close(got.values, whole.values, what=f"{arch} KV lever vs whole passes",
                          scale=numerics.magnitude(logits.value))  # fmt: skip


@pytest.mark.parametrize(
    "clean, corrupted, match",
    [
        (PROMPTS, ["w1 w2", "w3", "w4"], r"same shape, got \w+ \(3, 5\) and \w+ \(3, 2\)"),
        (PROMPTS, [SOURCES[0], SOURCES[2], SOURCES[1]],
         r"row\(s\) \[1, 2\] of the \w+ and \w+ inputs are padded differently \(their "
         r"attention masks differ; real tokens 2 vs 4, 4 vs 2\)"),
        (PROMPTS[1], "w1 w2 w3", r"same shape, got \w+ \(1, 2\) and \w+ \(1, 3\)"),
    ],
    ids=["lengths", "rows", "str"],
)  # fmt: skip
def test_patching_text_of_other_lengths_raises(clean, corrupted, match):
    model = wrapped("gpt2", "torch", "right")
    calls = [
        lambda: iv.patching.activation_patching(model, clean, corrupted, last_metric(0, 0),
                                                progress=False),
        lambda: iv.patching.attribution_patching(model, clean, corrupted, last_metric(0, 0)),
        lambda: iv.patching.path_patching(model, clean, corrupted, last_metric(0, 0),
                                          progress=False),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(ArgumentError, match=match) as info:
            call()
        assert "len(model.tokenizer(prompt)['input_ids'])" in str(info.value)


# -- generation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_generation_matches_each_prompt_alone(arch, backend):
    model = wrapped(arch, backend, "left")
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    with iv.trace(model) as t:
        t.layer[1].resid_post[:, -1] += t.arg("v")  # left padding: -1 is every last token
    got = iv.generate(t.program, model, PROMPTS, max_new_tokens=N, v=v)
    plain = iv.generate(t.program, model, PROMPTS, max_new_tokens=N, v=v * 0)
    assert not torch.equal(got, plain), "the steering changed nothing"
    for i, prompt in enumerate(PROMPTS):
        alone = iv.generate(t.program, model, [prompt], max_new_tokens=N, v=v)
        assert torch.equal(got[i, P - LENGTHS[i] :], alone[0]), f"{arch} prompt {i}"


# -- right padding and negative positions ------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "body, where",
    [
        (lambda t: t.logits[:, -1].save(), r"base\.logits\[:, -1\]"),
        (lambda t: t.layer[1].resid_post[:, -2:].save(), r"resid_post\[:, -2:\]"),
        (lambda t: t.layer[0].attn.pattern[:, :, -1].save(), r"attn\.pattern\[:, :, -1\]"),
        (lambda t: t.layer[1].attn.head[0].z[0, -1].save(), r"head\[0\]\.z\[0, -1\]"),
        (lambda t: t.layer[0].mlp.out.__setitem__((slice(None), -1), 0), r"mlp\.out\[:, -1\]"),
    ],
)
def test_negative_position_of_a_right_padded_run_raises(backend, body, where):
    model = wrapped("gpt2", backend, "right")
    with pytest.raises(ExecutionError, match=where) as info:
        with iv.trace(model, PROMPTS) as t:
            body(t)
    message = str(info.value)
    assert "right-padded: row(s) [1, 2] end in padding" in message
    assert "iv.last_token_positions" in message and "padding_side = 'left'" in message


def test_negative_position_of_a_right_padded_source_raises():
    model = wrapped("gpt2", "torch", "right")
    with pytest.raises(ExecutionError, match=r"src1\.layer\[1\]\.resid_post\[:, -1\].*src1 inputs"):
        with iv.trace(model, [PROMPTS[0]]) as t:
            src = t.source(PROMPTS)
            t.layer[1].resid_post[0, -1] = src.layer[1].resid_post[:, -1][0]


@pytest.mark.parametrize(
    "inputs",
    [encoded("left"), encoded("right", [PROMPTS[0], SOURCES[0]]), models.tokens(3, 5)],
    ids=["left-padded", "right-padded-but-full", "ids-without-mask"],
)
def test_negative_positions_are_fine_without_right_padding(inputs):
    model = wrapped("gpt2", "torch", "right")
    with iv.trace(model, inputs) as t:
        t.layer[0].mlp.out[:, -1] = 0
        last = t.logits[:, -1].save()
        everything = t.logits[:, 1].save()  # positive positions are never refused
    assert last.value.shape[0] == everything.value.shape[0]


# -- iv.last_token_positions -------------------------------------------------------------------
def test_last_token_positions():
    assert iv.last_token_positions(encoded("left")).tolist() == [4, 4, 4]
    assert iv.last_token_positions(encoded("right")).tolist() == [4, 1, 3]
    assert iv.last_token_positions(encoded("right")["attention_mask"]).tolist() == [4, 1, 3]
    assert iv.last_token_positions({"input_ids": models.tokens(2, 6)}).tolist() == [5, 5]


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        (PROMPTS, ArgumentTypeError, r"Tokenize text first"),
        (models.tokens(2, 6), ArgumentError, r"of 0 \(padding\) and 1"),
        (torch.tensor([[1, 1], [0, 0]]), ArgumentError, r"row\(s\) \[1\].*no real token"),
    ],
)
def test_last_token_positions_errors(inputs, error, match):
    with pytest.raises(error, match=match):
        iv.last_token_positions(inputs)


# -- encoders: absolute positions, padded on the right ---------------------------------------------
@functools.cache
def minilm(backend: str, side: str) -> iv.Model:
    tok = models.minilm_tokenizer()
    tok.padding_side = side
    return iv.wrap(models.minilm(), backend=backend, tokenizer=tok)


SENTENCES = ["Mary went to the store", "John left", "the cat sat on the mat today"]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_rows_match_each_sentence_alone(backend, side):
    """BERT: right padding runs as Hugging Face runs it; left padding is corrected."""
    model = minilm(backend, side)
    _, kwargs = model.backend.to_call(model, SENTENCES, {})
    assert ("position_ids" in kwargs) == (side == "left")
    mask = kwargs["attention_mask"].bool()
    with iv.trace(model, SENTENCES) as t:
        batched = t.layer[-1].resid_post.save()
    for i, sentence in enumerate(SENTENCES):
        with iv.trace(model, [sentence]) as t:
            alone = t.layer[-1].resid_post.save()
        numerics.assert_close(batched.value[i][mask[i]], alone.value[0],
                              what=f"MiniLM {side}-padded, sentence {i}")  # fmt: skip

"""Intervened generation: greedy or sampled decoding, a program run on chosen passes."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import ArgumentError, ArgumentTypeError, BackendError, TraceveneError, closest
from .ir.program import Program
from .model import Model
from .runtime.engine import module_lock
from .runtime.inputs import position_ids, tokenize
from .sampling import Sampler, sampler

__all__ = ["generate"]

#: The named ``at`` modes and what they choose.
MODES = {
    "prompt": "step 0, the prompt pass",
    "new": "every step >= 1, one per new token",
    "all": "every step",
}
PROMPT_KEYS = ("input_ids", "attention_mask")


def generate(
    program: Program,
    model: Model,
    prompt: Any,
    *,
    max_new_tokens: int = 20,
    at: str | Iterable[int] = "all",
    sources: Sequence[Any] = (),
    eos_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    **args: Any,
) -> Tensor:
    """Generate tokens (greedy or sampled) while a program intervenes on chosen passes.

    Decoding carries the model's KV cache from step to step (``use_cache=True``).
    **Step 0** is the forward pass over the whole prompt; **step s >= 1** is the pass
    over the s-th generated token alone (sequence length 1). The next token comes from
    the last position's logits: their argmax by default (greedy), or with
    ``do_sample=True`` a draw in transformers' default order: the logits in float32
    divided by ``temperature``, then top-k, then top-p, then ``softmax`` and
    ``torch.multinomial`` with the generator (see ``tracevene.sampling``). No beam
    search. Everything runs under ``torch.no_grad()``.

    ``at`` chooses the passes that run the program; the others run the model plainly.
    Positions in the program index the tokens of the pass it runs in. In the prompt
    pass they are prompt positions: ``t.layer[1].resid_post[:, 2] += v`` steers prompt
    token 2, ``[:, -1]`` the last prompt token. In a new-token pass the position axis
    has length 1, so ``t.layer[1].resid_post[:, -1] += v`` steers the newest token.
    ``t.layer[1].resid_post[:] += v`` steers every position of every chosen pass.
    A program that does not fit a pass (writing position 5 of a 1-token pass) raises
    the library's error, prefixed with the step that failed.

    Args:
        program: A program recorded without inputs
            (``with iv.trace(model) as t: ...; program = t.program``).
        model: A wrapped Hugging Face causal language model (``iv.wrap(hf_model,
            backend=...)``) on ``"torch"``, ``"nnsight"`` or ``"transformer_lens"`` (a
            bridge that backend built over a Hugging Face model, not a TransformerLens
            model of your own).
        prompt: Token ids ``[batch, pos]``; a dict (or ``BatchEncoding``) with
            ``input_ids`` and optionally ``attention_mask``; or text (``str`` /
            ``list[str]``), tokenised with ``model.tokenizer``. Batches of prompts of
            different lengths must be padded on the left (``tokenizer.padding_side =
            "left"``) with an attention mask; positions are then counted from each
            row's first real token, as Hugging Face's ``generate`` does.
        max_new_tokens: How many tokens to generate (at least 1); steps
            ``0 .. max_new_tokens - 1`` run.
        at: ``"prompt"`` (step 0), ``"new"`` (every step >= 1), ``"all"`` (every step),
            or an iterable of step numbers, e.g. ``{0, 3, 4}``.
        sources: Inputs of the program's source runs, as in ``program.run``. Each is a
            clean run of its own inputs (no cache), run again for every step that runs
            the program.
        eos_token_id: If given, a row that produces this token produces it for every
            later step, and generation stops once every row has. ``None`` (the
            default) always generates ``max_new_tokens`` tokens.
        do_sample: Sample the next token instead of taking the argmax. The sampling
            arguments below need it (with ``do_sample=False`` they raise).
        temperature: Divides the logits before sampling (a float > 0; default 1.0).
        top_k: Keep only the ``top_k`` most likely tokens (an int >= 1; default
            ``None``, every token; transformers' ``generate`` defaults to 50).
        top_p: Keep the most likely tokens whose probabilities add up to ``top_p``
            (in (0, 1]; default 1.0, every token).
        seed: Seed of a fresh ``torch.Generator`` on the model's device, so the same
            seed gives the same tokens.
        generator: A ``torch.Generator`` on the model's device, advanced by the draws
            (instead of ``seed``). With neither, torch's global generator is used.
        forward_kwargs: Extra keyword arguments for every forward call.
        **args: Values of the program's placeholders (``t.arg(name)``), passed to
            every program run.

    Returns:
        Token ids ``[batch, prompt_len + new]``: the prompt followed by the generated
        tokens (``new <= max_new_tokens``, fewer only after an early stop).

    Raises:
        ArgumentError: A bad ``at``, ``max_new_tokens`` or prompt, or a keyword that is
            neither a decoding option nor a placeholder, or a bad sampling argument
            (``temperature <= 0``, ``top_p`` outside (0, 1], ``top_k < 1``, both ``seed``
            and ``generator``, or any of them without ``do_sample=True``); the message
            says what is valid.
        BackendError: The model gives no KV cache on this backend.
        TraceveneError: A program run failed; the message starts with the step.

    Example:
        Add a vector to the residual stream on every new token:

            with iv.trace(model) as t:
                t.layer[1].resid_post[:] += t.arg("v")
            ids = iv.generate(t.program, model, prompt, at="new", v=vector)

        Sample with a seed (the same seed, the same tokens):

            ids = iv.generate(
                t.program, model, prompt, do_sample=True, temperature=0.8, top_p=0.9,
                seed=0, v=vector,
            )
    """
    if max_new_tokens is True or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ArgumentError(
            f"max_new_tokens={max_new_tokens!r}: pass a positive int, the number of "
            "tokens to generate."
        )
    steps = chosen_steps(at, max_new_tokens)
    if not isinstance(program, Program):
        raise ArgumentTypeError(
            f"iv.generate runs a recorded program, got {type(program).__name__}: record one "
            "with `with iv.trace(model) as t: ...` and pass t.program."
        )
    _check_keywords(program, args)
    _check_model(model)
    pick = sampler(do_sample, temperature, top_k, top_p, seed, generator, model.device)
    ids, mask = _prompt(model, prompt)
    extra = dict(forward_kwargs or {})
    out, cache = ids, None
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    with torch.no_grad():
        for step in range(max_new_tokens):
            inputs = _step_inputs(out if step == 0 else out[:, -1:], mask, cache, step)
            if step in steps:
                output = _run_program(program, model, inputs, sources, extra, args, step)
            else:
                output = _run_plain(model, {**extra, **inputs})
            logits, cache = _logits_and_cache(output, model)
            token = _next_token(logits, pick, done, eos_token_id).to(out.dtype)
            out = torch.cat([out, token[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
    return out


# -- what to run ----------------------------------------------------------------------
def chosen_steps(at: str | Iterable[int], max_new_tokens: int) -> frozenset[int]:
    """The steps that run the program, for ``at`` and ``max_new_tokens`` (validated)."""
    valid = (
        f"valid: {', '.join(f'{m!r} ({what})' for m, what in MODES.items())}, or an iterable "
        "of step numbers "
        f"in 0..{max_new_tokens - 1} (0 is the prompt pass, s >= 1 the pass over "
        "generated token s)"
    )
    if isinstance(at, str):
        if at not in MODES:
            near = closest(at, MODES, n=1)[0]
            raise ArgumentError(f"at={at!r} is not a generation mode (closest: {near!r}); {valid}.")
        steps = {"prompt": {0}, "new": set(range(1, max_new_tokens))}.get(
            at, set(range(max_new_tokens))
        )
        if not steps:
            raise ArgumentError(
                f"at={at!r} chooses no pass with max_new_tokens={max_new_tokens}: the last "
                "generated token is never fed back, so there are no new-token passes. "
                "Raise max_new_tokens, or use at='prompt' / 'all'."
            )
        return frozenset(steps)
    return frozenset(_step_numbers(at, max_new_tokens, valid))


def _step_numbers(at: Any, max_new_tokens: int, valid: str) -> set[int]:
    try:
        steps = list(at)
    except TypeError:
        raise ArgumentTypeError(
            f"at={at!r} is neither a mode nor an iterable of steps; {valid}."
        ) from None
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int)]
    if bad:
        raise ArgumentTypeError(f"at={at!r} holds non-integer steps {bad!r}; {valid}.")
    if not steps:
        raise ArgumentError(
            f"at={at!r} chooses no step, so the program would never run; {valid}. To "
            "generate without interventions, use the model's own generate()."
        )
    outside = sorted(s for s in set(steps) if not 0 <= s < max_new_tokens)
    if outside:
        raise ArgumentError(
            f"at={at!r}: step(s) {outside} never run with max_new_tokens={max_new_tokens} "
            f"(steps 0..{max_new_tokens - 1} do); {valid}. Raise max_new_tokens or drop "
            "those steps."
        )
    return set(steps)


def _check_keywords(program: Program, args: Mapping[str, Any]) -> None:
    """Refuse keywords that are neither decoding options nor the program's placeholders."""
    unknown = [a for a in args if a not in program.args]
    if not unknown:
        return
    options = [
        p.name
        for p in inspect.signature(generate).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    near = closest(unknown[0], [*options, *program.args], n=1)[0]
    raise ArgumentError(
        f"iv.generate got unknown keyword(s) {unknown} (closest: {near!r}): they are neither "
        f"decoding options nor placeholders of the program. The decoding options are "
        f"{', '.join(options)}; the program's placeholders (t.arg(name)) are "
        f"{', '.join(program.args) or 'none'}. Fix the spelling, or pass other forward "
        "arguments as forward_kwargs={...}."
    )


def _check_model(model: Any) -> None:
    """Refuse models that cannot generate with a KV cache here."""
    if not isinstance(model, Model):
        raise ArgumentTypeError(
            f"iv.generate needs a tracevene Model, got {type(model).__name__}: wrap it "
            "first, iv.wrap(hf_model, backend='torch')."
        )
    if model.resolver.plain is None:
        raise BackendError(
            f"generation with the KV cache is not available on the {model.backend.name} "
            f"backend for a {type(model.module).__name__} you built yourself: wrap the "
            f"Hugging Face model instead (iv.wrap(hf_model, backend={model.backend.name!r})), "
            "or use backend='torch' or 'nnsight'."
        )
    if model.resolver.arch is None:
        raise BackendError(
            f"iv.generate needs a Hugging Face causal language model with a site table; "
            f"got {model!r}. Wrap a model such as GPT2LMHeadModel or LlamaForCausalLM."
        )


# -- inputs ---------------------------------------------------------------------------
def _prompt(model: Model, prompt: Any) -> tuple[Tensor, Tensor | None]:
    """Token ids and attention mask (or ``None``) of the prompt, on the model's device."""
    prompt = tokenize(model, prompt, "prompts")
    if isinstance(prompt, Tensor):
        prompt = {"input_ids": prompt}
    if not isinstance(prompt, Mapping):
        raise ArgumentTypeError(
            f"cannot generate from a {type(prompt).__name__}: pass token ids (a LongTensor "
            "[batch, pos]), a dict with 'input_ids' (and 'attention_mask'), or text."
        )
    unknown = sorted(set(prompt) - set(PROMPT_KEYS))
    if unknown or "input_ids" not in prompt:
        raise ArgumentError(
            f"a prompt dict takes 'input_ids' (required) and 'attention_mask'; got "
            f"{sorted(prompt)}. Pass other forward arguments as forward_kwargs={{...}}."
        )
    ids = _as_ids(prompt["input_ids"]).to(model.device)
    mask = prompt.get("attention_mask")
    if mask is not None:
        mask = _check_mask(torch.as_tensor(mask), ids).to(model.device)
    return ids, mask


def _as_ids(ids: Any) -> Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.shape[1] == 0:
        raise ArgumentError(
            f"prompt token ids must be an integer tensor [batch, pos] with pos >= 1; got "
            f"{ids.dtype} of shape {tuple(ids.shape)}. Add a batch dimension with ids[None]."
        )
    return ids


def _check_mask(mask: Tensor, ids: Tensor) -> Tensor:
    if mask.shape != ids.shape:
        raise ArgumentError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}; "
            "they must match."
        )
    right = (mask[:, -1] == 0).nonzero().flatten().tolist()
    if right:
        raise ArgumentError(
            f"prompt row(s) {right} end in padding (attention_mask 0 at the last position): "
            "new tokens are appended after the last position, so pad on the left "
            "(tokenizer.padding_side = 'left')."
        )
    return mask


def _step_inputs(ids: Tensor, mask: Tensor | None, cache: Any, step: int) -> dict[str, Any]:
    """Forward arguments of one step: the pass's tokens, the mask so far, the cache."""
    inputs: dict[str, Any] = {"input_ids": ids, "use_cache": True}
    if step > 0:
        inputs["past_key_values"] = cache
    if mask is not None:  # positions count real tokens only, as in HF's generate
        inputs["attention_mask"] = mask
        positions = position_ids(mask, ids.shape[1])
        if positions is not None:
            inputs["position_ids"] = positions
    return inputs


# -- running one step -------------------------------------------------------------------
def _run_program(
    program: Program,
    model: Model,
    inputs: dict[str, Any],
    sources: Sequence[Any],
    forward_kwargs: dict[str, Any],
    args: dict[str, Any],
    step: int,
) -> Any:
    """Run the program on one step; errors name the step."""
    try:
        result = program.run(
            model, inputs, sources, schedule="sequential", forward_kwargs=forward_kwargs, **args
        )
    except Exception as e:
        new = _at_step(e, step, inputs["input_ids"].shape[1])
        if new is e:
            raise
        raise new from e
    return result.output


def _at_step(e: Exception, step: int, length: int) -> Exception:
    """``e`` with the failing step in front of its message (same type where possible)."""
    kind = "the prompt pass" if step == 0 else "a new-token pass"
    where = f"generation step {step} ({kind} of length {length})"
    if isinstance(e, TraceveneError) or type(e).__module__ == "builtins":
        try:
            return type(e)(f"{where}: {e}")
        except Exception:  # an exception type with another constructor
            pass
    e.add_note(f"raised in {where}")
    return e


def _run_plain(model: Model, kwargs: dict[str, Any]) -> Any:
    """One forward pass without the program, under the model's lock.

    Holding the lock keeps other threads' runs (and their hooks) off the model meanwhile.
    """
    plain = model.resolver.plain
    assert plain is not None, "_check_model refuses a model without a plain forward"
    with module_lock(model.module):
        return plain(**kwargs)


def _next_token(logits: Tensor, pick: Sampler, done: Tensor, eos_token_id: int | None) -> Tensor:
    """Next token per row (``eos`` for finished rows); marks rows that finish."""
    token = pick(logits[:, -1])
    if eos_token_id is not None:
        token = torch.where(done, torch.full_like(token, eos_token_id), token)
        done |= token == eos_token_id
    return token


def _logits_and_cache(output: Any, model: Model) -> tuple[Tensor, Any]:
    logits = getattr(output, "logits", None)
    cache = getattr(output, "past_key_values", None)
    if logits is None or cache is None:
        raise BackendError(
            f"generation with the KV cache is not available on the {model.backend.name!r} "
            f"backend for this model: its output ({type(output).__name__}) has no logits "
            "and past_key_values. Use backend='torch' or 'nnsight' with a Hugging Face "
            "causal language model."
        )
    return logits, cache

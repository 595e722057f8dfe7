"""Runs on one model from several threads: serialised, so every number is right and the
caller's model is left exactly as it was (config, hooks, outputs)."""

from __future__ import annotations

import threading

import pytest
import torch

import tracevene as iv
from tests import models
from tests.numerics import assert_close

BACKENDS = ["torch", "nnsight", "transformer_lens"]
THREADS, RUNS, INPUTS = 4, 25, 5


def _program(model, k: int, pattern: bool):
    """Thread ``k``'s program: an interchange at its own position, plus reads."""
    with iv.trace(model) as t:
        src = t.source()
        t.layer[1].resid_post[:, k] = src.layer[1].resid_post[:, k] * (1.0 + k)
        t.layer[2].mlp.out.save("mlp")
        if pattern:  # reading probabilities switches attention to tracevene's kernel
            t.layer[2].attn.pattern.save("pattern")
        t.logits.save("logits")
    return t.program


def _state(hf):
    """What the caller can observe of its model besides outputs: configs and hooks."""
    configs = {
        name: getattr(m.config, "_attn_implementation", None)
        for name, m in hf.named_modules()
        if getattr(m, "config", None) is not None
    }
    hooks = {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__)
        for name, m in hf.named_modules()
    }
    return configs, hooks


@pytest.mark.parametrize("pattern", [False, True], ids=["plain", "pattern"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_runs_on_one_model_give_single_threaded_results(backend, pattern):
    hf = models.gpt2()
    ids = models.tokens(batch=2, pos=6, seed=3)
    with torch.no_grad():
        before_out = hf(ids).logits
    before = _state(hf)
    model = iv.wrap(hf, backend=backend)
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.randint(0, 97, (2, 6), generator=g),
               torch.randint(0, 97, (2, 6), generator=g)) for _ in range(INPUTS)]  # fmt: skip
    programs = [_program(model, k, pattern) for k in range(THREADS)]
    want = {
        (k, i): programs[k].run(model, base, [src]).saves
        for k in range(THREADS)
        for i, (base, src) in enumerate(inputs)
    }
    engine = _state(model.module)  # TL: its private copy, with the bridge's own hooks
    got: dict[tuple[int, int], list] = {key: [] for key in want}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(k: int) -> None:
        try:
            start.wait()
            for j in range(RUNS):
                i = (k + j) % INPUTS
                base, src = inputs[i]
                got[(k, i)].append(programs[k].run(model, base, [src]).saves)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert sum(len(v) for v in got.values()) == THREADS * RUNS
    for key, results in got.items():
        for saves in results:
            for name, value in want[key].items():
                assert_close(saves[name], value, what=f"{backend} thread run {key}: {name}")
    assert _state(hf) == before
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, before_out)
    assert _state(model.module) == engine


def test_nested_run_on_the_same_model_from_one_thread_does_not_deadlock():
    """A program run inside a module call of another run (same thread, same model)."""
    model = iv.wrap(models.gpt2(), backend="torch")
    ids = models.tokens(batch=2, pos=6, seed=3)
    with iv.trace(model) as inner:
        inner.layer[0].mlp.out.save("mlp")
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(inner.program.run(model, ids)["mlp"])
            return x

    with iv.trace(model) as t:
        t.layer[1].resid_post = Probe()(t.layer[1].resid_post)
        t.logits.save("logits")
    done = []
    th = threading.Thread(target=lambda: done.append(t.program.run(model, ids)))
    th.start()
    th.join(timeout=60)
    assert done and len(seen) == 1, "the nested run deadlocked or failed"

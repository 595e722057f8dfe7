"""SourceCache: source passes served from a cache give the same numbers, and only then."""

from __future__ import annotations

import pytest
import torch

import tracevene as iv
from tests import models

BACKENDS = ["torch", "nnsight", "transformer_lens"]


def _das_program(model, rot, site="resid_post", pos=-1):
    with iv.trace(model) as t:
        src = t.source()
        base_site = getattr(t.layer[1], site)
        src_site = getattr(src.layer[1], site)
        base_site[:, pos] = rot(base_site[:, pos], src_site[:, pos])
        t.logits.save("logits")
    return t.program


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_source_pass_gives_identical_results(backend):
    model = iv.wrap(models.gpt2(), backend=backend)
    torch.manual_seed(0)
    program = _das_program(model, iv.LowRankRotatedSpace(32, 4))
    base, source = torch.randint(0, 97, (4, 6)), torch.randint(0, 97, (4, 6))
    cache = iv.SourceCache()
    first = program.run(model, base, [source], source_cache=cache)
    again = program.run(model, base, [source], source_cache=cache)
    plain = program.run(model, base, [source])
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    assert torch.equal(first["logits"], again["logits"])
    assert torch.equal(plain["logits"], again["logits"])


def test_cache_keeps_only_what_later_passes_use_and_no_views():
    model = iv.wrap(models.gpt2(), backend="torch")
    program = _das_program(model, iv.RotatedSpace(32, 2))
    cache = iv.SourceCache()
    program.run(model, torch.randint(0, 97, (3, 5)), [torch.randint(0, 97, (3, 5))],
                source_cache=cache)  # fmt: skip
    (entry,) = cache.entries.values()
    (value,) = entry.values()  # the source's value at the last position only
    assert value.shape == (3, 32)
    assert value._base is None  # not a view keeping the whole site alive


def test_other_inputs_or_placeholders_miss():
    model = iv.wrap(models.gpt2(), backend="torch")
    rot = iv.RotatedSpace(32, 2)
    with iv.trace(model) as t:
        src = t.source()
        pos = t.arg("pos")
        rows = torch.arange(2)
        t.layer[1].resid_post[rows, pos] = rot(
            t.layer[1].resid_post[rows, pos], src.layer[1].resid_post[rows, pos]
        )
        t.logits.save("logits")
    cache = iv.SourceCache()
    base, source = torch.randint(0, 97, (2, 5)), torch.randint(0, 97, (2, 5))
    runs = [
        (source, torch.tensor([1, 2])),
        (source, torch.tensor([1, 3])),  # other positions: the source pass indexes them
        (source.flip(0), torch.tensor([1, 2])),  # other source inputs
        (source, torch.tensor([1, 2])),  # seen before: a hit
    ]
    for src_ids, p in runs:
        cached = t.program.run(model, base, [src_ids], source_cache=cache, pos=p)
        plain = t.program.run(model, base, [src_ids], pos=p)
        assert torch.equal(cached["logits"], plain["logits"])
    assert (cache.hits, cache.misses) == (1, 3)


def test_passes_that_write_or_call_modules_are_not_cached():
    model = iv.wrap(models.gpt2(), backend="torch")
    rot = iv.RotatedSpace(32, 2)
    with iv.trace(model) as t:
        src = t.source()
        src.layer[0].mlp.out[:] = 0.0  # the source is no longer clean
        t.layer[1].resid_post = rot(t.layer[1].resid_post, src.layer[1].resid_post)
        t.logits.save("logits")
    cache = iv.SourceCache()
    base, source = torch.randint(0, 97, (2, 5)), torch.randint(0, 97, (2, 5))
    for _ in range(2):
        t.program.run(model, base, [source], source_cache=cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [
        {"base": torch.randint(0, 97, (8, 5), generator=g),
         "source": torch.randint(0, 97, (8, 5), generator=g),
         "labels": torch.randint(0, 97, (8,), generator=g)}
        for _ in range(3)
    ]  # fmt: skip


def test_training_with_cached_sources_equals_training_without():
    model = iv.wrap(models.gpt2(), backend="torch")
    runs = []
    for cache_sources in (False, True):
        torch.manual_seed(0)
        rot = iv.RotatedSpace(32, 2)
        program = _das_program(model, rot)
        history = iv.train(program, model, _batches(), epochs=3, lr=1e-2, progress=False,
                           cache_sources=cache_sources)  # fmt: skip
        runs.append((history.loss, rot.state_dict()))
    (loss_a, state_a), (loss_b, state_b) = runs
    assert loss_a == loss_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def _varied_program(model, i):
    """Program ``i`` of a family whose source passes differ in site, layer, position and
    what they compute, and whose base writes differ in value."""
    site = ("resid_post", "resid_pre", "mlp.out", "attn.out")[i % 4]
    layer, pos, scale = i % 3, (i // 4) % 5, 1.0 + (i % 7) / 4

    def at(run):
        out = run.layer[layer]
        for part in site.split("."):
            out = getattr(out, part)
        return out

    with iv.trace(model) as t:
        src = t.source()
        at(t)[:, pos] = at(src)[:, pos] * scale + 0.1 * (i % 5)
        t.logits.save("logits")
    return t.program


def test_one_cache_shared_by_many_short_lived_programs_gives_right_answers():
    """Entries are keyed by what the source pass reads and computes, not by ``id``.

    Each program is dropped before the next is built, so ids are reused; programs
    ``150..299`` rebuild ``0..149`` (new objects, same content) and must hit.
    """
    model = iv.wrap(models.gpt2(), backend="torch")
    base, source = torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (2, 6))
    cache = iv.SourceCache()
    plain: dict[int, torch.Tensor] = {}
    wrong = 0
    for i in range(300):
        program = _varied_program(model, i % 150)
        cached = program.run(model, base, [source], source_cache=cache)["logits"]
        if i < 150:
            plain[i] = program.run(model, base, [source])["logits"]
        wrong += not torch.equal(cached, plain[i % 150])
        del program, cached
    assert wrong == 0
    assert (cache.hits, cache.misses) == (150, 150)


def test_cache_misses_after_the_model_changes():
    model = iv.wrap(models.gpt2(), backend="torch")
    base, source = torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (2, 6))
    program = _varied_program(model, 0)
    cache = iv.SourceCache()
    program.run(model, base, [source], source_cache=cache)
    with torch.no_grad():
        model.module.transformer.h[0].mlp.c_fc.weight.mul_(2.0)  # in place: a new version
    cached = program.run(model, base, [source], source_cache=cache)["logits"]
    assert torch.equal(cached, program.run(model, base, [source])["logits"])
    assert (cache.hits, cache.misses) == (0, 2)

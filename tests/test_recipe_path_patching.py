"""recipes/path_patching.py and tracevene.tasks.induction on the bundled induction model.

The checks that matter are independent of the library: head scores from the
attention probabilities Hugging Face returns itself (``output_attentions=True``), and
path patching written out by hand with forward hooks on the Llama modules.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
import transformers

import tracevene as iv
from tests import numerics
from tracevene.patching import Head, path_patching
from tracevene.tasks import induction

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "induction"


@pytest.fixture(scope="module")
def hf() -> transformers.LlamaForCausalLM:
    return transformers.AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def ds() -> induction.Dataset:
    return induction.make_dataset(64, 64, min_len=8, seed=1)


@pytest.fixture(scope="module")
def scale(hf, ds) -> float:
    """The metric averages log-softmax of the logits: it rounds at the logits' magnitude."""
    with torch.no_grad():
        return numerics.magnitude(hf(ds.orig).logits, hf(ds.new).logits)


# -- the data ---------------------------------------------------------------------------
def test_dataset_layout() -> None:
    ds = induction.make_dataset(50, 40, seq_len=24, repeat_len=6, min_len=3, seed=3)
    for b in range(len(ds)):
        row, new, f, s = ds.orig[b].tolist(), ds.new[b].tolist(), int(ds.first[b]), int(ds.start[b])
        n = int(ds.lengths[b])
        assert 3 <= n <= 6
        x = row[f : f + n]
        assert row[0] == induction.BOS and 1 <= f and f + n <= s <= 24 - n
        assert row[s : s + n] == x and len(set(x)) == n
        others = row[1:f] + row[f + n : s] + row[s + n :]
        assert not set(others) & set(x)  # fillers never repeat a token of x
        y = new[f : f + n]
        assert not set(y) & set(x) and new[:f] + new[f + n :] == row[:f] + row[f + n :]
        assert ds.mask[b].nonzero().flatten().tolist() == list(range(s, s + n - 1))
        assert ds.targets[b, s : s + n - 1].tolist() == x[1:]
    for random in (ds.start, ds.first, ds.lengths):
        assert len(set(random.tolist())) > 3


def test_dataset_rejects_sizes_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match=r"seq_len=10 cannot hold .* use seq_len >= 17"):
        induction.make_dataset(2, 64, seq_len=10, repeat_len=8)
    with pytest.raises(ValueError, match=r"vocab_size=10 .* use vocab_size >= 18"):
        induction.make_dataset(2, 10, seq_len=32, repeat_len=8)
    with pytest.raises(ValueError, match=r"min_len=1, .* use 2 <= min_len <= repeat_len"):
        induction.make_dataset(2, 64, min_len=1)


def test_scores_of_planted_patterns() -> None:
    ds = induction.make_dataset(4, 64, seed=0)
    pos = ds.orig.shape[1]
    prev = torch.zeros(4, 1, pos, pos)
    prev[:, 0, 0, 0] = 1
    prev[:, 0, torch.arange(1, pos), torch.arange(pos - 1)] = 1
    ind = torch.full((4, 1, pos, pos), 1.0 / pos)
    for b in range(4):
        for i in range(int(ds.lengths[b]) - 1):
            ind[b, 0, ds.start[b] + i] = 0
            ind[b, 0, ds.start[b] + i, ds.first[b] + 1 + i] = 1
    assert induction.previous_token_scores(prev).item() == pytest.approx(1.0)
    assert induction.induction_scores(ind, ds).item() == pytest.approx(1.0)
    assert induction.previous_token_scores(ind).item() < 0.1


# -- scores on the checkpoint -----------------------------------------------------------
def _scores_by_hand(hf, ds) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores from HF's own attention probabilities, with explicit loops over positions."""
    with torch.no_grad():
        attentions = hf(ds.orig, output_attentions=True).attentions  # [batch, head, q, k] each
    prev, ind = [], []
    for a in attentions:
        pos = a.shape[-1]
        prev.append(sum(a[:, :, p, p - 1] for p in range(1, pos)).mean(0) / (pos - 1))
        pairs = [(b, int(ds.start[b]) + i, int(ds.first[b]) + 1 + i)
                 for b in range(len(ds)) for i in range(int(ds.lengths[b]) - 1)]  # fmt: skip
        ind.append(sum(a[b, :, q, k] for b, q, k in pairs) / len(pairs))
    return torch.stack(prev), torch.stack(ind)


def test_head_scores_match_hf_attentions(hf, ds) -> None:
    prev, ind = induction.head_scores(iv.wrap(hf, backend="torch"), ds, batch_size=40)
    ref_prev, ref_ind = _scores_by_hand(hf, ds)
    # averages of attention probabilities (at most 1) read through another attention path
    numerics.assert_close(prev, ref_prev, what="previous-token scores vs HF", scale=1.0)
    numerics.assert_close(ind, ref_ind, what="induction scores vs HF", scale=1.0)


def test_bundled_model_has_previous_token_and_induction_heads(hf, ds) -> None:
    prev, ind = _scores_by_hand(hf, ds)
    assert prev[0].max() >= 0.5, f"no previous-token head in layer 0: {prev[0]}"
    assert ind[1].max() >= 0.4, f"no induction head in layer 1: {ind[1]}"


# -- path patching by hand ----------------------------------------------------------------
def _z_of_every_layer(hf, ids) -> list[torch.Tensor]:
    """Each layer's per-head values z (the input of o_proj), [batch, pos, d_model]."""
    z = []
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: z.append(a[0].clone()))
             for layer in hf.model.layers]  # fmt: skip
    with torch.no_grad():
        hf(ids)
    for h in hooks:
        h.remove()
    return z


def _hand_path_patching(hf, ds, sender, receiver, inputs) -> float:
    """Wang et al.'s path patching with plain hooks: the metric of the second run.

    Run 1 (on orig): every head's z is frozen at its orig value, except the sender's,
    which takes its value on new; the receiver's q/k/v projections are read (before
    the rotary embedding, which acts on each head's slice alone). Run 2 (on orig): only
    the receiver's ``inputs`` are replaced by those values.
    """
    dh = hf.config.head_dim
    z_orig, z_new = _z_of_every_layer(hf, ds.orig), _z_of_every_layer(hf, ds.new)

    def freeze(layer):
        def hook(module, args):
            z = z_orig[layer].clone()
            if layer == sender[0]:
                cols = slice(sender[1] * dh, (sender[1] + 1) * dh)
                z[..., cols] = z_new[layer][..., cols]
            return (z,)

        return hook

    seen = {}
    attn = hf.model.layers[receiver[0]].self_attn
    projections = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}

    def record(name):
        return lambda module, args, out: seen.update({name: out})

    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(freeze(i))
             for i, layer in enumerate(hf.model.layers)]  # fmt: skip
    hooks += [proj.register_forward_hook(record(name)) for name, proj in projections.items()]
    with torch.no_grad():
        hf(ds.orig)
    for h in hooks:
        h.remove()

    def replace(name):
        def hook(module, args, out):
            out = out.clone()
            cols = slice(receiver[1] * dh, (receiver[1] + 1) * dh)
            out[..., cols] = seen[name][..., cols]
            return out

        return hook

    hooks = [projections[name].register_forward_hook(replace(name)) for name in inputs]
    with torch.no_grad():
        logits = hf(ds.orig).logits
    for h in hooks:
        h.remove()
    return induction.metric(ds)(logits).item()


@pytest.fixture(scope="module")
def circuit(hf, ds) -> tuple[tuple[int, int], tuple[int, int]]:
    """The previous-token head of layer 0 and the induction head of layer 1."""
    prev, ind = _scores_by_hand(hf, ds)
    return (0, int(prev[0].argmax())), (1, int(ind[1].argmax()))


@pytest.fixture(scope="module")
def by_hand(hf, ds, circuit) -> dict[str, float]:
    """The hand-written path patching's metric for each input of the induction head."""
    sender, receiver = circuit
    return {name: _hand_path_patching(hf, ds, sender, receiver, name)
            for name in ("q", "k", "v", "qkv")}  # fmt: skip


@pytest.mark.parametrize("form", ["two_pass", "single_pass"])
def test_path_patching_matches_hooks(hf, ds, scale, circuit, by_hand, form) -> None:
    sender, receiver = circuit
    model = iv.wrap(hf, backend="torch")
    for name in ("q", "k", "v", "qkv"):
        result = path_patching(
            model, ds.orig, ds.new, induction.metric(ds), senders=[Head(*sender)],
            receivers=Head(*receiver, input=None if name == "qkv" else name),
            form=form, progress=False,
        )  # fmt: skip
        numerics.assert_close(
            result.values[0], by_hand[name], what=f"path into {name} vs hooks", scale=scale
        )


def test_the_path_into_the_keys_carries_the_effect(hf, ds, by_hand) -> None:
    metric = induction.metric(ds)
    with torch.no_grad():
        m_orig, m_new = metric(hf(ds.orig).logits).item(), metric(hf(ds.new).logits).item()
    fraction = {name: (value - m_orig) / (m_new - m_orig) for name, value in by_hand.items()}
    assert fraction["k"] >= 0.8, fraction
    assert abs(fraction["q"]) <= 0.05 and abs(fraction["v"]) <= 0.05, fraction


# -- the recipe ---------------------------------------------------------------------------
def test_recipe_smoke(tmp_path: Path, capsys: pytest.CaptureFixture, scale: float) -> None:
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        recipe = runpy.run_path(str(ROOT / "recipes/path_patching.py"), run_name="recipe")
        summary = recipe["main"](["--smoke", "--out", str(tmp_path)])
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    out = capsys.readouterr().out
    assert "q+k+v" in out and "two-pass vs single-pass" in out
    assert summary["passed"] and "verdict: PASS (7 of 7 expectations hold)" in out, out
    assert Path(summary["plot"]).is_file() and Path(summary["plot"]).stat().st_size > 1000
    assert summary["sender"][0] == 0 and summary["receiver"][0] == 1
    assert summary["two_vs_single_pass"] <= numerics.tolerance(scale)["atol"]  # rounding only
    assert summary["metric_orig"] > summary["metric_new"]
    assert set(summary["fraction"]) == {"q", "k", "v", "qkv"}

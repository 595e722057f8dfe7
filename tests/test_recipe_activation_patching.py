"""recipes/activation_patching.py: a smoke run, and its sweeps against plain forward hooks."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
import transformers

import tracevene as iv
from tests import numerics
from tracevene.patching import activation_patching
from tracevene.tasks import ioi

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
recipe = runpy.run_path(str(ROOT / "recipes/activation_patching.py"), run_name="recipe")


@pytest.fixture(scope="module")
def setup():
    """A small random GPT-2 over the IOI vocabulary, 4 prompts, and their metric."""
    tok = ioi.tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config).eval()
    ds = recipe["dataset"](tok, 4, 0, 0)
    with torch.no_grad():
        clean = ioi.logit_diff(hf(ds.clean).logits, ds).mean().item()
        corrupted = ioi.logit_diff(hf(ds.corrupted).logits, ds).mean().item()
    metric = recipe["normalised_logit_diff"](ds, clean, corrupted)
    results = recipe["run_sweeps"](iv.wrap(hf, backend="torch"), ds, metric, ["END"], 7)
    return hf, ds, metric, results


@pytest.fixture(scope="module")
def scale(setup):
    """The magnitude behind the normalised metric: (LD - LD_corr) / (LD_clean - LD_corr)
    computes differences of logits, so its rounding is that of the logits over the
    normaliser, not that of the metric's own value (~1)."""
    hf, ds, _, _ = setup
    with torch.no_grad():
        logits = numerics.magnitude(hf(ds.clean).logits, hf(ds.corrupted).logits)
        ld = [ioi.logit_diff(hf(x).logits, ds).mean().item() for x in (ds.clean, ds.corrupted)]
    return logits / abs(ld[0] - ld[1])


# -- the reference: one patch with plain forward hooks ---------------------------------------
def _hook(module, pre: bool, fn):
    """Register ``fn(tensor) -> tensor | None`` on a module's input (pre) or output."""
    if pre:
        return module.register_forward_pre_hook(lambda m, a: _apply(fn, a, tuple))
    return module.register_forward_hook(lambda m, a, out: _apply(fn, out, type(out)))


def _apply(fn, value, kind):
    if not isinstance(value, tuple):  # a block or MLP output: one tensor
        result = fn(value)
        return value if result is None else result
    result = fn(value[0])  # GPT-2 attention returns (output, weights)
    return None if result is None else kind((result, *value[1:]))


def hooked_patch(hf, module, pre, index, run_ids, source_ids, metric) -> float:
    """The metric of ``run_ids`` with ``tensor[index]`` taken from the run on ``source_ids``."""
    kept = {}

    def keep(x):
        kept["x"] = x.detach().clone()

    handle = _hook(module, pre, keep)
    with torch.no_grad():
        hf(source_ids)
    handle.remove()

    def patch(x):
        x = x.clone()
        x[index] = kept["x"][index]
        return x

    handle = _hook(module, pre, patch)
    with torch.no_grad():
        value = metric(hf(run_ids).logits).item()
    handle.remove()
    return value


def _module(hf, site: str, layer: int):
    """(module, pre) where the site lives in HF's GPT-2."""
    block = hf.transformer.h[layer]
    return {"resid_pre": (block, True), "attn.out": (block.attn, False),
            "mlp.out": (block.mlp, False), "z": (block.attn.c_proj, True)}[site]  # fmt: skip


def _runs(ds, direction):
    return (ds.corrupted, ds.clean) if direction == "denoise" else (ds.clean, ds.corrupted)


def _strongest_cell(values: torch.Tensor, direction: str) -> tuple[int, ...]:
    """The cell that moved the metric most: the one a recipe reports first."""
    moved = values if direction == "denoise" else 1 - values
    return tuple(int(i) for i in torch.unravel_index(moved.abs().argmax(), values.shape))


# -- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("site", ["resid_pre", "attn.out", "mlp.out"])
def test_layer_position_cell_equals_a_hooked_patch(setup, scale, site, direction):
    hf, ds, metric, results = setup
    values = results[f"{direction} {site}"].values
    layer, pos = _strongest_cell(values, direction)
    module, pre = _module(hf, site, layer)
    expected = hooked_patch(hf, module, pre, (slice(None), pos), *_runs(ds, direction), metric)
    numerics.assert_close(
        values[layer, pos], expected, what=f"{site} cell vs a hooked patch", scale=scale
    )
    assert abs(expected - (0.0 if direction == "denoise" else 1.0)) > 1e-3  # the patch did act


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_head_cells_equal_hooked_patches(setup, scale, direction):
    hf, ds, metric, results = setup
    d_head = hf.config.n_embd // hf.config.n_head
    by_pos, joint = results[f"{direction} z"].values, results[f"{direction} z@all"].values
    layer, pos, head = _strongest_cell(by_pos, direction)
    columns = slice(head * d_head, (head + 1) * d_head)
    module, pre = _module(hf, "z", layer)
    runs = _runs(ds, direction)
    expected = hooked_patch(hf, module, pre, (slice(None), pos, columns), *runs, metric)
    numerics.assert_close(
        by_pos[layer, pos, head], expected, what="head cell vs a hooked patch", scale=scale
    )
    layer, head = _strongest_cell(joint, direction)
    columns = slice(head * d_head, (head + 1) * d_head)
    module, pre = _module(hf, "z", layer)
    expected = hooked_patch(hf, module, pre, (slice(None), slice(None), columns), *runs, metric)
    numerics.assert_close(
        joint[layer, head], expected, what="all-position head cell vs a hooked patch", scale=scale
    )


def test_head_slices_at_a_role_read_the_by_position_sweep(setup):
    _, ds, _, results = setup
    end = int(ds.pos["END"][0])
    assert torch.equal(results["denoise z@END"].values, results["denoise z"].values[:, end])


def test_positions_without_a_difference_change_nothing_at_layer_0(setup, scale):
    """resid_pre of layer 0 is the embedding: where clean and ABC tokens agree, patching
    it is a no-op (0 when denoising, 1 when noising); at the names it is not."""
    _, ds, _, results = setup
    same = (ds.clean == ds.corrupted).all(0)
    assert same.sum() > 5 and (~same).sum() == 3  # only IO, S1 and S2 differ
    denoise, noise = results["denoise resid_pre"].values[0], results["noise resid_pre"].values[0]
    # a no-op patch runs other batch shapes than the baseline: equal up to rounding
    zeros, ones = torch.zeros(int(same.sum())), torch.ones(int(same.sum()))
    numerics.assert_close(denoise[same], zeros, what="no-op denoising cells", scale=scale)
    numerics.assert_close(noise[same], ones, what="no-op noising cells", scale=scale)
    assert (denoise[~same].abs() > 1e-3).any()


def test_joint_head_sweep_is_the_same_on_nnsight(setup, scale):
    hf, ds, metric, results = setup
    model = iv.wrap(hf, backend="nnsight")
    got = activation_patching(model, ds.clean, ds.corrupted, metric, site="z", heads=True,
                              direction="noise", positions="all", progress=False)  # fmt: skip
    numerics.assert_close(
        got.values, results["noise z@all"].values, what="nnsight vs torch sweep", scale=scale
    )


def test_smoke_run_on_the_bundled_model(tmp_path, capsys):
    summary = recipe["main"](["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out  # every expectation of --help holds on the smoke run
    assert summary["passed"] and "verdict: PASS (9 of 9 expectations hold)" in out, out
    hf = transformers.AutoModelForCausalLM.from_pretrained(ROOT / "models/ioi").eval()
    ds = recipe["dataset"](ioi.tokenizer(), summary["n"], 0, 0)
    with torch.no_grad():
        clean = ioi.logit_diff(hf(ds.clean).logits, ds).mean().item()
        corrupted = ioi.logit_diff(hf(ds.corrupted).logits, ds).mean().item()
    logits = numerics.magnitude(hf(ds.clean).logits.detach())  # LD is a difference of logits
    numerics.assert_close(summary["clean_logit_diff"], clean, what="clean LD", scale=logits)
    numerics.assert_close(
        summary["corrupted_logit_diff"], corrupted, what="corrupted LD", scale=logits
    )
    n_layers = hf.config.n_layer
    assert summary["values"]["denoise resid_pre"].shape == (n_layers, ds.clean.shape[1])
    assert summary["values"]["noise z@all"].shape == (n_layers, hf.config.n_head)
    assert len(summary["plots"]) == 12 and all(Path(p).stat().st_size > 0 for p in summary["plots"])
    assert all(torch.isfinite(v).all() for v in summary["values"].values())
    top = summary["strongest"][0]  # the first row is the strongest denoising resid_pre cell
    values = summary["values"]["denoise resid_pre"]
    assert (top["direction"], top["site"]) == ("denoise", "resid_pre")
    strongest = values.flatten()[values.abs().argmax()].item()
    assert top["metric"] == pytest.approx(strongest, abs=5e-5)  # the table rounds to 4 places


def test_bad_arguments_say_what_is_valid(capsys):
    with pytest.raises(SystemExit):
        recipe["parse_args"](["--head-positions", "S3"])
    assert "'S3' is not a role; choose among IO, S1, S1+1, S2, END" in capsys.readouterr().err

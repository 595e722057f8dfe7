"""The IOI recipe: smoke runs, the hand-built circuit, the bundled model, GPT-2 (if present)."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tests import numerics
from tracevene.tasks import ioi

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
RECIPE = runpy.run_path(str(ROOT / "recipes/ioi.py"), run_name="recipe")
MODELS = ROOT / "models"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The full run on the bundled models/ioi (shared by several tests)."""
    out = tmp_path_factory.mktemp("ioi")
    return RECIPE["main"](["--out", str(out)]), out


def _hf(path: Path | str) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")


def _reference(path: Path | str, n: int, seed: int) -> tuple[ioi.Dataset, torch.Tensor]:
    """The dataset and the model's own logits, computed without tracevene."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ds = ioi.make_dataset(tok, n=n, seed=seed)
    with torch.no_grad():
        return ds, _hf(path).eval()(ds.clean).logits


@pytest.mark.parametrize("backend", ["torch", "nnsight", "transformer_lens"])
def test_smoke_run_matches_the_plain_model(backend, tmp_path):
    summary = RECIPE["main"](["--smoke", "--backend", backend, "--out", str(tmp_path)])
    assert summary["passed"]  # every expectation of --help holds on the smoke run
    ds, logits = _reference(MODELS / "ioi", 32, 0)
    numerics.assert_close(
        summary["logit_diff"], ioi.logit_diff(logits, ds).mean().item(),
        what=f"LD on {backend} vs HF", scale=numerics.magnitude(logits),
    )  # fmt: skip
    assert summary["accuracy"] == pytest.approx(ioi.accuracy(logits, ds))
    assert all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in summary["plots"])
    assert {p.name for p in summary["plots"]} == {"ioi_path_patching.png", "ioi_attention.png"}


def test_hand_built_model_gives_exactly_the_planted_heads(tmp_path):
    planted = json.loads((MODELS / "ioi_circuit/circuit.json").read_text())
    planted = planted["heads"] if isinstance(planted, dict) else planted
    summary = RECIPE["main"](["--model", "ioi_circuit", "--smoke", "--out", str(tmp_path)])
    assert summary["passed"]  # the verdict checks the planted heads too
    assert sorted(summary["circuit"]) == sorted((h["layer"], h["head"], h["role"]) for h in planted)


def test_bundled_model_is_accurate(trained):
    summary, _ = trained
    assert summary["accuracy"] >= 0.95


def test_bundled_models_circuit_is_small_and_faithful(trained):
    summary, _ = trained
    assert 0 < len(summary["circuit"]) <= summary["n_heads"] // 2
    assert summary["circuit_kept"] >= 0.8
    assert summary["circuit_accuracy"] >= 0.9


def test_random_head_sets_keep_less_than_half_as_much(trained):
    summary, _ = trained
    assert summary["random_kept"] < summary["circuit_kept"] / 2  # of the logit difference


def test_random_head_sets_keep_less_than_half_the_accuracy(trained):
    summary, _ = trained
    assert summary["random_accuracy"] < summary["circuit_accuracy"] / 2


# The attention score that defines each role: (query position, key position).
DEFINING = {
    "name-mover": ("END", "IO"),
    "negative-name-mover": ("END", "IO"),
    "s-inhibition": ("END", "S2"),
    "s-suppression": ("END", "S2"),
    "duplicate-token": ("S2", "S1"),
    "induction": ("S2", "S1+1"),
}


def test_every_circuit_head_has_the_attention_of_its_role(trained):
    """Recomputed from Hugging Face's own attention weights (output_attentions)."""
    summary, _ = trained
    ds, _ = _reference(MODELS / "ioi", 256, 0)
    with torch.no_grad():
        attentions = _hf(MODELS / "ioi").eval()(ds.clean, output_attentions=True).attentions
    rows = torch.arange(len(ds))
    for layer, head, role in summary["circuit"]:
        assert role in RECIPE["ROLES"]
        pattern = attentions[layer][:, head]  # [batch, query, key]
        scores = {r: pattern[rows, ds.pos[q], ds.pos[k]].mean() for r, (q, k) in DEFINING.items()}
        if role == "previous-token":
            prev = pattern.diagonal(offset=-1, dim1=1, dim2=2)  # [batch, pos - 1]
            real = torch.arange(1, prev.shape[1] + 1) <= ds.pos["END"][:, None]
            assert prev[real].mean() >= 0.25, (layer, head, role)
        else:
            assert scores[role] >= 0.25, (layer, head, role, scores)
            assert scores[role] == max(scores.values()), (layer, head, role, scores)


def _mean_ablated_logit_diff(path: Path, keep: set, n: int, seed: int) -> float:
    """The ablation protocol with plain forward pre-hooks on GPT-2's output projections."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ds, model = ioi.make_dataset(tok, n=n, seed=seed), _hf(path).eval()
    blocks, n_heads = model.transformer.h, model.config.n_head
    z_abc: dict[int, torch.Tensor] = {}
    hooks = [
        b.attn.c_proj.register_forward_pre_hook(lambda m, a, i=i: z_abc.update({i: a[0]}))
        for i, b in enumerate(blocks)
    ]
    with torch.no_grad():
        model(ds.corrupted)
    for h in hooks:
        h.remove()

    def ablate(i: int, args: tuple) -> tuple:
        z = args[0].unflatten(-1, (n_heads, -1)).clone()
        means = z_abc[i].unflatten(-1, (n_heads, -1))
        for t in ds.template.unique():
            rows = ds.template == t
            for h in range(n_heads):
                if (i, h) not in keep:
                    z[rows, :, h] = means[rows, :, h].mean(0)
        return (z.flatten(-2),)

    hooks = [b.attn.c_proj.register_forward_pre_hook(lambda m, a, i=i: ablate(i, a))
             for i, b in enumerate(blocks)]  # fmt: skip
    try:
        with torch.no_grad():
            return ioi.logit_diff(model(ds.clean).logits, ds).mean().item()
    finally:
        for h in hooks:
            h.remove()


def test_the_ablation_protocol_matches_plain_hooks(trained):
    summary, _ = trained
    keep = {(layer, head) for layer, head, _ in summary["circuit"]}
    expected = _mean_ablated_logit_diff(MODELS / "ioi", keep, 256, 0)
    # a difference of mean-ablated logits (magnitude ~20 on the bundled model)
    _, logits = _reference(MODELS / "ioi", 256, 0)
    numerics.assert_close(
        summary["circuit_logit_diff"], expected, what="circuit LD vs plain hooks",
        scale=numerics.magnitude(logits),
    )  # fmt: skip


# -- GPT-2 small ------------------------------------------------------------------------------
PAPER = {
    "name-mover": [(9, 9), (9, 6), (10, 0)],
    "negative-name-mover": [(10, 7), (11, 10)],
    "s-inhibition": [(7, 3), (7, 9), (8, 6), (8, 10)],
}


def _gpt2_dir() -> str | None:
    """A local GPT-2 small: ``$TRACEVENE_GPT2``, else a Hugging Face cache hit, else None."""
    if os.environ.get("TRACEVENE_GPT2"):
        return os.environ["TRACEVENE_GPT2"]
    from huggingface_hub import try_to_load_from_cache

    for repo in ("openai-community/gpt2", "gpt2"):
        found = try_to_load_from_cache(repo, "config.json")
        if isinstance(found, str):
            return str(Path(found).parent)
    return None


def _top_heads(step_effect: torch.Tensor, k: int) -> set[tuple[int, int]]:
    order = step_effect.abs().flatten().argsort(descending=True)[:k]
    return {divmod(int(i), step_effect.shape[1]) for i in order}


def _run_on(path: str, tmp_path: Path, prompts: int) -> dict:
    return RECIPE["main"](["--model", path, "--prompts", str(prompts), "--random-sets", "2",
                           "--out", str(tmp_path)])  # fmt: skip


def test_gpt2_small_finds_the_papers_heads(tmp_path):
    path = _gpt2_dir()
    if path is None:
        pytest.skip("GPT-2 small is not available locally: set TRACEVENE_GPT2=/path/to/gpt2 "
                    "(a Hugging Face directory) or put gpt2 in the Hugging Face cache")  # fmt: skip
    summary = _run_on(path, tmp_path, 64)
    assert summary["logit_diff"] == pytest.approx(3.56, abs=0.4)
    steps = list(summary["steps"].values())
    movers = _top_heads(steps[0], 8)  # heads -> logits
    assert set(PAPER["name-mover"] + PAPER["negative-name-mover"]) <= movers
    assert set(PAPER["s-inhibition"]) <= _top_heads(steps[1], 8)  # -> name movers' queries


def test_a_gpt2_directory_loads_through_model(tmp_path):
    """The --model path of the GPT-2 test, on a small random GPT-2 saved to a directory."""
    tok = ioi.tokenizer()
    config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=len(tok), bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    summary = _run_on(str(tmp_path / "gpt2"), tmp_path / "out", 32)
    ds, logits = _reference(tmp_path / "gpt2", 32, 0)
    numerics.assert_close(
        summary["logit_diff"], ioi.logit_diff(logits, ds).mean().item(), what="LD vs HF",
        scale=numerics.magnitude(logits),
    )  # fmt: skip
    steps = list(summary["steps"].values())
    assert steps[0].shape == (2, 4)
    assert torch.isfinite(steps[0]).all() and steps[0].abs().max() > 0  # patching did something
    assert all(Path(p).is_file() for p in summary["plots"])

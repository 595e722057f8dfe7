"""recipes/causal_tracing.py: a smoke run (tests/test_patching_tracing.py checks the library)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
import transformers

import models
import tracevene as iv
from tracevene.patching import embedding_noise
from tracevene.tasks import ioi

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
recipe = runpy.run_path(str(ROOT / "recipes/causal_tracing.py"), run_name="recipe")


@pytest.fixture(scope="module")
def setup():
    """A small random GPT-2 over the IOI vocabulary, 4 prompts, their noise and metric."""
    hf = models.ioi_gpt2()
    model = iv.wrap(hf, backend="torch")
    ds = ioi.make_dataset(ioi.tokenizer(), n=4, seed=0, templates=[ioi.TEMPLATES[1]])
    subject = recipe["subject_positions"](ds, "names")
    noise = embedding_noise(model, ds.clean, subject, seed=0)
    return hf, model, ds, subject, noise, recipe["p_answer"](ds)


# -- tests ----------------------------------------------------------------------------------------
def test_the_subject_is_the_three_names(setup):
    _, _, ds, subject, noise, _ = setup
    rows = torch.arange(len(ds))
    assert set(ds.clean[rows[:, None], subject].flatten().tolist()) <= set(ds.name_ids.tolist())
    assert subject.shape == (4, 3) and noise.shape == (4, 3, 32)


def test_smoke_run_on_the_bundled_model(tmp_path, capsys):
    summary = recipe["main"](["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out  # every expectation of --help holds on the smoke run
    assert summary["passed"] and "verdict: PASS (9 of 9 expectations hold)" in out, out
    hf = transformers.AutoModelForCausalLM.from_pretrained(ROOT / "models/ioi").eval()
    ds = ioi.make_dataset(ioi.tokenizer(), n=summary["n"], seed=0, templates=[ioi.TEMPLATES[0]])
    assert summary["p_clean"] == pytest.approx(models.p_io(hf, ds), abs=1e-5)
    p = summary["values"]["resid_pre"]
    assert p.shape == (hf.config.n_layer, ds.clean.shape[1])
    # Positions before the first noised name see no noise: restoring them does nothing.
    first = int(ds.pos["IO"].min().clamp(max=ds.pos["S1"].min()))
    assert torch.allclose(p[:, :first], torch.full_like(p[:, :first], summary["p_corrupted"]),
                          atol=1e-5)  # fmt: skip
    assert len(summary["plots"]) == 3 and all(Path(f).stat().st_size > 0 for f in summary["plots"])
    top = summary["strongest"][0]
    assert top["p(IO)"] == pytest.approx(p.max().item())

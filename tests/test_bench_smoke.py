"""Smoke tests of the bench/ scripts: each runs in --quick mode and reports its figures.

No timing assertions (speed targets live in the benchmarks, as ratios); only that the
scripts run, print their tables, and that their variants compute the same numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numerics

BENCH = Path(__file__).resolve().parent.parent / "bench"

OVERHEAD_VARIANTS = (
    "plain forward",
    "save-only program",
    "interchange, by hand (2 forwards)",
    "interchange program (auto)",
    "interchange program (batched)",
    "record program (interchange)",
)
BACKEND_ROWS = [
    f"| {backend} | {variant} |"
    for backend in ("torch", "nnsight", "transformer_lens")
    for variant in (
        "save-only, tracevene",
        "save-only, by hand",
        "interchange, tracevene",
        "interchange, by hand (early stop)",
        "interchange, by hand (2 full runs)",
    )
] + ["| pyvene | interchange, IntervenableModel |"]
DAS_VARIANTS = (
    "tracevene | low-rank",
    "tracevene | full, cayley",
    "tracevene | full, matrix_exp",
    "pyvene | low-rank",
    "pyvene | full",
)
DAS_TRACEVENE = DAS_VARIANTS[:3]


def run_quick(script: str, tmp_path: Path) -> tuple[str, dict]:
    """Run ``bench/<script> --quick``; its stdout and the figures it wrote as JSON."""
    out = tmp_path / "figures.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(out.read_text())
    assert figures["config"]["quick"] is True
    return proc.stdout, figures


def test_overhead_quick_runs_and_prints_table(tmp_path: Path) -> None:
    text, figures = run_quick("overhead.py", tmp_path)
    assert "| variant | wall ms | x plain | CPU ms | x plain | target |" in text
    for name in OVERHEAD_VARIANTS:
        assert f"| {name} |" in text, text
    assert "machine:" in text and "threads" in text
    for clock in ("wall", "cpu"):
        assert set(OVERHEAD_VARIANTS) <= set(figures[clock]["median_ms"])
        assert {"save_only_pass", "interchange_pass"} <= set(figures[clock]["targets"])
    # The variants compute the same numbers (correctness, not speed).
    assert all(d <= numerics.MODEL for d in figures["max_err_ulps"].values()), figures
    assert "src1" in figures["plans"]["interchange program (auto)"]


def test_backends_quick_runs_and_prints_table(tmp_path: Path) -> None:
    text, figures = run_quick("backends.py", tmp_path)
    assert "| backend | variant | wall ms | CPU ms | x hand (wall) |" in text
    for row in BACKEND_ROWS:
        assert row in text, text
    assert "machine:" in text and "threads" in text
    for clock in ("wall", "cpu"):
        assert len(figures[clock]["median_ms"]) == len(BACKEND_ROWS)
    assert all(d <= numerics.MODEL for d in figures["max_err_ulps"].values()), figures


def test_das_quick_runs_and_reports_ratios(tmp_path: Path) -> None:
    text, figures = run_quick("das.py", tmp_path)
    assert "| library | variant | ms / step, epoch 1 | ms / step, later epochs |" in text
    for name in DAS_VARIANTS:
        assert f"| {name} |" in text, text
    assert "machine:" in text and "load average:" in text and "targets:" in text
    for clock in ("wall", "cpu"):
        for part in ("first_epoch", "later_epochs", "whole_run"):
            assert set(figures[clock][part]["examples_per_s"]) == set(DAS_VARIANTS)
            ratios = figures[clock][part]["speedup_vs_pyvene"]
            assert set(ratios) == set(DAS_TRACEVENE) and all(r > 0 for r in ratios.values())
    if sys.platform.startswith("linux"):  # peak RSS comes from /proc
        assert set(figures["memory"]["ratio_vs_pyvene"]) == set(DAS_TRACEVENE)
        per = figures["memory"]["per_variant"]
        assert all(per[v]["peak_increase_mib"] > 0 for v in DAS_VARIANTS), per
    # Same rotation, same numbers (correctness, not speed).
    checks = figures["checks"]
    assert all(d <= numerics.MODEL for d in checks["init_loss_err_ulps"].values()), checks
    assert checks["matrix_exp_pair_max_loss_err_ulps"] <= numerics.TRAINED, checks


def test_patching_quick_runs_and_reports_the_ratio(tmp_path: Path) -> None:
    text, figures = run_quick("patching.py", tmp_path)
    assert "| sweep | variant | wall s | CPU s | x TransformerLens (wall) |" in text
    for sweep, target in (("resid_pre", "10.0"), ("head_out_all_pos", "5.0")):
        assert f"| {sweep} | tracevene |" in text and f"| {sweep} | transformer_lens |" in text
        assert f"target {sweep}: >= {target}x" in text
        for clock in ("wall", "cpu"):
            assert figures[sweep][clock]["speedup"] > 0
        # the same sweep (correctness, not speed)
        assert figures[sweep]["max_err_ulps"] <= numerics.MODEL, figures[sweep]

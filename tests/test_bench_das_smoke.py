"""Smoke test of bench/das.py: it runs and reports its ratios (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "das.py"

VARIANTS = (
    "tracevene | low-rank",
    "tracevene | full, cayley",
    "tracevene | full, matrix_exp",
    "pyvene | low-rank",
    "pyvene | full",
)
TRACEVENE = VARIANTS[:3]


def test_das_quick_runs_and_reports_ratios(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "| library | variant | ms / step, epoch 1 | ms / step, later epochs |" in text
    for name in VARIANTS:
        assert f"| {name} |" in text, text
    assert "machine:" in text and "load average:" in text and "targets:" in text

    figures = json.loads(out.read_text())
    assert figures["config"]["quick"] is True
    for clock in ("wall", "cpu"):
        for part in ("first_epoch", "later_epochs", "whole_run"):
            assert set(figures[clock][part]["examples_per_s"]) == set(VARIANTS)
            ratios = figures[clock][part]["speedup_vs_pyvene"]
            assert set(ratios) == set(TRACEVENE) and all(r > 0 for r in ratios.values())
    if sys.platform.startswith("linux"):  # peak RSS comes from /proc
        assert set(figures["memory"]["ratio_vs_pyvene"]) == set(TRACEVENE)
        per = figures["memory"]["per_variant"]
        assert all(per[v]["peak_increase_mib"] > 0 for v in VARIANTS), per
    # Same rotation, same numbers (correctness, not speed).
    checks = figures["checks"]
    assert all(d < 1e-4 for d in checks["init_loss_abs_diff"].values()), checks
    assert checks["matrix_exp_pair_max_loss_diff_over_run"] < 1e-4, checks

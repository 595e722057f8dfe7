"""Smoke test of bench/overhead.py: it runs and prints its table (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "overhead.py"

VARIANTS = (
    "plain forward",
    "save-only program",
    "interchange, by hand (2 forwards)",
    "interchange program (auto)",
    "interchange program (batched)",
    "record program (interchange)",
)


def test_overhead_quick_runs_and_prints_table(tmp_path: Path) -> None:
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
    assert "| variant | wall ms | x plain | CPU ms | x plain | target |" in text
    for name in VARIANTS:
        assert f"| {name} |" in text, text
    assert "machine:" in text and "threads" in text

    figures = json.loads(out.read_text())
    for clock in ("wall", "cpu"):
        assert set(VARIANTS) <= set(figures[clock]["median_ms"])
        assert {"save_only_pass", "interchange_pass"} <= set(figures[clock]["targets"])
    assert figures["config"]["quick"] is True
    # The variants compute the same numbers (correctness, not speed).
    assert all(d < 1e-4 for d in figures["max_abs_diff"].values()), figures["max_abs_diff"]
    assert "src1" in figures["plans"]["interchange program (auto)"]

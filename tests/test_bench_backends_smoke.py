"""Smoke test of bench/backends.py: it runs and prints its table (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "backends.py"

ROWS = [
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


def test_backends_quick_runs_and_prints_table(tmp_path: Path) -> None:
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
    assert "| backend | variant | wall ms | CPU ms | x hand (wall) |" in text
    for row in ROWS:
        assert row in text, text
    assert "machine:" in text and "threads" in text

    figures = json.loads(out.read_text())
    assert figures["config"]["quick"] is True
    for clock in ("wall", "cpu"):
        assert len(figures[clock]["median_ms"]) == len(ROWS)
    # The variants compute the same numbers (correctness, not speed).
    assert all(d < 1e-4 for d in figures["max_abs_diff"].values()), figures["max_abs_diff"]

"""The recipes tell the truth: docs pages quote real runs, verdicts pass, no warnings.

* Each ``docs/recipes/*.md`` page marks the run it quotes with a comment
  ``<!-- run: python recipes/<name>.py [args] -->`` before a ```text block (only
  prose in between); the block must be what that command prints: the same text, and
  the same numbers up to one unit in the last printed digit (float noise across
  machines). Timings and output folders are the only things not compared.
* Every recipe's verdict (``recipes/common.py``: ``expectation | measured |
  PASS/FAIL``) passes, and a FAIL exits with status 1.
* The recipes print no warnings (run as ``python -W error``, stderr must be empty).
* The README's DAS example prints the numbers its comments quote.

Runs that take more than a few seconds are marked ``slow``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
PAGES = ROOT / "docs" / "recipes"
sys.path.insert(0, str(RECIPES))
import common  # noqa: E402

_RUN = re.compile(r"<!-- run: python recipes/(?P<name>\w+)\.py(?P<args>[^>]*?) -->"
                  r"(?:(?!```).)*?```text\n(?P<block>.*?)\n```", re.S)  # fmt: skip
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]\d+)?%?")
_TIMING = re.compile(r"(done in|Done in|\d+ s\.?$|; [\d.]+ s\.)")


def quoted_runs() -> list[tuple[str, str, list[str], str]]:
    """``(page, recipe, argv, block)`` for every marked run of every recipe page."""
    runs = []
    for page in sorted(PAGES.glob("*.md")):
        for m in _RUN.finditer(page.read_text()):
            runs.append((page.name, m["name"], m["args"].split(), m["block"]))
    return runs


def run_recipe(name: str, argv: list[str], out: Path) -> tuple[dict | int, str]:
    """Run ``recipes/<name>.py`` in this process; its return value and what it printed."""
    recipe = runpy.run_path(str(RECIPES / f"{name}.py"), run_name="recipe")
    buffer = io.StringIO()
    extra = ["--out", str(out)] if name != "quickstart" else []
    with contextlib.redirect_stdout(buffer):
        result = recipe["main"]([*argv, *extra])
    return result, buffer.getvalue().replace(str(out), "out")


def _numbers_match(quoted: str, measured: str) -> bool:
    """Equal, or differ by at most one unit in the last printed digit."""
    if quoted == measured:
        return True
    q, m = quoted.rstrip("%"), measured.rstrip("%")
    decimals = len(q.split(".")[1].split("e")[0]) if "." in q else 0
    try:
        return abs(float(q) - float(m)) <= 1.01 * 10.0**-decimals
    except ValueError:
        return False


def mismatches(block: str, output: str) -> list[str]:
    """How ``block`` (a page's quoted run) differs from ``output`` (a fresh run).

    The block must appear in the output as consecutive lines, starting at the block's
    first line; timing lines are skipped; numbers may differ in their last digit.
    """
    quoted = [line.rstrip() for line in block.splitlines() if not _TIMING.search(line)]
    lines = [line.rstrip() for line in output.splitlines() if not _TIMING.search(line)]
    shapes = [_NUMBER.sub("#", line) for line in lines]
    if _NUMBER.sub("#", quoted[0]) not in shapes:
        return [f"the run never prints the block's first line {quoted[0]!r}"]
    start = shapes.index(_NUMBER.sub("#", quoted[0]))
    got = lines[start : start + len(quoted)]
    problems = []
    for i, (want, have) in enumerate(zip(quoted, got + [""] * len(quoted), strict=False)):
        same_text = _NUMBER.sub("#", want) == _NUMBER.sub("#", have)
        pairs = zip(_NUMBER.findall(want), _NUMBER.findall(have), strict=False)
        if not same_text or not all(_numbers_match(q, m) for q, m in pairs):
            problems.append(f"line {i + 1}:\n  page: {want}\n  run:  {have}")
    return problems


def _slow(name: str, argv: list[str]) -> bool:
    return not (name == "causal_tracing" and not argv) and "--smoke" not in argv


RUNS = quoted_runs()


def test_every_recipe_page_quotes_a_marked_run():
    pages = {page for page, *_ in RUNS}
    assert pages == {p.name for p in PAGES.glob("*.md")}, pages


@pytest.mark.parametrize(
    ("page", "name", "argv", "block"),
    [pytest.param(*r, marks=[pytest.mark.slow] if _slow(r[1], r[2]) else [],
                  id=f"{r[0]}:{' '.join([r[1], *r[2]])}") for r in RUNS],
)  # fmt: skip
def test_page_quotes_a_run(page, name, argv, block, tmp_path):
    summary, output = run_recipe(name, argv, tmp_path)
    problems = mismatches(block, output)
    assert not problems, f"docs/recipes/{page} does not match the run:\n" + "\n".join(problems)
    assert "verdict: PASS" in output and summary["passed"]


def test_the_comparison_catches_a_changed_number():
    block = "p(IO) at END: clean 0.993, corrupted 0.073\nDone in 5.5 s."
    assert not mismatches(block, "x\np(IO) at END: clean 0.994, corrupted 0.073\nDone in 9 s.")
    assert mismatches(block, "p(IO) at END: clean 0.980, corrupted 0.073")
    assert mismatches(block, "p(IO) at END: clean 0.993, corrupted 0.073 (!)")


# -- the verdict ------------------------------------------------------------------------------
def test_verdict_prints_a_table_and_says_whether_all_pass(capsys):
    checks = [common.check("x >= 0.5", 0.75, True), common.check("name is 0.1", "0.2", False)]
    assert common.verdict(checks[:1]) is True
    assert "verdict: PASS (1 of 1 expectations hold)" in capsys.readouterr().out
    assert common.verdict(checks) is False
    out = capsys.readouterr().out
    assert re.search(r"x >= 0\.5\s+0\.750\s+PASS", out)
    assert re.search(r"name is 0\.1\s+0\.2\s+FAIL", out)
    assert "verdict: FAIL (1 of 2 expectations fail: name is 0.1)" in out
    common.finish(True)
    with pytest.raises(SystemExit) as exit_:
        common.finish(False)
    assert exit_.value.code == 1


def test_other_models_state_no_expectations(capsys):
    assert common.verdict([]) is True
    assert "verdict: no expectations stated for this model" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["ioi", "activation_patching", "causal_tracing",
                                  "path_patching", "das", "quickstart"])  # fmt: skip
def test_help_states_expectations_and_the_exit_status(name, capsys):
    recipe = runpy.run_path(str(RECIPES / f"{name}.py"), run_name="recipe")
    with pytest.raises(SystemExit):
        recipe["main"](["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "What to expect" in text and "verdict" in text
    assert "exit status is 1" in text or "exits with status 1" in text
    assert not re.search(r"\b(about|takes) [\d-]+ ?(s|seconds)\b", text), "unmeasured timing"


def test_path_patching_help_gives_the_default_repeat_length(capsys):
    recipe = runpy.run_path(str(RECIPES / "path_patching.py"), run_name="recipe")
    with pytest.raises(SystemExit):
        recipe["main"](["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "2 to 8" not in text and "both default to 8" in text


def test_activation_patching_help_describes_the_bundled_model(capsys):
    recipe = runpy.run_path(str(RECIPES / "activation_patching.py"), run_name="recipe")
    with pytest.raises(SystemExit):
        recipe["main"](["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "4 layers x 4 heads" in text and "2-layer" not in text and "1.0" not in text


# -- no warnings --------------------------------------------------------------------------------
SMOKE = {"ioi": ["--smoke"], "activation_patching": ["--smoke"], "causal_tracing": ["--smoke"],
         "path_patching": ["--smoke"], "das": ["--smoke"], "quickstart": []}  # fmt: skip


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n == "path_patching" else [pytest.mark.slow])
             for n in SMOKE],
)  # fmt: skip
def test_recipe_prints_no_warning(name, tmp_path):
    """``python -W error recipes/<name>.py --smoke``: exit 0, a passing verdict, empty stderr
    (no Python warning, no transformers log line, no progress bar)."""
    extra = [] if name == "quickstart" else ["--out", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "error"}
    done = subprocess.run(
        [sys.executable, "-W", "error", str(RECIPES / f"{name}.py"), *SMOKE[name], *extra],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "verdict: PASS" in done.stdout
    assert done.stderr == "", done.stderr[-3000:]


# -- the README ---------------------------------------------------------------------------------
def test_readme_das_example_prints_what_its_comments_say():
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "RotatedSpace" in b)
    expected = [c.strip() for c in re.findall(r"^print\(.*\)  # (.*)$", block, re.M)]
    assert len(expected) == 3
    namespace = {"__name__": "__main__"}
    exec("import torch\nimport tracevene as iv", namespace)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(block, "README.md", "exec"), namespace)
    printed = buffer.getvalue().splitlines()
    for want, line in zip(expected, printed, strict=True):
        assert line.endswith(want), (want, line)
    after = float(printed[-1].split()[-1])
    assert after >= 0.95 and after > float(printed[0].split()[-1]) + 0.3, printed
    torch.manual_seed(0)

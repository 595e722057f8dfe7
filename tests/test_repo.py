"""Repository hygiene: README quickstart, CI script and packaging metadata agree."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
PYPROJECT = ROOT / "pyproject.toml"

DEMO_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[recipes]" && python recipes/ioi.py'
TEST_COMMAND = (
    'pip install torch==2.13.0 && pip install -e ".[dev]" && HF_HUB_OFFLINE=1 python -m pytest -q'
)


def _quickstart_commands() -> list[str]:
    """The shell commands of the first code block in README's Quickstart section."""
    text = README.read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings and headings[0].strip() == "Quickstart", (
        f"README.md must open with a '## Quickstart' section; its first sections are {headings[:3]}"
    )
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```(?:bash|sh|shell|console)?\n(.*?)^```", section, re.DOTALL | re.M)
    assert block, "README.md's Quickstart section has no code block"
    lines = [line.strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _ci_commands() -> list[str]:
    """The non-comment lines of .ci/run, stripped."""
    lines = [line.strip() for line in CI.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_quickstart_is_exactly_the_two_commands():
    assert _quickstart_commands() == [DEMO_COMMAND, TEST_COMMAND]


def test_readme_quickstart_comes_right_after_the_intro():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# "), "README.md must start with a title"
    body = [line for line in lines[1:] if line.strip()]
    assert body[1] == "## Quickstart", (
        "README.md: the title and one sentence must be followed directly by '## Quickstart'"
    )


def test_ci_runs_the_readme_test_command_in_order():
    ci = _ci_commands()
    steps = [step.strip() for step in TEST_COMMAND.split("&&")]
    positions = []
    for step in steps:
        hits = [i for i, line in enumerate(ci) if line == step or line.startswith(step + " ")]
        assert hits, f".ci/run does not run the README test step {step!r}"
        positions.append(hits[0])
    assert positions == sorted(positions), (
        f".ci/run must run the README test steps in the README's order: {steps}"
    )


def test_ci_is_strict_and_rejects_an_empty_test_run():
    ci = _ci_commands()
    assert "set -euo pipefail" in ci
    assert any("venv" in line and "-m venv" in line for line in ci), ".ci/run must use a fresh venv"
    assert "ruff check ." in ci
    assert any(line.startswith("mkdocs build --strict") for line in ci)
    pytest_line = next(line for line in ci if "python -m pytest" in line)
    assert "-p no:cacheprovider" in pytest_line
    assert any(re.search(r"\$rc\"? -eq 5", line) for line in ci), (
        ".ci/run must treat pytest's exit code 5 (no tests collected) as a failure"
    )


def test_dev_extra_is_pinned_and_py_typed_is_shipped():
    meta = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    project = meta["project"]
    assert project["name"] == "tracevene"
    assert project["requires-python"] == ">=3.11"
    unpinned = [req for req in project["optional-dependencies"]["dev"] if "==" not in req]
    assert not unpinned, f"the dev extra must pin exact versions; unpinned: {unpinned}"
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["tracevene"]
    assert (ROOT / "tracevene" / "py.typed").is_file()

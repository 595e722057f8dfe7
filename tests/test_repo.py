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


def test_ci_type_checks_the_package_with_the_pinned_checker():
    ci = _ci_commands()
    assert "basedpyright" in ci, ".ci/run must run the type checker (a plain `basedpyright` line)"
    install = next(i for i, line in enumerate(ci) if line.startswith("pip install -e"))
    assert ci.index("basedpyright") > install, ".ci/run must type check after the install"
    meta = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    dev = meta["project"]["optional-dependencies"]["dev"]
    assert any(req.startswith("basedpyright==") for req in dev), "pin basedpyright in dev"
    config = meta["tool"]["basedpyright"]
    assert config["include"] == ["tracevene"], "the type checker must cover the package"
    assert config["typeCheckingMode"] in ("basic", "standard", "strict", "recommended", "all")
    readme = README.read_text(encoding="utf-8").split("## Development", 1)[1]
    assert "basedpyright" in readme, "README's Development section must name the type check"


def test_dev_extra_is_pinned_and_py_typed_is_shipped():
    meta = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    project = meta["project"]
    assert project["name"] == "tracevene"
    assert project["requires-python"] == ">=3.11"
    unpinned = [req for req in project["optional-dependencies"]["dev"] if "==" not in req]
    assert not unpinned, f"the dev extra must pin exact versions; unpinned: {unpinned}"
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["tracevene"]
    assert (ROOT / "tracevene" / "py.typed").is_file()


def _ci_statements() -> list[str]:
    """.ci/run's commands with backslash-continued lines joined."""
    joined = re.sub(r"\\\n\s*", " ", CI.read_text(encoding="utf-8"))
    lines = [line.strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_ci_runs_the_numeric_core_on_a_second_kernel_path():
    second = [line for line in _ci_statements() if line.startswith("ATEN_CPU_CAPABILITY=default")]
    assert second and "python -m pytest" in second[0], (
        ".ci/run must rerun the numeric core with ATEN_CPU_CAPABILITY=default"
    )
    for core in ("test_conformance.py", "test_sites.py", "test_patching.py"):
        assert f"tests/{core}" in second[0], f"the second kernel path must run tests/{core}"


def test_ci_runs_the_readme_demo_in_its_own_venv_with_smoke():
    ci = _ci_statements()
    assert '"$PYTHON" -m venv "$WORK/demo"' in ci, ".ci/run must make a fresh venv for the demo"
    *installs, run = [step.strip() for step in DEMO_COMMAND.split("&&")]
    for step in installs:  # the README's installs, with the [recipes] extra unpinned
        pip_args = step.removeprefix("pip ")
        assert f'"$WORK/demo/bin/pip" {pip_args}' in ci, f"the demo venv must run {step!r}"
    script = run.removeprefix("python ")
    assert any(
        line.startswith(f'HF_HUB_OFFLINE=1 "$WORK/demo/bin/python" {script} --smoke')
        for line in ci
    ), f".ci/run must run {script} --smoke in the demo venv"

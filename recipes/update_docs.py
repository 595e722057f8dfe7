"""Regenerate the runs quoted by docs/recipes/*.md, and their figures, from real runs.

Each page marks a quoted run with ``<!-- run: python recipes/<name>.py [args] -->``
before a ```text block
(only prose in between). This script runs every marked command (``python -W
error``, plots into a temporary folder), replaces the block with what it printed, and
copies the figures the pages show (``img/<file>.png``) into docs/recipes/img/.
``tests/test_recipe_docs.py`` checks that each block matches a fresh run.

Run:  python recipes/update_docs.py [--only ioi.md ...]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "docs" / "recipes"
RUN = re.compile(r"(<!-- run: python (?P<cmd>recipes/\w+\.py[^>]*?) -->(?:(?!```).)*?```text\n)"
                 r"(.*?)(\n```)", re.S)  # fmt: skip


def run(command: str, out: Path) -> str:
    """What ``python -W error <command> --out <out>`` prints, with ``out`` shown as ``out``."""
    args = command.split()
    extra = [] if args[0].endswith("quickstart.py") else ["--out", str(out)]
    done = subprocess.run([sys.executable, "-W", "error", *args, *extra], cwd=ROOT,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0 or done.stderr:
        raise SystemExit(f"{command}: exit {done.returncode}\n{done.stderr}")
    return done.stdout.replace(str(out), "out").rstrip("\n")


def replace_blocks(text: str, outputs: dict[str, str]) -> str:
    """``text`` with each marked block replaced by ``outputs[command]`` (if given)."""

    def block(m: re.Match) -> str:
        command = m["cmd"].strip()
        return m[1] + outputs[command] + m[4] if command in outputs else m[0]

    return RUN.sub(block, text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=None, help="page names (default: all)")
    args = p.parse_args(argv)
    for page in sorted(PAGES.glob("*.md")):
        if args.only and page.name not in args.only:
            continue
        text = page.read_text()
        with tempfile.TemporaryDirectory() as tmp:
            outputs, folders = {}, []
            for i, m in enumerate(RUN.finditer(text)):
                command = m["cmd"].strip()
                print(f"{page.name}: {command}", flush=True)
                folders.append(Path(tmp) / str(i))
                outputs[command] = run(command, folders[-1])
            for image in re.findall(r"\(img/([\w.-]+\.png)\)", text):
                made = [f / image for f in folders if (f / image).is_file()]
                if made:  # from the first run that makes it
                    shutil.copy(made[0], PAGES / "img" / image)
        page.write_text(replace_blocks(text, outputs))


if __name__ == "__main__":
    main()

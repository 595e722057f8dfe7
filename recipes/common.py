"""What every recipe shares: its command line, loading a model, tables and output files.

A recipe is a script ``recipes/<name>.py`` with ``main(argv=None) -> dict`` (the
summary it printed, for tests) and these options: ``--smoke`` (a few seconds, for CI),
``--model`` (a Hugging Face causal LM directory or hub id; default the bundled model),
``--backend`` (``torch``, ``nnsight`` or ``transformer_lens``), ``--out`` (where plots
go) and ``--seed``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import tracevene as iv

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"  # the bundled checkpoints, each with the script that made it
BACKENDS = ("torch", "nnsight", "transformer_lens")


def parser(
    description: str, default_model: str | None, model_help: str | None = None
) -> argparse.ArgumentParser:
    """An argument parser with the options every recipe takes.

    Args:
        description: The recipe's docstring (shown by ``--help``).
        default_model: The bundled model used when ``--model`` is not given.
        model_help: ``--model``'s help text, for recipes whose model is not a causal LM.
    """
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="a few seconds' run, for CI")
    p.add_argument(
        "--model",
        default=default_model,
        help=model_help
        or "a Hugging Face causal LM: a local directory or a hub id "
        f"(default: the bundled {default_model})",
    )
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="default: torch")
    p.add_argument("--out", type=Path, default=Path("out"), help="folder for plots (default: out)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return p


def model_path(name_or_path: str) -> str:
    """A bundled model's directory for a bare name (``"ioi"``), else the argument."""
    bundled = MODELS / name_or_path
    return str(bundled) if "/" not in name_or_path and bundled.is_dir() else name_or_path


def load(name_or_path: str, backend: str) -> tuple[iv.Model, Any]:
    """A causal LM and its tokenizer (``None`` if it has none), wrapped for ``backend``.

    ``name_or_path`` is a bundled model's name, a local directory or a hub id
    (hub ids need network access; set ``HF_HUB_OFFLINE=1`` to be sure none is tried).
    """
    try:
        model = iv.load(model_path(name_or_path), backend=backend)
    except OSError as e:
        raise SystemExit(
            f"cannot load --model {name_or_path!r}: {e}\nGive a local directory with a "
            f"Hugging Face causal LM (config.json, weights, tokenizer) or a bundled model: "
            f"{', '.join(sorted(p.name for p in MODELS.iterdir() if p.is_dir()))}."
        ) from e
    return model, model.tokenizer


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table; floats with 3 decimals."""
    cells = [[_cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float | torch.Tensor):
        return f"{float(value):.3f}"
    return str(value)


def out_file(out: Path, name: str) -> Path:
    """``out / name``, creating ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    return out / name

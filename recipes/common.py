"""What every recipe shares: its command line, loading a model, tables and output files.

A recipe is a script ``recipes/<name>.py`` with ``main(argv=None) -> dict`` (the
summary it printed, for tests) and these options: ``--smoke`` (a short run, for CI),
``--model`` (a Hugging Face causal LM directory or hub id; default the bundled model),
``--backend`` (``torch``, ``nnsight`` or ``transformer_lens``), ``--out`` (where plots
go) and ``--seed``.

Every recipe ends with a *verdict* (:func:`verdict`): each expectation its help text
states, the value the run measured, and PASS or FAIL. A recipe whose expectations
all pass exits with status 0; one with a FAIL prints everything as usual and then
exits with status 1 (:func:`finish`), so a recipe that stops telling the truth
breaks CI. Expectations are about the bundled default model: on another ``--model``
the recipe states none and exits 0.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import tracevene as iv
from tracevene.runtime.engine import require_installed

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"  # the bundled checkpoints, each with the script that made it
BACKENDS = ("torch", "nnsight", "transformer_lens")


class _Parser(argparse.ArgumentParser):
    """An argument parser that stops early when the chosen ``--backend`` is not installed."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, rest = super().parse_known_args(args, namespace)
        require_backend(self, getattr(parsed, "backend", None))
        return parsed, rest


def require_backend(p: argparse.ArgumentParser, backend: str | None) -> None:
    """Exit with status 2 and one line naming the pip extra if ``backend`` is missing."""
    if backend is None:
        return
    try:
        require_installed(backend)
    except iv.BackendError as e:
        p.exit(2, f"{p.prog}: error: --backend {backend}: {e}\n")


def parser(
    description: str, default_model: str | None, model_help: str | None = None
) -> argparse.ArgumentParser:
    """An argument parser with the options every recipe takes.

    Args:
        description: The recipe's docstring (shown by ``--help``).
        default_model: The bundled model used when ``--model`` is not given.
        model_help: ``--model``'s help text, for recipes whose model is not a causal LM.
    """
    p = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--smoke", action="store_true", help="a short run (fewer prompts or steps), for CI"
    )
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


def quiet_transformers() -> None:
    """No progress bars from transformers while a recipe loads its model."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


def model_path(name_or_path: str) -> str:
    """A bundled model's directory for a bare name (``"ioi"``), else the argument."""
    bundled = MODELS / name_or_path
    return str(bundled) if "/" not in name_or_path and bundled.is_dir() else name_or_path


def is_bundled(name_or_path: str, name: str) -> bool:
    """Whether ``--model`` names the bundled model ``name`` (by name or by its directory)."""
    return Path(model_path(name_or_path)).resolve() == (MODELS / name).resolve()


def load(name_or_path: str, backend: str) -> tuple[iv.Model, Any]:
    """A causal LM and its tokenizer (``None`` if it has none), wrapped for ``backend``.

    ``name_or_path`` is a bundled model's name, a local directory or a hub id
    (hub ids need network access; set ``HF_HUB_OFFLINE=1`` to be sure none is tried).
    """
    quiet_transformers()
    try:
        model = iv.load(model_path(name_or_path), backend=backend)
    except OSError as e:
        raise SystemExit(
            f"cannot load --model {name_or_path!r}: {e}\nGive a local directory with a "
            f"Hugging Face causal LM (config.json, weights, tokenizer) or a bundled model: "
            f"{', '.join(sorted(p.name for p in MODELS.iterdir() if p.is_dir()))}."
        ) from e
    _no_pad_check(model.module)
    return model, model.tokenizer


def _no_pad_check(module: Any) -> None:
    """Turn off transformers' "pass an attention mask" check for BOS-is-pad models.

    The check looks for the pad id in the first and last column of ``input_ids``; in
    the bundled models (and GPT-2) the pad id is also BOS, so every prompt trips it.
    The recipes' prompts are right-padded, and every position a recipe reads (END and
    before) comes before any padding, which causal attention never looks ahead to: no
    mask is needed, and the patching functions take token ids only. The pad id is only
    read by that check here (nothing is generated or classified), so clearing it
    changes no number.
    """
    config = getattr(module, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is not None and pad in (getattr(config, "bos_token_id", None),
                                   getattr(config, "eos_token_id", None)):  # fmt: skip
        config.pad_token_id = None


def table(
    rows: Sequence[Sequence[Any]], header: Sequence[str], align_left: Sequence[int] = ()
) -> str:
    """A plain-text table; floats with 3 decimals; columns right-aligned except ``align_left``."""
    cells = [[_cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i in align_left else c.rjust(w)
                  for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]  # fmt: skip
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


@dataclass(frozen=True)
class Check:
    """One expectation a recipe states, what the run measured, and whether it holds."""

    expectation: str
    measured: Any
    passed: bool


def check(expectation: str, measured: Any, passed: Any) -> Check:
    """A :class:`Check`; ``passed`` is converted with ``bool``."""
    return Check(expectation, measured, bool(passed))


def verdict(checks: Sequence[Check]) -> bool:
    """Print the verdict table ``expectation | measured | PASS/FAIL``; True if all pass.

    The last line is ``verdict: PASS (n of n expectations hold)`` or ``verdict: FAIL
    (k of n expectations fail: ...)``, for scripts and tests to grep.
    """
    print("\nVerdict: each expectation stated in this recipe's --help, against this run.")
    if not checks:
        print("verdict: no expectations stated for this model")
        return True
    rows = [(c.expectation, _cell(c.measured).replace("-0.000", "0.000"),
             "PASS" if c.passed else "FAIL") for c in checks]  # fmt: skip
    print(table(rows, ("expectation", "measured", "verdict"), align_left=(0,)))
    failed = [c.expectation for c in checks if not c.passed]
    if failed:
        print(f"verdict: FAIL ({len(failed)} of {len(checks)} expectations fail: "
              f"{'; '.join(failed)})")  # fmt: skip
    else:
        print(f"verdict: PASS ({len(checks)} of {len(checks)} expectations hold)")
    return not failed


def finish(passed: bool) -> None:
    """Exit with status 1 when the verdict failed (after everything was printed)."""
    if not passed:
        raise SystemExit(1)

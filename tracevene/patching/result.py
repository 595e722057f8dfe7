"""Labelled results of patching experiments, with a heatmap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor


@dataclass
class PatchResult:
    """The metric of every patched cell, with its axes named.

    Attributes:
        values: The metric per cell, e.g. ``[layer, pos]`` or ``[layer, pos, head]``.
        axes: Names of the axes of ``values``.
        site: The patched site (``"resid_pre"``, ``"attn.z"``, ...).
        direction: ``"denoise"`` (clean values into the corrupted run) or ``"noise"``.
    """

    values: Tensor
    axes: tuple[str, ...]
    site: str
    direction: str

    def plot(self, path: str | Path | None = None, title: str | None = None) -> Any:
        """A heatmap (layer x position; heads side by side); saved as PNG to ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values = self.values if self.values.dim() == 2 else self.values.flatten(1)
        fig, ax = plt.subplots(figsize=(1 + 0.5 * values.shape[1], 1 + 0.4 * values.shape[0]))
        image = ax.imshow(values.float().numpy(), cmap="RdBu_r", aspect="auto")
        ax.set_ylabel(self.axes[0])
        ax.set_xlabel(" x ".join(self.axes[1:]))
        ax.set_title(title or f"activation patching ({self.direction}): {self.site}")
        fig.colorbar(image, ax=ax)
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return fig

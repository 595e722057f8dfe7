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
        method: What measured it (``"activation patching"``, ``"path patching"``, ...).
    """

    values: Tensor
    axes: tuple[str, ...]
    site: str
    direction: str
    method: str = "activation patching"

    def plot(self, path: str | Path | None = None, title: str | None = None) -> Any:
        """A heatmap (layer x position; heads side by side), or bars for a 1-D result.

        Saved as PNG to ``path`` when given; returns the matplotlib figure.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values = self.values.detach().float().cpu()
        if values.dim() == 1:
            fig, ax = plt.subplots(figsize=(1 + 0.5 * len(values), 3))
            ax.bar(range(len(values)), values.numpy())
            ax.set_xlabel(self.axes[0])
        else:
            values = values if values.dim() == 2 else values.flatten(1)
            size = (1 + 0.5 * values.shape[1], 1 + 0.4 * values.shape[0])
            fig, ax = plt.subplots(figsize=size)
            m = float(values.abs().max()) or 1.0  # white at 0, symmetric colours
            image = ax.imshow(values.numpy(), cmap="RdBu_r", aspect="auto", vmin=-m, vmax=m)
            ax.set_yticks(range(values.shape[0]))
            if values.shape[1] <= 40:
                ax.set_xticks(range(values.shape[1]))
            ax.set_ylabel(self.axes[0])
            ax.set_xlabel(" x ".join(self.axes[1:]))
            fig.colorbar(image, ax=ax)
        ax.set_title(title or f"{self.method} ({self.direction}): {self.site}")
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return fig

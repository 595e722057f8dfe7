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

    def plot(
        self,
        path: str | Path | None = None,
        title: str | None = None,
        center: float = 0.0,
        label: str | None = None,
        cmap: str = "RdBu_r",
    ) -> Any:
        """A heatmap (layer x position; heads side by side), or bars for a 1-D result.

        The heatmap's diverging colours are white at ``center`` (the value of "nothing
        changed": 0 for differences, 1 for a fraction kept) and symmetric around it,
        with a colour bar (titled ``label``). A heatmap whose cells are all equal says
        so in the plot instead of stretching a rounding-error range over the colours.
        Saved as PNG to ``path`` when given; returns the matplotlib figure.

        Args:
            path: Where to save the figure as PNG (not saved when ``None``).
            title: The figure's title (default: method, direction and site).
            center: The value drawn white, the middle of the diverging colours.
            label: The colour bar's title.
            cmap: A diverging matplotlib colour map.

        Returns:
            The matplotlib ``Figure``.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values = self.values.detach().float().cpu()
        if values.dim() == 1:
            fig, ax = plt.subplots(figsize=(1 + 0.5 * len(values), 3), layout="constrained")
            ax.bar(range(len(values)), values.numpy())
            ax.set_xlabel(self.axes[0])
        else:
            values = values if values.dim() == 2 else values.flatten(1)
            size = (2.5 + 0.5 * values.shape[1], 1.5 + 0.4 * values.shape[0])
            fig, ax = plt.subplots(figsize=size, layout="constrained")
            spread = float((values - center).abs().max())
            low, high = float(values.min()), float(values.max())
            constant = high - low <= 1e-6 * max(1.0, abs(low), abs(high))
            m = spread if spread > 1e-6 else 1.0
            image = ax.imshow(
                values.numpy(), cmap=cmap, aspect="auto", vmin=center - m, vmax=center + m
            )
            if constant:
                ax.text(
                    (values.shape[1] - 1) / 2, (values.shape[0] - 1) / 2,
                    f"constant: every cell is {low:.4g} (within 1e-6)", ha="center", va="center",
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "grey"},
                )  # fmt: skip
            ax.set_yticks(range(values.shape[0]))
            if values.shape[1] <= 40:
                ax.set_xticks(range(values.shape[1]))
            ax.set_ylabel(self.axes[0])
            ax.set_xlabel(" x ".join(self.axes[1:]))
            bar = fig.colorbar(image, ax=ax)
            if label:
                bar.set_label(label)
        ax.set_title(title or f"{self.method} ({self.direction}): {self.site}")
        if path is not None:
            fig.savefig(path, dpi=120)
        plt.close(fig)
        return fig

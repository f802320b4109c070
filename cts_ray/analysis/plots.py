"""Figures: one size and style for every plot, so reports look alike and tests know the size."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")   # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

SIZE = (8.0, 5.0)       # inches
DPI = 100               # -> 800 x 500 pixels
PIXELS = (int(SIZE[0] * DPI), int(SIZE[1] * DPI))
DENSITY_LABEL = "density (% of prunable weights kept, log scale)"


def figure(ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=SIZE, dpi=DPI, layout="constrained", squeeze=False)
    return fig, list(axes[0])


def save(fig, path) -> str:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return str(path)


def density_axis(ax, densities) -> None:
    """Log-density x axis with ticks at ``densities`` (the targets), written as percentages."""
    ax.set_xscale("log")
    ticks = sorted(set(densities))
    ax.set_xticks(ticks, [f"{100 * d:.3g}" for d in ticks], rotation=0)
    ax.minorticks_off()
    ax.set_xlabel(DENSITY_LABEL)
    ax.invert_xaxis()   # sparser to the right, as in the lottery-ticket papers

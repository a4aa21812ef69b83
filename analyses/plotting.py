"""Figure conventions shared by the analyses: headless backend, seaborn theme, PNG + SVG output."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; no display is assumed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from forward_influence.outputs import atomic_path  # noqa: E402


def theme() -> None:
    sns.set_theme(context="notebook", style="whitegrid")


def distinct_palette(names: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """A colour per name, no two alike: the colour-blind palette while its ten colours suffice, then
    tab20's twenty, then evenly spaced hues (a sweep of thirteen policies would otherwise repeat three)."""
    names = list(dict.fromkeys(names))
    palette = "colorblind" if len(names) <= 10 else "tab20" if len(names) <= 20 else "husl"
    return dict(zip(names, sns.color_palette(palette, len(names))))


def save_figure(fig: plt.Figure, path: str | Path) -> list[Path]:
    """Save `fig` as PNG and SVG next to each other (`path` without or with either suffix)."""
    base = Path(path).with_suffix("")
    written = []
    for suffix in (".png", ".svg"):
        target = base.with_suffix(suffix)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=suffix[1:], dpi=150, bbox_inches="tight")
        written.append(target)
    plt.close(fig)
    return written


def overlap_heatmap(ax, matrix, labels: list[str], label: str) -> None:
    """A Jaccard-overlap matrix drawn as an annotated heatmap on [0, 1] (the analyses' shared view)."""
    sns.heatmap(
        matrix,
        annot=True,
        fmt=".2f",
        vmin=0,
        vmax=1,
        cmap="viridis",
        ax=ax,
        xticklabels=labels,
        yticklabels=labels,
        cbar_kws=dict(label=label),
    )


def weights_heatmap(ax, content: dict, label: str) -> None:
    """A fitted policy's weights (`learned`, `distilled`: ``content["weights"]``, the bands' vectors one
    after the other) as a heatmap centred on zero: one row per band of layers, one column per signal."""
    bands, layers, features = content["bands"], content["layers"], content["features"]
    weights = np.array(content["weights"]).reshape(bands, len(features))
    names = (
        ["all layers"]
        if bands == 1
        else [f"full layer {b + 1}" for b in range(bands)]
        if bands == layers
        else [f"band {b + 1} of {bands}" for b in range(bands)]
    )
    limit = float(np.abs(weights).max()) or 1.0
    sns.heatmap(
        pd.DataFrame(weights, index=names, columns=features),
        annot=bands <= 6,
        fmt=".2f",
        cmap="vlag",
        vmin=-limit,
        vmax=limit,
        ax=ax,
        cbar_kws=dict(label=label),
    )
    ax.tick_params(axis="x", rotation=40)
    ax.tick_params(axis="y", rotation=0)


def weights_figure_height(bands: int) -> float:
    """Inches of a `weights_heatmap` of `bands` rows: annotated rows while few, thin ones beyond six."""
    return 1.6 + 0.6 * min(bands, 6) + 0.15 * max(bands - 6, 0)

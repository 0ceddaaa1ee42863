"""Figures shared by evaluation and the annotation report: the valence/arousal plane and its quadrants.

Input: (valence, arousal) points (unitless, [-1, 1]) as a polars frame with optional group
labels, or a 4x4 quadrant confusion matrix. Output: matplotlib Axes, valence on x, arousal on y,
the quadrant axes drawn at 0. Figures are built on `matplotlib.figure.Figure` (Agg), never
pyplot, so no global state leaks; each `plot_*(data, ax=None)` returns its Axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from midiva.labels import QUADRANTS

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f")
OTHER_COLOR = "#c8c8c8"
QUADRANT_GID = "quadrant-axis"  # gid of the lines at valence 0 / arousal 0, so tests can find them


def new_axes(ax: Axes | None, figsize: tuple[float, float] = (6.0, 5.0)) -> Axes:
    """`ax`, or the axes of a new Figure of `figsize` inches."""
    if ax is not None:
        return ax
    return Figure(figsize=figsize, layout="constrained").subplots()


def mark_quadrants(ax: Axes, names: Sequence[str] = ()) -> None:
    """Valence on x, arousal on y over [-1, 1]², the quadrant axes at 0, and `names` (Q1..Q4) in the corners."""
    ax.axhline(0.0, color="0.3", lw=0.9, zorder=3, gid=QUADRANT_GID)
    ax.axvline(0.0, color="0.3", lw=0.9, zorder=3, gid=QUADRANT_GID)
    ax.set_xlim(-1.0, 1.0)
    ax.set_ylim(-1.0, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("valence")
    ax.set_ylabel("arousal")
    corners = (
        (0.98, 0.98, "right", "top"),
        (0.02, 0.98, "left", "top"),
        (0.02, 0.02, "left", "bottom"),
        (0.98, 0.02, "right", "bottom"),
    )
    for (x, y, ha, va), name in zip(corners, names, strict=False):
        ax.text(
            x,
            y,
            name,
            transform=ax.transAxes,
            ha=ha,
            va=va,
            fontsize=8,
            color="0.25",
            zorder=4,
            bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1.5},
        )


def plot_va_scatter(
    data: pl.DataFrame,
    ax: Axes | None = None,
    *,
    group: str = "genre",
    groups: Sequence[str] | None = None,
    label: str = "song means",
    unit: str | None = None,
    max_points: int = 20_000,
    max_groups: int = 8,
    seed: int = 0,
) -> Axes:
    """(valence, arousal) points, coloured by the `group` column when `data` has one.

    Args:
        data: columns valence, arousal and optionally `group` (a multi-genre song is one point per genre).
        group: the column whose values colour the points.
        groups: the values to colour, in legend order; default: the `max_groups` most frequent. Others are grey.
        label: the title's subject; it reads '<label> (<n> <unit>)'.
        unit: what a point is; default 'songs', or 'song-<group> pairs' when grouped.
        max_points: a reproducible random subset is drawn above this (the title says so).
    """
    ax = new_axes(ax, (6.5, 6.0))
    total = data.height
    shown = data.sample(max_points, seed=seed) if total > max_points else data
    size = 14 if shown.height < 2000 else 4
    grouped = group in shown.columns
    if grouped:
        if groups is None:
            ranked = shown.group_by(group).len().sort(["len", group], descending=[True, False])
            groups = ranked[group].head(max_groups).to_list()
        palette = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
        # one collection in shuffled order, so no group is painted over the others wholesale
        shown = shown.sample(fraction=1.0, shuffle=True, seed=seed)
        colors = [palette.get(g, OTHER_COLOR) for g in shown[group].to_list()]
        ax.scatter(shown["valence"], shown["arousal"], s=size, c=colors, alpha=0.6, lw=0, rasterized=True)
        handles = [Line2D([], [], ls="", marker="o", color=c, label=g) for g, c in palette.items()]
        if shown.filter(~pl.col(group).is_in(list(groups))).height:
            handles.append(Line2D([], [], ls="", marker="o", color=OTHER_COLOR, label=f"other {group}s"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        ax.scatter(shown["valence"], shown["arousal"], s=size, color=PALETTE[0], alpha=0.5, lw=0, rasterized=True)
    mark_quadrants(ax)
    unit = unit or (f"song-{group} pairs" if grouped else "songs")
    ax.set_title(
        f"{label} ({shown.height:,} of {total:,} {unit} shown)"
        if total > shown.height
        else f"{label} ({total:,} {unit})"
    )
    return ax


def plot_confusion(confusion: Sequence[Sequence[int]], ax: Axes | None = None, title: str = "") -> Axes:
    """Quadrant confusion matrix (rows true Q1..Q4, columns predicted, counts written in)."""
    ax = new_axes(ax, (4.5, 4.0))
    mat = np.asarray(confusion)
    ax.imshow(mat, cmap="Blues")
    for (i, j), value in np.ndenumerate(mat):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > mat.max() / 2 else "black")
    ax.set(
        xticks=range(4),
        yticks=range(4),
        xticklabels=QUADRANTS,
        yticklabels=QUADRANTS,
        xlabel="predicted quadrant",
        ylabel="true quadrant",
        title=title,
    )
    return ax

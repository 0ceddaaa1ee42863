"""Report stage: AnnotationStats -> observations, CSV/JSON tables, figures and one HTML file.

Input: `midiva.analysis.AnnotationStats`. Output: short observations computed from the numbers,
CSV tables and summary.json, figures (valence on x, arousal on y, both unitless in [-1, 1],
quadrant axes drawn at 0) as PNG/SVG, and a self-contained HTML report with the figures
embedded as base64 PNG. Figures are built on `matplotlib.figure.Figure` (Agg), never pyplot,
so no global state leaks; each `plot_*(data, ax=None)` returns its Axes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from midiva import __version__
from midiva.analysis import (
    CORRELATION_SCHEMA,
    DIMENSIONS,
    EXAMPLE_MIN_BARS,
    FINE_BINS,
    GENRE_SEPARATOR,
    HEATMAP_BINS,
    POSITION_BINS,
    QUADRANTS,
    AnalysisOptions,
    AnnotationStats,
    DataQuality,
    Distribution,
    FailureCounts,
)
from midiva.atomic import atomic_output, write_text_atomic
from midiva.errors import OutputError
from midiva.plots import PALETTE, QUADRANT_GID, mark_quadrants, new_axes, plot_va_scatter

log = logging.getLogger(__name__)

_HINT = "choose a writable --out directory"

# The one set of thresholds behind every word the report chooses, so that the same number always
# gets the same word: (upper bound, word), checked in order.
PACE_WORDS = ((0.05, "slowly"), (0.15, "moderately"), (math.inf, "quickly"))  # mean |change| between consecutive bars
CORRELATION_WORDS = ((0.1, "negligible"), (0.3, "weak"), (0.5, "moderate"), (math.inf, "strong"))  # |Pearson r|


def word_for(value: float, scale: Sequence[tuple[float, str]]) -> str:
    """The word of `scale` for `value`: the first whose upper bound exceeds it (PACE_WORDS, CORRELATION_WORDS)."""
    return next(word for bound, word in scale if value < bound)


# ---------------------------------------------------------------- observations


def observations(stats: AnnotationStats) -> list[str]:
    """Short sentences computed from the statistics: what stands out, and how sure it is."""
    notes = _notes(
        stats.quality,
        stats.song_level,
        stats.quadrants,
        stats.genres,
        stats.genre_note,
        stats.correlations if stats.correlations is not None else pl.DataFrame(schema=CORRELATION_SCHEMA),
        stats.dynamics,
        stats.failures,
        stats.options,
    )
    note = domain_note(stats)
    return [*notes, note] if note else notes


def domain_note(stats: AnnotationStats) -> str | None:
    """One sentence on how far the files lie from the model's training data (None without the column)."""
    d = stats.domain
    if d is None:
        return None
    if not d.n_known:
        return (
            f"No song has a domain_distance ({d.n_unknown:,} unknown): the model recorded no training-domain reference."
        )
    share = d.fraction_above.get(">2", 0.0)
    return (
        f"Median domain_distance {d.quantiles['p50']:.2f} (1 = a typical EMOPIA training clip; 90% between "
        f"{d.quantiles['p05']:.2f} and {d.quantiles['p95']:.2f}); {share:.0%} of songs lie beyond 2"
        + (f"; {d.n_unknown:,} songs have no distance." if d.n_unknown else ".")
    )


def plot_domain_distance(values: Sequence[float], ax: Axes | None = None, *, max_distance: float | None = None) -> Axes:
    """Histogram of songs' domain_distance, with 1 (a typical training clip) and any restriction marked."""
    ax = new_axes(ax, (6.0, 3.2))
    data = np.asarray(values, np.float64)
    upper = max(3.0, float(np.quantile(data, 0.99))) if data.size else 3.0
    ax.hist(np.clip(data, 0, upper), bins=40, range=(0, upper), color="#4c72b0")
    ax.axvline(1.0, color="#222", linestyle="--", linewidth=1, label="typical training clip")
    if max_distance is not None:
        ax.axvline(max_distance, color="#c44e52", linewidth=1.5, label=f"genre tables: <= {max_distance:g}")
    ax.set_xlabel("domain_distance (1 = a typical training clip)")
    ax.set_ylabel("songs")
    ax.legend(loc="upper right", fontsize=8)
    return ax


def full_summary(stats: AnnotationStats) -> dict[str, Any]:
    """`AnnotationStats.summary()` plus the observations: what `midiva stats` prints and saves."""
    return {**stats.summary(), "observations": observations(stats)}


def _autocorr(value: float | None) -> str:
    """An autocorrelation, which constant values do not have."""
    return "undefined (constant)" if value is None else f"{value:.2f}"


def _fmt_or_undefined(value: float | None, spec: str) -> str:
    """`value` formatted, or 'undefined' where a statistic has none (e.g. the autocorrelation of constant values)."""
    return "undefined" if value is None else format(value, spec)


def _fmt_ci(mean: float | None, low: float | None, high: float | None, level: float) -> str:
    if mean is None or low is None or high is None:
        return _fmt_or_undefined(mean, "+.3f")
    return f"{mean:+.3f} ({level:.0%} CI {low:+.3f} to {high:+.3f})"


def _files(n: int) -> str:
    """'1 file', '2 files', '1,024 files'."""
    return f"{n:,} file" + ("" if n == 1 else "s")


def _notes(
    quality: DataQuality,
    song_level: tuple[Distribution, Distribution],
    quadrants: pl.DataFrame,
    genres: pl.DataFrame | None,
    genre_note: str | None,
    correlations: pl.DataFrame,
    dynamics: pl.DataFrame,
    failures: FailureCounts | None,
    options: AnalysisOptions,
) -> list[str]:
    lvl = options.level
    notes = [f"{quality.n_valid_rows:,} bars of {quality.n_songs:,} songs analysed."]
    notes += _quality_notes(quality)
    v, a = song_level
    notes.append(
        f"The average song has valence {_fmt_ci(v.mean, v.ci_low, v.ci_high, lvl)} and arousal {_fmt_ci(a.mean, a.ci_low, a.ci_high, lvl)}."
    )
    sq = quadrants.filter(pl.col("level") == "song").sort("n", descending=True)
    notes.append(
        f"Most songs fall in {sq['quadrant'][0]} ({sq['fraction'][0]:.0%}), fewest in {sq['quadrant'][-1]} ({sq['fraction'][-1]:.0%})."
    )
    if genre_note:
        notes.append(genre_note[0].upper() + genre_note[1:] + ".")
    notes += _genre_notes(genres, options)
    notes.append(_correlation_note(correlations, lvl))
    notes += _dynamics_notes(dynamics, options)
    if failures is not None and failures.n_failures:
        kinds = ", ".join(f"{t}: {n:,}" for t, n in failures.by_error_type[:5])
        notes.append(
            f"{_files(failures.n_failures)} failed during annotation and {'is' if failures.n_failures == 1 else 'are'} not in these statistics ({kinds})."
        )
    return notes


def _quality_notes(quality: DataQuality) -> list[str]:
    """What the data checks excluded or merged."""
    notes: list[str] = []
    if quality.n_excluded_rows:
        parts = [
            f"{getattr(quality, k):,} {label}"
            for k, label in (
                ("n_missing_values", "with missing or unparsable values"),
                ("n_nan_values", "with NaN"),
                ("n_out_of_range", "outside [-1, 1]"),
                ("n_bad_bar_number", "with a bad bar_number"),
                ("n_missing_md5", "without md5"),
            )
            if getattr(quality, k)
        ]
        notes.append(
            f"{quality.n_excluded_rows:,} of {quality.n_rows:,} rows ({quality.n_excluded_rows / quality.n_rows:.2%}) were excluded: {', '.join(parts)}."
        )
    if quality.n_duplicate_bars:
        notes.append(
            f"{quality.n_duplicate_bars:,} duplicate (md5, bar_number) rows were averaged with their first occurrence."
        )
    return notes


def _genre_notes(genres: pl.DataFrame | None, options: AnalysisOptions) -> list[str]:
    """The extreme genres per dimension, and whether their confidence intervals separate them."""
    notes: list[str] = []
    lvl = options.level
    if genres is None:
        return notes
    ranked = genres.filter(pl.col("ranked"))
    if ranked.height < 2:
        notes.append(f"Fewer than two genres have at least {options.min_songs_per_genre} songs; genres are not ranked.")
    for dim in DIMENSIONS if ranked.height >= 2 else ():
        order = ranked.sort(f"{dim}_mean", descending=True)
        top, runner, bottom = order.row(0, named=True), order.row(1, named=True), order.row(-1, named=True)

        def describe(r: dict[str, Any], dim: str = dim) -> str:
            return f"{r['genre']} at {_fmt_ci(r[f'{dim}_mean'], r[f'{dim}_ci_low'], r[f'{dim}_ci_high'], lvl)} over {r['n_songs']:,} songs"

        apart = _separated(top, bottom, dim)
        verdict = (
            "the difference is beyond both confidence intervals (they do not overlap)"
            if apart
            else "their confidence intervals overlap, so the ordering is not established"
        )
        notes.append(f"Highest mean {dim}: {describe(top)}; lowest: {describe(bottom)}; {verdict}.")
        lead = "clearly ahead of" if _separated(top, runner, dim) else "not separable from"
        notes.append(
            f"In {dim}, {top['genre']} is {lead} the runner-up {runner['genre']} ({runner[f'{dim}_mean']:+.3f})."
        )
    return notes


def _correlation_note(correlations: pl.DataFrame, lvl: float) -> str:
    """The strongest correlation whose confidence interval excludes zero, or that there is none."""
    solid = correlations.filter((pl.col("n") >= 10) & ((pl.col("ci_low") > 0) | (pl.col("ci_high") < 0)))
    if solid.height:
        best = solid.sort(pl.col("pearson_r").abs(), descending=True).row(0, named=True)
        return (
            f"Strongest correlation ({word_for(abs(best['pearson_r']), CORRELATION_WORDS)}): song {best['dimension']} "
            f"with {best['variable']} (r = {best['pearson_r']:+.2f}, "
            f"{lvl:.0%} CI {best['ci_low']:+.2f} to {best['ci_high']:+.2f}; Spearman ρ = {best['spearman_rho']:+.2f}; n = {best['n']:,})."
        )
    return f"No variable correlates with song valence or arousal beyond its {lvl:.0%} confidence interval."


def _dynamics_notes(dynamics: pl.DataFrame, options: AnalysisOptions) -> list[str]:
    """How fast VA changes within songs, and how it drifts from start to end."""
    notes: list[str] = []
    lvl = options.level
    dyn = {r["metric"]: r for r in dynamics.iter_rows(named=True)}
    if dyn["valence_abs_change"]["n_songs"]:
        cv, ca = dyn["valence_abs_change"]["mean"], dyn["arousal_abs_change"]["mean"]
        changes = [x for x in (cv, ca) if x is not None]
        pace = word_for(max(changes), PACE_WORDS) if changes else "not measurably"
        bounds = ", ".join(f"{word} below {bound:g}" for bound, word in PACE_WORDS if math.isfinite(bound))
        notes.append(
            f"Within songs of at least {options.min_bars_dynamics} bars, consecutive bars differ by {_fmt_or_undefined(cv, '.3f')} in valence "
            f"and {_fmt_or_undefined(ca, '.3f')} in arousal on average, so VA changes {pace} from bar to bar (thresholds: {bounds}, else quickly); "
            f"lag-1 autocorrelation {_autocorr(dyn['valence_lag1_autocorr']['mean'])} / "
            f"{_autocorr(dyn['arousal_lag1_autocorr']['mean'])}."
        )
        for dim in DIMENSIONS:
            r = dyn[f"{dim}_end_minus_start"]
            if r["mean"] is None:
                continue
            notes.append(
                f"From the first to the last fifth of a song, {dim} changes by {_fmt_ci(r['mean'], r['ci_low'], r['ci_high'], lvl)} on average "
                f"and rises in {_fmt_or_undefined(r['fraction_positive'], '.0%')} of songs."
            )
    return notes


def _separated(high: dict[str, Any], low: dict[str, Any], dim: str) -> bool:
    lo, hi = high.get(f"{dim}_ci_low"), low.get(f"{dim}_ci_high")
    return lo is not None and hi is not None and lo > hi


# ---------------------------------------------------------------- tables


def _output_dir(out_dir: Path | str) -> Path:
    """Create out_dir (and parents); an OSError becomes an OutputError naming the directory."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create output directory {str(out)!r}: {err.strerror or err}") from err
    return out


def write_tables(stats: AnnotationStats, out_dir: Path | str) -> list[Path]:
    """Write the CSV tables and summary.json into out_dir (created); returns the paths written.

    Raises:
        OutputError: out_dir cannot be created or written.
    """
    out = _output_dir(out_dir)
    songs = stats.songs
    if "genres" in songs.columns:
        songs = songs.with_columns(pl.col("genres").list.join(GENRE_SEPARATOR))
    edges = np.linspace(-1.0, 1.0, 101)
    coarse = stats.fine_hist.reshape(2, 100, FINE_BINS // 100).sum(axis=2)
    song_hist = [np.histogram(stats.songs[f"{d}_mean"].to_numpy(), bins=edges)[0] for d in DIMENSIONS]
    histogram = pl.DataFrame(
        {
            "level": ["bar"] * 200 + ["song"] * 200,
            "dimension": (["valence"] * 100 + ["arousal"] * 100) * 2,
            "bin_low": np.tile(edges[:-1], 4),
            "bin_high": np.tile(edges[1:], 4),
            "n": np.concatenate([coarse[0], coarse[1], song_hist[0], song_hist[1]]),
        }
    )
    hedges = np.linspace(-1.0, 1.0, HEATMAP_BINS + 1)
    vi, ai = np.meshgrid(np.arange(HEATMAP_BINS), np.arange(HEATMAP_BINS), indexing="ij")
    heatmap = pl.DataFrame(
        {
            "valence_low": hedges[vi.ravel()],
            "valence_high": hedges[vi.ravel() + 1],
            "arousal_low": hedges[ai.ravel()],
            "arousal_high": hedges[ai.ravel() + 1],
            "n_bars": stats.heatmap.ravel(),
        }
    )
    distributions = pl.DataFrame([asdict(d) for d in (*stats.bar_level, *stats.song_level)])
    tables: dict[str, pl.DataFrame | None] = {
        "songs.csv": songs,
        "genres.csv": stats.genres,
        "correlations.csv": stats.correlations,
        "dynamics.csv": stats.dynamics,
        "position_profile.csv": stats.position_profile,
        "distributions.csv": distributions,
        "quadrants.csv": stats.quadrants,
        "histogram.csv": histogram,
        "heatmap_bars.csv": heatmap,
        "examples.csv": stats.examples,
    }
    written: list[Path] = []
    for name, frame in tables.items():
        if frame is None:
            continue
        target = out / name
        with atomic_output(target, hint=_HINT) as tmp:
            frame.write_csv(tmp)
        written.append(target)
    target = out / "summary.json"
    text = json.dumps(full_summary(stats), indent=2, ensure_ascii=False) + "\n"
    write_text_atomic(target, text, hint=_HINT)
    written.append(target)
    return written


# ---------------------------------------------------------------- plots


def va_histogram2d(valence: npt.ArrayLike, arousal: npt.ArrayLike, bins: int = HEATMAP_BINS) -> npt.NDArray[np.int64]:
    """Counts on a fixed [-1, 1]² grid, shape (bins, bins), indexed [valence bin, arousal bin]."""
    counts, _, _ = np.histogram2d(
        np.asarray(valence, dtype=float), np.asarray(arousal, dtype=float), bins=bins, range=[[-1.0, 1.0], [-1.0, 1.0]]
    )
    return counts.astype(np.int64)


def plot_va_heatmap(
    counts: npt.NDArray[np.int64], ax: Axes | None = None, *, title: str = "", unit: str = "bars", colorbar: bool = True
) -> Axes:
    """2-D histogram over the fixed [-1, 1]² extent (log colour scale; empty cells blank)."""
    ax = new_axes(ax)
    counts = np.asarray(counts)
    shown = np.ma.masked_equal(counts.T, 0)
    vmax = int(counts.max(initial=0))
    # Counts are integers: a log scale only once they span a decade, and whole-number tick labels
    # either way (a log colourbar over 1..9 labels its ticks 9×10⁻¹ and the like).
    log_scale = vmax >= 10
    norm = LogNorm(vmin=1, vmax=vmax) if log_scale else Normalize(vmin=0.5, vmax=max(vmax, 1) + 0.5)
    image = ax.imshow(
        shown,
        origin="lower",
        extent=(-1.0, 1.0, -1.0, 1.0),
        cmap="viridis",
        norm=norm,
        interpolation="nearest",
        aspect="equal",
    )
    if colorbar and ax.figure is not None:
        bar = ax.figure.colorbar(image, ax=ax, label=f"{unit} per cell", shrink=0.8)
        axis = bar.ax.yaxis
        axis.set_major_locator(LogLocator(base=10) if log_scale else MaxNLocator(integer=True, min_n_ticks=1))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        axis.set_minor_formatter(NullFormatter())
    mark_quadrants(ax, QUADRANTS)
    ax.set_title(title or f"{int(counts.sum()):,} {unit}")
    return ax


def plot_genre_boxplot(
    data: pl.DataFrame, dimension: str, ax: Axes | None = None, *, genres: Sequence[str] | None = None
) -> Axes:
    """Song-level distribution of one dimension per genre, sorted by median (whiskers 5-95%).

    Args:
        data: columns genre and the dimension (valence or arousal), one row per (song, genre).
        genres: which genres, in any order; default: all in `data`.
    """
    if dimension not in DIMENSIONS:
        raise ValueError(f"dimension must be one of {DIMENSIONS}, got {dimension!r}")
    chosen = list(genres) if genres is not None else data["genre"].unique().to_list()
    groups = {g: data.filter(pl.col("genre") == g)[dimension].to_numpy() for g in chosen}
    order = sorted((g for g in chosen if len(groups[g])), key=lambda g: (float(np.median(groups[g])), g))
    ax = new_axes(ax, (6.5, max(3.0, 0.32 * len(order) + 1.2)))
    ax.boxplot(
        [groups[g] for g in order],
        orientation="horizontal",
        whis=(5, 95),
        showfliers=False,
        widths=0.6,
        tick_labels=[f"{g} (n={len(groups[g]):,})" for g in order],
    )
    ax.axvline(0.0, color="0.3", lw=0.9, gid=QUADRANT_GID)
    ax.set_xlim(-1.0, 1.0)
    ax.set_xlabel(f"song mean {dimension}")
    ax.set_title(f"{dimension} by genre (song level)")
    return ax


def plot_distribution(counts: npt.NDArray[np.int64], ax: Axes | None = None, *, level: str = "bar") -> Axes:
    """Histograms of valence and arousal, counts shape (2, n_bins) over [-1, 1], as shares."""
    ax = new_axes(ax, (6.0, 4.0))
    counts = np.asarray(counts, dtype=float)
    edges = np.linspace(-1.0, 1.0, counts.shape[1] + 1)
    for row, (dim, color) in enumerate(zip(DIMENSIONS, PALETTE, strict=False)):
        total = counts[row].sum()
        ax.stairs(counts[row] / total if total else counts[row], edges, label=dim, color=color, lw=1.5)
    ax.axvline(0.0, color="0.3", lw=0.9, gid=QUADRANT_GID)
    ax.set_xlim(-1.0, 1.0)
    ax.set_xlabel("value")
    ax.set_ylabel(f"share of {level}s per bin")
    ax.set_title(f"{level} level (n = {int(counts[0].sum()):,})")
    _legend_outside(ax)
    return ax


def plot_position_profile(profile: pl.DataFrame, ax: Axes | None = None) -> Axes:
    """Mean valence and arousal in each tenth of a song, averaged over songs (equal weight)."""
    ax = new_axes(ax, (6.0, 4.0))
    centers = (profile["position_bin"].to_numpy() + 0.5) / POSITION_BINS * 100
    for dim, color in zip(DIMENSIONS, PALETTE, strict=False):
        ax.plot(centers, profile[f"{dim}_mean"].to_numpy(), marker="o", label=dim, color=color)
    ax.axhline(0.0, color="0.3", lw=0.9, gid=QUADRANT_GID)
    ax.set_xlim(0, 100)
    ax.set_xlabel("position in the song (% of its bars)")
    ax.set_ylabel("mean over songs")
    ax.set_title(f"valence and arousal along the song ({int(profile['n_songs'].to_numpy().max(initial=0)):,} songs)")
    _legend_outside(ax)
    return ax


def plot_va_curve(bars: pl.DataFrame, ax: Axes | None = None, *, title: str | None = None) -> Axes:
    """Valence and arousal over the bars of one song (columns bar_number, valence, arousal)."""
    ax = new_axes(ax, (6.0, 3.0))
    bars = bars.sort("bar_number")
    x = bars["bar_number"].to_numpy()
    for dim, color in zip(DIMENSIONS, PALETTE, strict=False):
        ax.plot(x, bars[dim].to_numpy(), label=dim, color=color, lw=1.2)
    ax.axhline(0.0, color="0.3", lw=0.9, gid=QUADRANT_GID)
    ax.set_ylim(-1.0, 1.0)
    ax.set_xlabel("bar_number")
    ax.set_ylabel("value")
    md5 = bars["md5"][0] if "md5" in bars.columns and bars.height else ""
    ax.set_title(title if title is not None else f"{md5[:12]}… ({bars.height} bars)")
    _legend_outside(ax)
    return ax


def _legend_outside(ax: Axes) -> None:
    """The legend right of the axes, where it can cover no curve."""
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def write_curves(predictions: Sequence[Any], target: Path | str, dpi: int = 110) -> Path:
    """Draw `midiva.prediction.BarPredictions` curves (one panel per file, by bar start in seconds) into a PNG.

    Raises:
        OutputError: the PNG cannot be written.
    """
    path = Path(target)
    _output_dir(path.parent)
    fig = Figure(figsize=(9.0, 2.6 * len(predictions)), layout="constrained")
    for ax, result in zip(np.atleast_1d(fig.subplots(len(predictions), 1)).ravel(), predictions, strict=True):
        bars = pl.DataFrame(
            {"md5": result.md5, "bar_number": result.bar_number, "valence": result.valence, "arousal": result.arousal}
        )
        name = result.title or Path(result.name).name
        label = f"{name} — {result.artist}" if result.artist else name
        last = f"; the last starts at {float(result.start_seconds[-1]):.1f} s" if result.n_bars else ""
        plot_va_curve(bars, ax, title=f"{label} ({result.n_bars} bars{last})")
    with atomic_output(path, hint=_HINT) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _genres_to_plot(stats: AnnotationStats, limit: int) -> list[str]:
    if stats.genres is None:
        return []
    ranked = stats.genres.filter(pl.col("ranked"))
    table = ranked if ranked.height else stats.genres
    return table["genre"].head(limit).to_list()


def make_figures(stats: AnnotationStats) -> dict[str, Figure]:
    """Every figure of the report, by file stem (genre figures only when genres are available)."""
    figures: dict[str, Figure] = {}
    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    plot_distribution(stats.fine_hist.reshape(2, 100, FINE_BINS // 100).sum(axis=2), left, level="bar")
    edges = np.linspace(-1.0, 1.0, 101)
    song_counts = np.stack([np.histogram(stats.songs[f"{d}_mean"].to_numpy(), bins=edges)[0] for d in DIMENSIONS])
    plot_distribution(song_counts, right, level="song")
    figures["distributions"] = fig
    fig = Figure(figsize=(11.0, 5.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    plot_va_heatmap(stats.heatmap, left, title=f"bars ({int(stats.heatmap.sum()):,})", unit="bars")
    plot_va_heatmap(
        va_histogram2d(stats.songs["valence_mean"], stats.songs["arousal_mean"]),
        right,
        title=f"song means ({stats.songs.height:,})",
        unit="songs",
    )
    figures["va_heatmaps"] = fig
    if stats.domain is not None and stats.domain.values:
        figures["domain_distance"] = plot_domain_distance(
            stats.domain.values, max_distance=stats.domain.max_distance
        ).figure  # type: ignore[assignment]
    genre_songs = stats.genre_songs()
    top = _genres_to_plot(stats, 12)
    if top:
        figures["va_scatter_by_genre"] = plot_va_scatter(
            genre_songs.filter(pl.col("genre").is_in(top[:8])), seed=stats.options.seed
        ).figure  # type: ignore[assignment]
        boxed = _genres_to_plot(stats, 25)
        fig = Figure(figsize=(12.0, max(3.5, 0.32 * len(boxed) + 1.5)), layout="constrained")
        for ax, dim in zip(fig.subplots(1, 2), DIMENSIONS, strict=True):
            plot_genre_boxplot(genre_songs, dim, ax, genres=boxed)
        figures["genre_boxplots"] = fig
        ncols = min(4, len(top))
        nrows = -(-len(top) // ncols)
        fig = Figure(figsize=(3.2 * ncols, 3.2 * nrows), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
        for ax, genre in zip(axes, top, strict=False):
            part = genre_songs.filter(pl.col("genre") == genre)
            plot_va_heatmap(
                va_histogram2d(part["valence"], part["arousal"], bins=20),
                ax,
                title=f"{genre} ({part.height:,} songs)",
                unit="songs",
                colorbar=False,
            )
            for text in ax.texts:
                text.set_visible(False)
        for ax in axes[len(top) :]:
            ax.set_visible(False)
        figures["genre_heatmaps"] = fig
    else:
        figures["va_scatter"] = plot_va_scatter(
            stats.songs.select(pl.col("valence_mean").alias("valence"), pl.col("arousal_mean").alias("arousal")),
            seed=stats.options.seed,
        ).figure  # type: ignore[assignment]
    figures["position_profile"] = plot_position_profile(stats.position_profile).figure  # type: ignore[assignment]
    examples = stats.examples["md5"].unique(maintain_order=True).to_list()
    if examples:
        fig = Figure(figsize=(11.0, 2.6 * len(examples)), layout="constrained")
        labels = (
            dict(stats.songs.select("md5", pl.col("genres").list.join(", ")).iter_rows())
            if "genres" in stats.songs.columns
            else {}
        )
        names = dict(stats.songs.select("md5", "song").iter_rows()) if "song" in stats.songs.columns else {}
        for ax, md5 in zip(np.atleast_1d(fig.subplots(len(examples), 1)).ravel(), examples, strict=True):
            bars = stats.examples.filter(pl.col("md5") == md5)
            genre = f"; {labels[md5]}" if labels.get(md5) else ""
            name = names.get(md5) or md5
            key = "" if name == md5 else f"md5 {md5[:8]}…, "
            plot_va_curve(bars, ax, title=f"{name} ({key}{bars.height} bars{genre})")
        figures["example_curves"] = fig
    return figures


def write_plots(
    stats: AnnotationStats, out_dir: Path | str, formats: Sequence[str] = ("png",), dpi: int = 110
) -> list[Path]:
    """Save every figure as `<name>.<format>` (png and/or svg) into out_dir; returns the paths.

    Raises:
        OutputError: out_dir cannot be created or written.
    """
    out = _output_dir(out_dir)
    written: list[Path] = []
    for name, fig in make_figures(stats).items():
        for fmt in formats:
            target = out / f"{name}.{fmt}"
            with atomic_output(target, hint=_HINT) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi)
            written.append(target)
    return written


# ---------------------------------------------------------------- HTML report

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto;display:block;margin:.8em 0}.note{background:#fff6d6;border-left:4px solid #e0b000;padding:.5em .8em}
.meta{color:#666;font-size:.9em}.scroll{overflow-x:auto;max-width:100%}
"""


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3f}"
    if isinstance(value, list):
        return GENRE_SEPARATOR.join(map(str, value))
    return str(value)


def _html_table(frame: pl.DataFrame, columns: Sequence[str] | None = None, max_rows: int = 60) -> str:
    columns = list(columns or frame.columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(row[c]))}</td>" for c in columns) + "</tr>"
        for row in frame.head(max_rows).iter_rows(named=True)
    )
    more = (
        f"<p class='meta'>{frame.height - max_rows:,} more rows in the CSV tables.</p>"
        if frame.height > max_rows
        else ""
    )
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{more}"


def _img(fig: Figure, alt: str, dpi: int = 100) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_report(stats: AnnotationStats) -> str:
    """The report as one self-contained HTML string (figures embedded as base64 PNG)."""
    q = stats.quality
    figures = make_figures(stats)
    name = Path(q.annotations).name
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>midiva report: {html.escape(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Valence and arousal in {html.escape(name)}</h1>",
        f"<p class='meta'>midiva {__version__}; annotations {html.escape(q.annotations)}; metadata {html.escape(stats.meta_path or 'none')}; "
        f"{stats.options.level:.0%} bootstrap CIs over song means (seed {stats.options.seed}).</p>",
        "<h2>Observations</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in observations(stats)) + "</ul>",
        "<h2>Summary</h2>",
        _html_table(pl.DataFrame([asdict(d) for d in (*stats.bar_level, *stats.song_level)])),
        _html_table(stats.quadrants),
        "<h2>Data quality</h2>",
        _html_table(
            pl.DataFrame({"count": list(q.to_dict())}).with_columns(
                pl.Series("value", [_fmt(v) for v in q.to_dict().values()])
            )
        ),
    ]
    if stats.failures is not None:
        parts.append(
            f"<p>{_files(stats.failures.n_failures)} failed during annotation ({html.escape(stats.failures.path)}):</p>"
        )
        if stats.failures.by_error_type:
            parts.append(
                _html_table(
                    pl.DataFrame(list(stats.failures.by_error_type), schema=["error_type", "n_files"], orient="row")
                )
            )
    parts += [
        "<h2>Distributions</h2>",
        _img(figures["distributions"], "histograms of valence and arousal"),
        _img(figures["va_heatmaps"], "valence-arousal heat maps"),
    ]
    if stats.domain is not None:
        parts += [
            "<h2>Distance from the training data</h2>",
            f"<p>{html.escape(domain_note(stats) or '')} "
            "Files far from EMOPIA's solo-piano clips get less trustworthy predictions; "
            "<code>--max-domain-distance X</code> restricts the genre tables to songs within X.</p>",
        ]
        if "domain_distance" in figures:
            parts.append(_img(figures["domain_distance"], "histogram of domain_distance"))
    parts.append("<h2>Genres</h2>")
    if stats.genre_note:
        parts.append(f"<p class='note'>{html.escape(stats.genre_note)}</p>")
    if stats.coverage is not None:
        c = stats.coverage
        parts.append(
            f"<p>Coverage: {c.n_with_metadata:,} of {c.n_songs:,} songs have metadata, {c.n_with_genre:,} ({c.fraction_with_genre:.1%}) a genre; "
            f"{c.n_multi_genre:,} songs have several genres and count in each of them.</p>"
        )
    if stats.genres is not None:
        cols = ["genre", "n_songs", "n_multi_genre_songs", "n_bars", "ranked"] + [
            f"{d}_{s}" for d in DIMENSIONS for s in ("mean", "ci_low", "ci_high", "median")
        ]
        parts += [
            _html_table(stats.genres, cols),
            _img(figures["va_scatter_by_genre"], "song means by genre"),
            _img(figures["genre_boxplots"], "box plots by genre"),
            _img(figures["genre_heatmaps"], "heat maps per genre"),
        ]
    else:
        parts.append(_img(figures["va_scatter"], "song means"))
    parts.append("<h2>Correlations with metadata</h2>")
    if stats.correlations is not None:
        parts.append(_html_table(stats.correlations))
    parts += [
        "<h2>Within-song dynamics</h2>",
        _html_table(stats.dynamics),
        _img(figures["position_profile"], "valence and arousal along the song"),
    ]
    if "example_curves" in figures:
        parts += [
            f"<p>Example songs, chosen reproducibly (a hash of seed and md5) among songs of at least {EXAMPLE_MIN_BARS} bars:</p>",
            _img(figures["example_curves"], "example songs"),
        ]
    parts.append(
        "<h2>Method</h2><p>Genre, correlation and dynamics statistics average each song first (one mean per song), so long songs do not dominate; "
        "a song with several genres counts once in each. Intervals are percentile bootstraps of the mean over songs. Start and end are the first and "
        "last fifth of a song's bars; bar-to-bar change and lag-1 autocorrelation use consecutive bars only. Quadrants: Q1 V≥0, A≥0; Q2 V<0, A≥0; "
        "Q3 V<0, A<0; Q4 V≥0, A<0. Rows with missing, NaN or out-of-range values are excluded and counted above.</p></body></html>"
    )
    return "\n".join(parts)


def write_report(stats: AnnotationStats, out_dir: Path | str) -> Path:
    """Write `report.html` into out_dir (created); returns its path.

    Raises:
        OutputError: out_dir cannot be created or written.
    """
    out = _output_dir(out_dir)
    text = render_report(stats)
    target = out / "report.html"
    write_text_atomic(target, text, hint=_HINT)
    return target

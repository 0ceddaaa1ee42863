"""Analysis stage: statistics of an annotations CSV, by song, genre and position in the song.

Input: the annotation stage's CSV, one row per bar (`md5,bar_number,valence,arousal`; valence
and arousal unitless in [-1, 1], Russell's circumplex), optionally its metadata table
(`X.meta.csv`: `md5`, `music_styles_curated` genres joined by `|`, `tempo` in bpm, `num_tracks`,
...) and failures ledger (`X.failures.csv`). Output: `AnnotationStats` (data-quality counts,
bar- and song-level distributions, a song table with within-song dynamics, a genre table with
bootstrap confidence intervals, correlations with metadata, observations), written as CSV/JSON.

Out of core: the CSV is scanned with polars' streaming engine in md5-hash buckets, each held
as ~17 bytes per row, so at most about `max_rows_in_memory` rows are in memory at once. Genre
statistics aggregate to one mean per song first, so long songs do not dominate. Reading and
validating the input tables is `midiva.tables`; its public names are re-exported here.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from midiva.errors import DataError
from midiva.metrics import pearson, quadrant_counts
from midiva.tables import (
    GENRE_COLUMN,
    GENRE_SEPARATOR,
    MD5_PATTERN,
    REQUIRED_COLUMNS,
    STATUS_COUNTS,
    DataQuality,
    FailureCounts,
    Metadata,
    count_failures,
    estimate_rows,
    load_metadata,
    read_bucket,
    read_header,
    sidecar_paths,
)

log = logging.getLogger(__name__)

__all__ = [  # the input-table names come from midiva.tables and are re-exported here
    "DIMENSIONS",
    "EXAMPLE_MIN_BARS",
    "FINE_BINS",
    "GENRE_COLUMN",
    "GENRE_SEPARATOR",
    "HEATMAP_BINS",
    "MAX_BOOT_DRAWS",
    "POSITION_BINS",
    "QUADRANTS",
    "REQUIRED_COLUMNS",
    "AnalysisOptions",
    "AnnotationStats",
    "DataQuality",
    "Distribution",
    "FailureCounts",
    "GenreCoverage",
    "Metadata",
    "bootstrap_mean_ci",
    "compute_stats",
    "correlation_table",
    "count_failures",
    "dynamics_table",
    "effective_resamples",
    "genre_table",
    "load_metadata",
    "read_header",
    "sidecar_paths",
    "song_names",
]

DIMENSIONS = ("valence", "arousal")
RUN_SUM_ROWS = 1 << 20  # rows per slice when summing runs (bounds temporary memory)
FINE_BINS = 2000  # 1-D histogram bins over [-1, 1]: bar-level quantiles to within 0.001
HEATMAP_BINS = 50  # 2-D histogram bins per axis over [-1, 1]²
POSITION_BINS = 10  # relative-position bins (tenths of a song); start/end = first/last two
EXAMPLE_MIN_BARS = 16
MAX_BOOT_DRAWS = 20_000_000  # values drawn per bootstrap interval (bounds time for huge groups)
QUADRANTS = ("Q1 (V+A+)", "Q2 (V-A+)", "Q3 (V-A-)", "Q4 (V+A-)")


@dataclass(frozen=True)
class Distribution:
    """Summary of one dimension at one level ('bar': every bar; 'song': one mean per song)."""

    level: str
    dimension: str
    n: int
    mean: float
    std: float
    q05: float
    q25: float
    median: float
    q75: float
    q95: float
    ci_low: float | None  # bootstrap CI of the mean (song level only)
    ci_high: float | None


@dataclass(frozen=True)
class GenreCoverage:
    """How many analysed songs have metadata and genres (multi-genre songs counted once here)."""

    n_songs: int
    n_with_metadata: int
    n_with_genre: int
    n_multi_genre: int
    n_genres: int

    @property
    def fraction_with_genre(self) -> float:
        """Share of analysed songs with at least one genre."""
        return self.n_with_genre / self.n_songs if self.n_songs else 0.0


@dataclass(frozen=True)
class AnalysisOptions:
    """Knobs of compute_stats, kept with the result for provenance."""

    n_boot: int
    seed: int
    level: float
    min_songs_per_genre: int
    min_bars_dynamics: int
    n_examples: int
    max_rows_in_memory: int
    max_domain_distance: float | None = None


DOMAIN_COLUMN = "domain_distance"
DOMAIN_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DOMAIN_THRESHOLDS = (1.5, 2.0, 3.0)


@dataclass(frozen=True)
class DomainSummary:
    """How far the annotated files lie from the model's training data (`domain_distance`, 1 = a typical training clip).

    Attributes:
        n_known / n_unknown: songs with / without a distance (the model recorded no reference, or no metadata row).
        quantiles: the distance at `DOMAIN_QUANTILES`; fraction_above: share of known songs above each of `DOMAIN_THRESHOLDS`.
        max_distance: the genre tables' restriction (None: all songs), n_excluded: songs it left out.
    """

    n_known: int
    n_unknown: int
    quantiles: dict[str, float]
    fraction_above: dict[str, float]
    max_distance: float | None
    n_excluded: int
    values: tuple[float, ...] = ()  # the known distances, for the report's histogram


def domain_summary(songs: pl.DataFrame, max_distance: float | None) -> DomainSummary | None:
    """Summarise the `domain_distance` of songs (None when the metadata has no such column)."""
    if DOMAIN_COLUMN not in songs.columns:
        return None
    values = songs[DOMAIN_COLUMN].cast(pl.Float64, strict=False).drop_nulls().drop_nans().to_numpy()
    n_known = int(values.size)
    quantiles = {f"p{round(q * 100):02d}": float(np.quantile(values, q)) for q in DOMAIN_QUANTILES} if n_known else {}
    above = {f">{t:g}": float((values > t).mean()) for t in DOMAIN_THRESHOLDS} if n_known else {}
    n_excluded = 0 if max_distance is None else int(songs.height - (values <= max_distance).sum())
    return DomainSummary(
        n_known, songs.height - n_known, quantiles, above, max_distance, n_excluded, tuple(map(float, values))
    )


def within_domain(songs: pl.DataFrame, max_distance: float | None) -> pl.DataFrame:
    """Songs whose `domain_distance` is known and at most `max_distance` (all songs when None)."""
    if max_distance is None or DOMAIN_COLUMN not in songs.columns:
        return songs
    return songs.filter(pl.col(DOMAIN_COLUMN).cast(pl.Float64, strict=False) <= max_distance)


@dataclass(frozen=True)
class AnnotationStats:
    """Everything `midiva stats` computes; tables are polars DataFrames.

    Attributes:
        songs: one row per song: md5, n_bars, means, stds, dynamics (+ genres and metadata).
        fine_hist: bar counts, shape (2, FINE_BINS), rows valence/arousal over [-1, 1].
        heatmap: bar counts, shape (HEATMAP_BINS, HEATMAP_BINS), [valence bin, arousal bin].
        position_profile: mean over songs of the mean VA in each tenth of the song.
        genres: per-genre table (song-level means, bootstrap CIs, counts), None without genres.
        genre_note: why genre analyses are missing or partial; None when coverage is fine.
        examples: bars (md5, bar_number, valence, arousal) of reproducibly chosen songs.
    """

    quality: DataQuality
    options: AnalysisOptions
    bar_level: tuple[Distribution, Distribution]
    song_level: tuple[Distribution, Distribution]
    bar_va_correlation: float
    song_va_correlation: float
    quadrants: pl.DataFrame
    fine_hist: npt.NDArray[np.int64]
    heatmap: npt.NDArray[np.int64]
    songs: pl.DataFrame
    position_profile: pl.DataFrame
    dynamics: pl.DataFrame
    genres: pl.DataFrame | None
    genre_note: str | None
    coverage: GenreCoverage | None
    correlations: pl.DataFrame | None
    examples: pl.DataFrame
    failures: FailureCounts | None
    meta_path: str | None
    n_buckets: int
    domain: DomainSummary | None = None

    def genre_songs(self) -> pl.DataFrame:
        """Song means exploded to one row per (song, genre): md5, genre, valence, arousal."""
        if "genres" not in self.songs.columns:
            return pl.DataFrame(
                schema={"md5": pl.String, "genre": pl.String, "valence": pl.Float64, "arousal": pl.Float64}
            )
        return (
            self.songs.select(
                "md5",
                pl.col("genres").alias("genre"),
                pl.col("valence_mean").alias("valence"),
                pl.col("arousal_mean").alias("arousal"),
            )
            .explode("genre")
            .drop_nulls("genre")
        )

    def summary(self) -> dict[str, Any]:
        """The headline numbers and small tables as a JSON-ready dict (summary.json)."""
        genres: dict[str, Any] = {"available": self.genres is not None, "note": self.genre_note}
        if self.coverage is not None:
            genres["coverage"] = {**asdict(self.coverage), "fraction_with_genre": self.coverage.fraction_with_genre}
        if self.genres is not None:
            genres["table"] = _records(self.genres)
        return {
            "annotations": self.quality.annotations,
            "metadata": self.meta_path,
            "options": asdict(self.options),
            "quality": self.quality.to_dict(),
            "bar_level": [asdict(d) for d in self.bar_level],
            "song_level": [asdict(d) for d in self.song_level],
            "valence_arousal_correlation": {
                "bar": _clean(self.bar_va_correlation),
                "song": _clean(self.song_va_correlation),
            },
            "quadrants": _records(self.quadrants),
            "genres": genres,
            "correlations": _records(self.correlations) if self.correlations is not None else None,
            "dynamics": _records(self.dynamics),
            "position_profile": _records(self.position_profile),
            "failures": asdict(self.failures) if self.failures is not None else None,
            "example_songs": self.examples["md5"].unique(maintain_order=True).to_list(),
            "n_buckets": self.n_buckets,
            "domain_distance": {k: v for k, v in asdict(self.domain).items() if k != "values"} if self.domain else None,
        }


# ---------------------------------------------------------------- per-bucket aggregation


@dataclass
class _Accumulator:
    """Running totals over buckets (mutable on purpose: internal only)."""

    counts: dict[str, int]
    sums: npt.NDArray[np.float64]  # Σv, Σa, Σv², Σa², Σva
    fine_hist: npt.NDArray[np.int64]
    heatmap: npt.NDArray[np.int64]
    quadrants: npt.NDArray[np.int64]
    songs: list[pl.DataFrame]
    profile_sum: npt.NDArray[np.float64]  # (POSITION_BINS, 2) sums of song-bin means
    profile_n: npt.NDArray[np.int64]
    examples: list[pl.DataFrame]


def _new_accumulator() -> _Accumulator:
    keys = (
        "n_rows",
        "n_valid_rows",
        "n_missing_md5",
        "n_bad_bar_number",
        "n_missing_values",
        "n_nan_values",
        "n_out_of_range",
        "n_duplicate_bars",
    )
    return _Accumulator(
        counts=dict.fromkeys(keys, 0),
        sums=np.zeros(5),
        fine_hist=np.zeros((2, FINE_BINS), dtype=np.int64),
        heatmap=np.zeros((HEATMAP_BINS, HEATMAP_BINS), dtype=np.int64),
        quadrants=np.zeros(4, dtype=np.int64),
        songs=[],
        profile_sum=np.zeros((POSITION_BINS, 2)),
        profile_n=np.zeros(POSITION_BINS, dtype=np.int64),
        examples=[],
    )


def _bin_index(values: npt.NDArray[np.float32], n_bins: int) -> npt.NDArray[np.int64]:
    return np.clip(((values.astype(np.float64) + 1.0) * (n_bins / 2.0)).astype(np.int64), 0, n_bins - 1)


def _sorted_unique_bars(frame: pl.DataFrame, acc: _Accumulator) -> pl.DataFrame:
    """Rows sorted by (md5, bar_number) with duplicate bars averaged (counted in acc)."""
    md5, bar = pl.col("md5"), pl.col("bar_number")
    check = frame.select(
        runs=(md5 != md5.shift(1)).fill_null(True).sum(),
        out_of_order=((md5 == md5.shift(1)) & (bar <= bar.shift(1))).sum(),
        songs=md5.n_unique(),
    ).row(0, named=True)
    if check["runs"] != check["songs"] or check["out_of_order"]:
        frame = frame.sort(["md5", "bar_number"])
    n_dup = int(frame.select(((md5 == md5.shift(1)) & (bar == bar.shift(1))).sum()).item())
    if n_dup:
        acc.counts["n_duplicate_bars"] += n_dup
        frame = (
            frame.group_by(["md5", "bar_number"])
            .agg(pl.col("valence").mean(), pl.col("arousal").mean())
            .sort(["md5", "bar_number"])
        )
    return frame


def _run_sums(
    frame: pl.DataFrame, keys: Sequence[str], sums: Sequence[pl.Expr], first: str | None = None
) -> pl.DataFrame:
    """Sum `sums` over runs of equal `keys` in a frame sorted by them; adds `n` (run length) and,
    for column `first`, its values on the first and last row of each run (`first_<x>`, `last_<x>`).

    Rows are added in file order, one run at a time, so every total is the same on every run of
    the program (a hash group-by adds in thread order and changes the last digits).
    """
    change = pl.any_horizontal([(pl.col(k) != pl.col(k).shift(1)).fill_null(True) for k in keys])
    starts = np.flatnonzero(frame.select(change).to_series().to_numpy())
    out = frame.select(keys)[starts.tolist()]
    bounds = np.append(starts, frame.height)
    # Slices of about RUN_SUM_ROWS rows that start on a run: expressions see whole runs (shift(1)
    # is null at a slice start, as at a run start) and temporaries stay small.
    cuts = np.unique(np.searchsorted(starts, np.arange(0, frame.height, RUN_SUM_ROWS)))
    cuts = cuts[cuts < len(starts)]
    parts: dict[str, list[npt.NDArray[np.float64]]] = {}
    for lo, hi in zip(cuts, [*cuts[1:], len(starts)], strict=True):
        piece = frame.slice(int(starts[lo]), int(bounds[hi] - starts[lo]))
        for values in piece.select(*sums).iter_columns():
            parts.setdefault(values.name, []).append(
                np.add.reduceat(np.asarray(values.to_numpy(), dtype=np.float64), starts[lo:hi] - starts[lo])
            )
    columns = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    extra = []
    if first is not None:
        column = frame[first]
        extra = [column.gather(starts).alias(f"first_{first}"), column.gather(bounds[1:] - 1).alias(f"last_{first}")]
    return out.with_columns(
        pl.Series("n", np.diff(bounds), pl.UInt32), *extra, *(pl.Series(k, v) for k, v in columns.items())
    )


def _song_sums(frame: pl.DataFrame) -> pl.DataFrame:
    """Per-song sums from which means, stds, bar-to-bar change and autocorrelation follow (frame sorted by song, bar)."""
    md5, bar = pl.col("md5"), pl.col("bar_number")
    pair = ((md5 == md5.shift(1)) & (bar == bar.shift(1) + 1)).fill_null(False)
    columns: list[pl.Expr] = [pair.cast(pl.Float64).alias("n_pairs")]
    for name in DIMENSIONS:
        x = pl.col(name).cast(pl.Float64)
        prev = x.shift(1)
        columns += [
            x.alias(f"{name}_sum"),
            (x * x).alias(f"{name}_sumsq"),
            pl.when(pair).then((x - prev).abs()).otherwise(0.0).alias(f"{name}_absdiff"),
            pl.when(pair).then(x * prev).otherwise(0.0).alias(f"{name}_lagprod"),
            pl.when(pair).then(x).otherwise(0.0).alias(f"{name}_paircur"),
            pl.when(pair).then(prev).otherwise(0.0).alias(f"{name}_pairprev"),
        ]
    sums = _run_sums(frame, ["md5"], columns, first="bar_number")
    return sums.rename({"n": "n_bars", "first_bar_number": "first_bar", "last_bar_number": "last_bar"}).with_columns(
        pl.col("n_pairs").cast(pl.UInt32)
    )


def _finish_songs(sums: pl.DataFrame, positions: pl.DataFrame, min_bars_dynamics: int) -> pl.DataFrame:
    """Song table from per-song sums and per-(song, tenth) sums."""
    n = pl.col("n_bars").cast(pl.Float64)
    enough = pl.col("n_bars") >= min_bars_dynamics
    start_end = positions.group_by("md5").agg(
        *[
            (
                pl.col(f"{d}_sum").filter(pl.col("position_bin") < 2).sum()
                / pl.col("n").filter(pl.col("position_bin") < 2).sum()
            ).alias(f"{d}_start")
            for d in DIMENSIONS
        ],
        *[
            (
                pl.col(f"{d}_sum").filter(pl.col("position_bin") >= POSITION_BINS - 2).sum()
                / pl.col("n").filter(pl.col("position_bin") >= POSITION_BINS - 2).sum()
            ).alias(f"{d}_end")
            for d in DIMENSIONS
        ],
    )
    exprs: list[pl.Expr] = []
    for d in DIMENSIONS:
        mean = pl.col(f"{d}_sum") / n
        var = (pl.col(f"{d}_sumsq") - n * mean * mean).clip(0.0, None)
        num = (
            pl.col(f"{d}_lagprod")
            - mean * (pl.col(f"{d}_paircur") + pl.col(f"{d}_pairprev"))
            + pl.col("n_pairs") * mean * mean
        )
        exprs += [
            mean.alias(f"{d}_mean"),
            pl.when(n > 1).then((var / (n - 1)).sqrt()).alias(f"{d}_std"),
            pl.when(enough & (pl.col("n_pairs") > 0))
            .then(pl.col(f"{d}_absdiff") / pl.col("n_pairs"))
            .alias(f"{d}_abs_change"),
            pl.when(enough & (var > 1e-12)).then(num / var).alias(f"{d}_lag1_autocorr"),
        ]
    songs = sums.select("md5", "n_bars", "first_bar", "last_bar", "n_pairs", *exprs).join(
        start_end, on="md5", how="left"
    )
    return (
        songs.with_columns(
            *[pl.when(enough).then(pl.col(f"{d}_{p}")).alias(f"{d}_{p}") for d in DIMENSIONS for p in ("start", "end")],
        )
        .with_columns(
            *[(pl.col(f"{d}_end") - pl.col(f"{d}_start")).alias(f"{d}_end_minus_start") for d in DIMENSIONS],
            pl.col("md5").cast(pl.String),
        )
        .rename({"n_pairs": "n_consecutive_pairs"})
    )


def _example_key(seed: int, md5: str) -> str:
    return hashlib.blake2b(f"{seed}:{md5}".encode(), digest_size=8).hexdigest()


def _process_bucket(frame: pl.DataFrame, acc: _Accumulator, options: AnalysisOptions) -> None:
    status = frame["status"]
    acc.counts["n_rows"] += frame.height
    for key, bit in STATUS_COUNTS:
        acc.counts[key] += int(((status & bit) > 0).sum())
    frame = frame.filter(pl.col("status") == 0).drop("status")
    if frame.height == 0:
        return
    frame = _sorted_unique_bars(frame, acc)
    acc.counts["n_valid_rows"] += frame.height
    v = frame["valence"].to_numpy()
    a = frame["arousal"].to_numpy()
    v64, a64 = v.astype(np.float64), a.astype(np.float64)
    acc.sums += [v64.sum(), a64.sum(), (v64 * v64).sum(), (a64 * a64).sum(), (v64 * a64).sum()]
    del v64, a64
    for row, values in enumerate((v, a)):
        acc.fine_hist[row] += np.bincount(_bin_index(values, FINE_BINS), minlength=FINE_BINS)
    cells = _bin_index(v, HEATMAP_BINS) * HEATMAP_BINS + _bin_index(a, HEATMAP_BINS)
    acc.heatmap += np.bincount(cells, minlength=HEATMAP_BINS * HEATMAP_BINS).reshape(HEATMAP_BINS, HEATMAP_BINS)
    acc.quadrants += quadrant_counts(v, a)
    del v, a, cells

    sums = _song_sums(frame)
    n_bars = sums["n_bars"].to_numpy()
    first = np.repeat(sums["first_bar"].to_numpy().astype(np.int64), n_bars)  # rows are in song order
    span = np.repeat((sums["last_bar"] - sums["first_bar"] + 1).to_numpy().astype(np.int64), n_bars)
    position_bin = (frame["bar_number"].to_numpy().astype(np.int64) - first) * POSITION_BINS // span
    del first, span
    binned = frame.with_columns(pl.Series("position_bin", position_bin, pl.Int64))
    # (md5, position_bin) runs are contiguous: the frame is sorted by song and bar.
    positions = _run_sums(
        binned, ["md5", "position_bin"], [pl.col(d).cast(pl.Float64).alias(f"{d}_sum") for d in DIMENSIONS]
    )
    songs = _finish_songs(sums, positions, options.min_bars_dynamics)
    acc.songs.append(songs)
    profiled = positions.join(
        sums.select("md5", "n_bars").filter(pl.col("n_bars") >= POSITION_BINS),
        on="md5",
        how="semi",
        maintain_order="left",
    )
    pbin = profiled["position_bin"].to_numpy().astype(np.int64)
    n_rows = profiled["n"].to_numpy().astype(np.float64)
    for col, dim in enumerate(DIMENSIONS):
        acc.profile_sum[:, col] += np.bincount(
            pbin, profiled[f"{dim}_sum"].to_numpy() / n_rows, minlength=POSITION_BINS
        )
    acc.profile_n += np.bincount(pbin, minlength=POSITION_BINS)

    if options.n_examples > 0:
        candidates = songs.filter(pl.col("n_bars") >= EXAMPLE_MIN_BARS)["md5"].to_list()
        chosen = sorted(candidates, key=lambda m: _example_key(options.seed, m))[: options.n_examples]
        if chosen:
            acc.examples.append(
                frame.filter(pl.col("md5").cast(pl.String).is_in(chosen)).select(
                    pl.col("md5").cast(pl.String),
                    "bar_number",
                    pl.col("valence").cast(pl.Float64),
                    pl.col("arousal").cast(pl.Float64),
                )
            )


# ---------------------------------------------------------------- statistics helpers


def effective_resamples(n: int, n_boot: int, max_draws: int = MAX_BOOT_DRAWS) -> int:
    """Resamples actually drawn for n values: n_boot, capped so n * resamples <= max_draws (min 200)."""
    return min(n_boot, max(200, max_draws // max(1, n)))


def bootstrap_mean_ci(
    values: npt.NDArray[np.float64],
    *,
    n_boot: int,
    rng: np.random.Generator,
    level: float = 0.95,
    max_draws: int = MAX_BOOT_DRAWS,
) -> npt.NDArray[np.float64]:
    """Percentile bootstrap confidence interval of the column means.

    Args:
        values: shape (n, d); rows are resampled together (paired across columns).
        n_boot: resamples, capped by `effective_resamples` for large n (the CI is narrow there).
        rng: the seeded generator (reproducible intervals).
        level: coverage of the interval.

    Returns:
        shape (d, 2): low and high per column; NaN where n < 2 or n_boot < 1.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    n, d = values.shape
    if n < 2 or n_boot < 1:
        return np.full((d, 2), np.nan)
    n_boot = effective_resamples(n, n_boot, max_draws)
    columns = [np.ascontiguousarray(values[:, j]) for j in range(d)]
    chunk = max(1, 4_000_000 // n)  # indices per chunk bounded to keep memory flat
    means = np.empty((n_boot, d))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        for j, column in enumerate(columns):
            means[start:stop, j] = column[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return np.quantile(means, [tail, 1.0 - tail], axis=0).T


def _stable_rng(seed: int, name: str) -> np.random.Generator:
    """A generator per (seed, name), so one genre's interval does not depend on the others."""
    return np.random.default_rng([seed, int(hashlib.blake2b(name.encode(), digest_size=8).hexdigest(), 16)])


def _hist_quantiles(counts: npt.NDArray[np.int64], qs: Sequence[float]) -> list[float]:
    """Quantiles of values binned over [-1, 1], linear within the bin."""
    total = counts.sum()
    cum = np.cumsum(counts)
    width = 2.0 / len(counts)
    out: list[float] = []
    for q in qs:
        target = q * total
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, len(counts) - 1)
        before = cum[i - 1] if i > 0 else 0
        frac = (target - before) / counts[i] if counts[i] else 0.5
        out.append(float(-1.0 + width * (i + frac)))
    return out


def _song_distribution(
    values: npt.NDArray[np.float64], dimension: str, n_boot: int, seed: int, level: float
) -> Distribution:
    ci = bootstrap_mean_ci(values, n_boot=n_boot, rng=_stable_rng(seed, f"songs:{dimension}"), level=level)[0]
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return Distribution(
        "song", dimension, len(values), float(values.mean()), std, *_five(q), _clean(ci[0]), _clean(ci[1])
    )


def _five(q: Sequence[float] | npt.NDArray[np.float64]) -> tuple[float, float, float, float, float]:
    return float(q[0]), float(q[1]), float(q[2]), float(q[3]), float(q[4])


def _pearson(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> float:
    """`midiva.metrics.pearson`, undefined (NaN) below 3 songs as well."""
    return pearson(x, y) if len(x) >= 3 else math.nan


def _ranks(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return pl.Series(x).rank("average").to_numpy().astype(np.float64)


CORRELATION_SCHEMA = {
    "variable": pl.String,
    "dimension": pl.String,
    "n": pl.Int64,
    "pearson_r": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "spearman_rho": pl.Float64,
}


def correlation_table(songs: pl.DataFrame, variables: Sequence[str], level: float = 0.95) -> pl.DataFrame:
    """Pearson (with a Fisher-z CI) and Spearman correlations of song-level VA with variables.

    Returns:
        columns variable, dimension, n, pearson_r, ci_low, ci_high, spearman_rho.
    """
    z_crit = _normal_quantile(0.5 + level / 2)
    rows = []
    for var in variables:
        for dim in DIMENSIONS:
            pair = (
                songs.select(pl.col(var).cast(pl.Float64), pl.col(f"{dim}_mean"))
                .drop_nulls()
                .filter(pl.col(var).is_finite())
            )
            x, y = pair[var].to_numpy(), pair[f"{dim}_mean"].to_numpy()
            r = _pearson(x, y)
            lo = hi = math.nan
            if not math.isnan(r) and len(x) > 3:
                z, se = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12)), 1.0 / math.sqrt(len(x) - 3)
                lo, hi = math.tanh(z - z_crit * se), math.tanh(z + z_crit * se)
            rho = _pearson(_ranks(x), _ranks(y)) if len(x) >= 3 else math.nan
            rows.append(
                {
                    "variable": var,
                    "dimension": dim,
                    "n": len(x),
                    "pearson_r": _clean(r),
                    "ci_low": _clean(lo),
                    "ci_high": _clean(hi),
                    "spearman_rho": _clean(rho),
                }
            )
    return pl.DataFrame(rows, schema=CORRELATION_SCHEMA)


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF."""
    return NormalDist().inv_cdf(p)


def genre_table(
    songs: pl.DataFrame, *, n_boot: int, seed: int, level: float = 0.95, min_songs: int = 20
) -> pl.DataFrame:
    """Per-genre song-level statistics; a song with several genres counts in each of them.

    Args:
        songs: song table with `genres` (list of str), `valence_mean`, `arousal_mean`, `n_bars`.
        min_songs: genres with fewer songs get `ranked = False` (left out of observations).

    Returns:
        one row per genre, most songs first: n_songs, n_multi_genre_songs, n_bars, share_of_songs,
        then per dimension mean, ci_low, ci_high, median, std.
    """
    n_total = songs.height
    exploded = (
        songs.select("md5", "n_bars", "valence_mean", "arousal_mean", "genres", pl.col("genres").list.len().alias("k"))
        .explode("genres")
        .drop_nulls("genres")
    )
    rows = []
    for (genre,), group in exploded.group_by("genres", maintain_order=True):
        values = group.select("valence_mean", "arousal_mean").to_numpy()
        ci = bootstrap_mean_ci(values, n_boot=n_boot, rng=_stable_rng(seed, f"genre:{genre}"), level=level)
        row: dict[str, Any] = {
            "genre": genre,
            "n_songs": group.height,
            "n_multi_genre_songs": int((group["k"] > 1).sum()),
            "n_bars": int(group["n_bars"].sum()),
            "share_of_songs": group.height / n_total if n_total else math.nan,
            "ranked": group.height >= min_songs,
            "n_boot": effective_resamples(group.height, n_boot),
        }
        for j, dim in enumerate(DIMENSIONS):
            col = values[:, j]
            row |= {
                f"{dim}_mean": float(col.mean()),
                f"{dim}_ci_low": _clean(ci[j, 0]),
                f"{dim}_ci_high": _clean(ci[j, 1]),
                f"{dim}_median": float(np.median(col)),
                f"{dim}_std": float(col.std(ddof=1)) if len(col) > 1 else None,
            }
        rows.append(row)
    if not rows:
        return pl.DataFrame()
    return pl.DataFrame(rows).sort(["n_songs", "genre"], descending=[True, False])


def dynamics_table(songs: pl.DataFrame, *, n_boot: int, seed: int, level: float = 0.95) -> pl.DataFrame:
    """Within-song dynamics across songs: mean (bootstrap CI), median and share > 0 per metric."""
    metrics = [
        f"{d}_{m}" for m in ("abs_change", "start", "end", "end_minus_start", "lag1_autocorr") for d in DIMENSIONS
    ]
    rows = []
    for metric in metrics:
        values = songs[metric].drop_nulls().to_numpy().astype(np.float64)
        values = values[np.isfinite(values)]
        ci = bootstrap_mean_ci(values, n_boot=n_boot, rng=_stable_rng(seed, f"dynamics:{metric}"), level=level)[0]
        rows.append(
            {
                "metric": metric,
                "n_songs": len(values),
                "mean": float(values.mean()) if len(values) else None,
                "ci_low": _clean(ci[0]),
                "ci_high": _clean(ci[1]),
                "median": float(np.median(values)) if len(values) else None,
                "fraction_positive": float((values > 0).mean()) if len(values) else None,
                "n_boot": effective_resamples(len(values), n_boot) if len(values) > 1 else 0,
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "metric": pl.String,
            "n_songs": pl.Int64,
            "mean": pl.Float64,
            "ci_low": pl.Float64,
            "ci_high": pl.Float64,
            "median": pl.Float64,
            "fraction_positive": pl.Float64,
            "n_boot": pl.Int64,
        },
    )


# ---------------------------------------------------------------- the whole computation


def compute_stats(
    annotations: Path | str,
    meta: Path | str | None = None,
    failures: Path | str | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    min_songs_per_genre: int = 20,
    min_bars_dynamics: int = 8,
    n_examples: int = 4,
    max_rows_in_memory: int = 50_000_000,
    max_domain_distance: float | None = None,
    progress: bool = False,
) -> AnnotationStats:
    """Statistics of an annotations CSV, out of core.

    Args:
        annotations: the `md5,bar_number,valence,arousal` CSV.
        meta: metadata table; without it genre analyses are skipped and say so.
        failures: failures ledger to count in the report.
        n_boot: bootstrap resamples per confidence interval.
        min_bars_dynamics: songs shorter than this get no dynamics (change, start/end, autocorr).
        max_rows_in_memory: rows per md5-hash bucket; more rows mean more passes over the CSV.
        max_domain_distance: genre tables use only songs whose metadata `domain_distance` is at most this.

    Raises:
        DataError: missing columns, no rows, no valid rows, unreadable metadata.
    """
    path = Path(annotations)
    columns = read_header(path)
    extra = tuple(c for c in columns if c not in REQUIRED_COLUMNS)
    if extra:
        log.warning("annotations %s has extra column(s) %s; they are ignored", path, list(extra))
    options = AnalysisOptions(
        n_boot, seed, level, min_songs_per_genre, min_bars_dynamics, n_examples, max_rows_in_memory, max_domain_distance
    )
    acc, n_buckets = _scan(path, options, progress)
    songs, quality = _checked_songs(path, acc, extra)
    song_values = songs.select("valence_mean", "arousal_mean").to_numpy()
    song_level = (
        _song_distribution(song_values[:, 0], "valence", n_boot, seed, level),
        _song_distribution(song_values[:, 1], "arousal", n_boot, seed, level),
    )
    with_meta = _join_metadata(songs, meta, options)
    songs = with_meta.songs.select("md5", song_names(with_meta.songs).alias("song"), pl.exclude("md5"))
    return AnnotationStats(
        quality=quality,
        options=options,
        bar_level=_bar_distributions(acc),
        song_level=song_level,
        bar_va_correlation=_bar_va_correlation(acc),
        song_va_correlation=_pearson(song_values[:, 0], song_values[:, 1]),
        quadrants=_quadrant_table(acc, song_values),
        fine_hist=acc.fine_hist,
        heatmap=acc.heatmap,
        songs=songs,
        position_profile=_position_profile(acc),
        dynamics=dynamics_table(songs, n_boot=n_boot, seed=seed, level=level),
        genres=with_meta.genres,
        genre_note=with_meta.genre_note,
        coverage=with_meta.coverage,
        correlations=correlation_table(songs, with_meta.variables, level),
        examples=_pick_examples(acc.examples, n_examples, seed),
        failures=count_failures(failures) if failures is not None else None,
        meta_path=with_meta.meta_path,
        n_buckets=n_buckets,
        domain=with_meta.domain,
    )


def _scan(path: Path, options: AnalysisOptions, progress: bool) -> tuple[_Accumulator, int]:
    """One pass per md5-hash bucket of the CSV into the accumulator; (accumulator, number of buckets)."""
    from tqdm.auto import tqdm

    n_buckets = max(1, math.ceil(estimate_rows(path) / max(1, options.max_rows_in_memory)))
    acc = _new_accumulator()
    bar = tqdm(
        range(n_buckets),
        unit="bucket",
        file=sys.stderr,
        disable=not progress or n_buckets == 1 or not sys.stderr.isatty(),
    )
    for bucket in bar:
        _process_bucket(read_bucket(path, bucket, n_buckets), acc, options)
        bar.set_postfix(rows=acc.counts["n_rows"])
    return acc, n_buckets


def _checked_songs(path: Path, acc: _Accumulator, extra: tuple[str, ...]) -> tuple[pl.DataFrame, DataQuality]:
    """The per-song table and the data-quality record; an output without valid rows is an error."""
    counts = acc.counts
    if counts["n_rows"] == 0:
        raise DataError(
            f"annotations {str(path)!r} has no rows (header only); was the annotation run empty or interrupted before its first batch?"
        )
    if counts["n_valid_rows"] == 0:
        raise DataError(
            f"annotations {str(path)!r} has no valid rows: of {counts['n_rows']} rows, {counts['n_missing_values']} lack valence/arousal, "
            f"{counts['n_nan_values']} are NaN, {counts['n_out_of_range']} are outside [-1, 1], {counts['n_bad_bar_number']} have a bad "
            f"bar_number and {counts['n_missing_md5']} no md5; check the annotation run"
        )
    songs = pl.concat(acc.songs).sort("md5")
    n_malformed = int((~songs["md5"].str.contains(MD5_PATTERN)).sum())
    quality = DataQuality(str(path), n_songs=songs.height, n_malformed_md5=n_malformed, extra_columns=extra, **counts)
    if quality.n_excluded_rows:
        log.warning(
            "%d of %d rows of %s excluded (missing, NaN or out-of-range values, bad md5/bar_number)",
            quality.n_excluded_rows,
            quality.n_rows,
            path,
        )
    if n_malformed:
        log.warning("%d songs in %s have an md5 that is not 32 hex digits", n_malformed, path)
    return songs, quality


def _bar_va_correlation(acc: _Accumulator) -> float:
    """Pearson correlation of valence and arousal over all bars, from the running sums."""
    n = acc.counts["n_valid_rows"]
    sv, sa, svv, saa, sva = (float(x) for x in acc.sums)
    cov = sva / n - (sv / n) * (sa / n)
    denom = math.sqrt(max(svv / n - (sv / n) ** 2, 0.0) * max(saa / n - (sa / n) ** 2, 0.0))
    return cov / denom if denom > 0 else math.nan


def _quadrant_table(acc: _Accumulator, song_values: npt.NDArray[np.float64]) -> pl.DataFrame:
    """Bars and songs per quadrant, counts and fractions."""
    song_quadrants = quadrant_counts(song_values[:, 0], song_values[:, 1])
    return pl.DataFrame(
        {
            "level": ["bar"] * 4 + ["song"] * 4,
            "quadrant": list(QUADRANTS) * 2,
            "n": [*map(int, acc.quadrants), *map(int, song_quadrants)],
            "fraction": [
                *(acc.quadrants / max(1, acc.quadrants.sum())),
                *(song_quadrants / max(1, song_quadrants.sum())),
            ],
        }
    )


def _position_profile(acc: _Accumulator) -> pl.DataFrame:
    """Mean valence and arousal by relative position in the song."""
    return pl.DataFrame(
        {
            "position_bin": np.arange(POSITION_BINS),
            "position_start": np.arange(POSITION_BINS) / POSITION_BINS,
            "n_songs": acc.profile_n,
            "valence_mean": acc.profile_sum[:, 0] / np.maximum(acc.profile_n, 1),
            "arousal_mean": acc.profile_sum[:, 1] / np.maximum(acc.profile_n, 1),
        }
    )


@dataclass
class _WithMetadata:
    """Songs joined with their metadata, and what the genre analyses found (or why they were skipped)."""

    songs: pl.DataFrame
    variables: list[str]
    genres: pl.DataFrame | None = None
    genre_note: str | None = None
    coverage: GenreCoverage | None = None
    meta_path: str | None = None
    domain: DomainSummary | None = None


def _join_metadata(songs: pl.DataFrame, meta: Path | str | None, options: AnalysisOptions) -> _WithMetadata:
    """Join the metadata table and compute the genre table, restricted to the training domain when asked."""
    max_domain_distance = options.max_domain_distance
    if meta is None:
        if max_domain_distance is not None:
            raise DataError(
                "--max-domain-distance needs the metadata table (X.meta.csv beside the annotations, or --meta PATH)"
            )
        return _WithMetadata(
            songs,
            ["n_bars"],
            genre_note="genre analyses need the metadata table (X.meta.csv beside the "
            "annotations, or --meta PATH); none was given",
        )
    metadata = load_metadata(meta)
    renames = {c: f"{c}_meta" for c in metadata.table.columns if c in songs.columns and c != "md5"}
    table = metadata.table.rename(renames).with_columns(pl.lit(True).alias("_has_meta"))
    songs = songs.join(table, on="md5", how="left")
    n_with_meta = int(songs["_has_meta"].is_not_null().sum())
    songs = songs.drop("_has_meta")
    out = _WithMetadata(
        songs, ["n_bars", *(renames.get(c, c) for c in metadata.numeric_columns)], meta_path=metadata.path
    )
    if n_with_meta < songs.height:
        log.warning(
            "%d of %d analysed songs have no row in metadata %s", songs.height - n_with_meta, songs.height, meta
        )
    out.domain = domain_summary(songs, max_domain_distance)
    if max_domain_distance is not None and out.domain is None:
        raise DataError(
            f"--max-domain-distance needs a {DOMAIN_COLUMN!r} column in the metadata {metadata.path!r}; "
            "annotate with this midiva version, or drop the option"
        )
    if not metadata.has_genres:
        out.genre_note = f"metadata {metadata.path!r} has no {GENRE_COLUMN!r} column; genre analyses skipped"
        return out
    n_genres_per_song = songs["genres"].list.len().fill_null(0)
    genre_input = within_domain(songs, max_domain_distance)
    genres_found = genre_table(
        genre_input,
        n_boot=options.n_boot,
        seed=options.seed,
        level=options.level,
        min_songs=options.min_songs_per_genre,
    )
    coverage = GenreCoverage(
        songs.height,
        n_with_meta,
        int((n_genres_per_song > 0).sum()),
        int((n_genres_per_song > 1).sum()),
        genres_found.height,
    )
    out.coverage = coverage
    if coverage.n_with_genre == 0:
        out.genre_note = f"no analysed song has a genre in {metadata.path!r} ({GENRE_COLUMN} is empty or unmatched); genre analyses skipped"
        return out
    out.genres = genres_found
    if out.domain is not None and max_domain_distance is not None:
        out.genre_note = (
            f"genre tables use the {genre_input.height:,} of {songs.height:,} songs with domain_distance "
            f"<= {max_domain_distance:g} ({out.domain.n_excluded:,} left out, unknown distances included)"
        )
    elif coverage.fraction_with_genre < 0.5:
        out.genre_note = (
            f"genres are known for only {coverage.fraction_with_genre:.1%} of songs ({coverage.n_with_genre:,} of {coverage.n_songs:,}); "
            "genre tables describe that subset only"
        )
    return out


def song_names(songs: pl.DataFrame) -> pl.Series:
    """How people know each song: 'title — artist', 'title', or the md5 when the metadata has neither."""

    def text(name: str) -> pl.Expr:
        return pl.col(name).fill_null("").str.strip_chars() if name in songs.columns else pl.lit("")

    title, artist = text("title"), text("artist")
    named = pl.when(artist != "").then(pl.concat_str([title, pl.lit(" — "), artist])).otherwise(title)
    return songs.select(pl.when(title != "").then(named).otherwise(pl.col("md5")).alias("song")).to_series()


def _bar_distributions(acc: _Accumulator) -> tuple[Distribution, Distribution]:
    n = acc.counts["n_valid_rows"]
    out = []
    for j, dim in enumerate(DIMENSIONS):
        mean = acc.sums[j] / n
        var = max(acc.sums[2 + j] - n * mean * mean, 0.0) / (n - 1) if n > 1 else math.nan
        q = _hist_quantiles(acc.fine_hist[j], (0.05, 0.25, 0.5, 0.75, 0.95))
        out.append(Distribution("bar", dim, n, float(mean), math.sqrt(var), *_five(q), None, None))
    return out[0], out[1]


def _pick_examples(parts: list[pl.DataFrame], n_examples: int, seed: int) -> pl.DataFrame:
    schema = {"md5": pl.String, "bar_number": pl.Int32, "valence": pl.Float64, "arousal": pl.Float64}
    if not parts or n_examples <= 0:
        return pl.DataFrame(schema=schema)
    bars = pl.concat(parts)
    chosen = sorted(bars["md5"].unique().to_list(), key=lambda m: _example_key(seed, m))[:n_examples]
    order = {m: i for i, m in enumerate(chosen)}
    return (
        bars.filter(pl.col("md5").is_in(chosen))
        .with_columns(pl.col("md5").replace_strict(order, return_dtype=pl.Int64).alias("_order"))
        .sort(["_order", "bar_number"])
        .drop("_order")
        .cast(schema)  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------- writing


def _clean(value: Any) -> Any:
    """NaN and inf become None (valid JSON); numpy scalars become Python numbers."""
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _records(frame: pl.DataFrame) -> list[dict[str, Any]]:
    return [{k: _clean(v) for k, v in row.items()} for row in frame.iter_rows(named=True)]

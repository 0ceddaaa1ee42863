"""Analysis and report: planted effects are found, bad input is counted, the HTML really renders.

Every data set is synthetic and built here, with effects planted on purpose (metal high arousal,
ambient low arousal, pop high valence, blues low valence, tempo driving arousal).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from matplotlib.figure import Figure

from midiva.analysis import (
    AnnotationStats,
    bootstrap_mean_ci,
    compute_stats,
    effective_resamples,
    sidecar_paths,
)
from midiva.cli import main
from midiva.errors import DataError
from midiva.plots import plot_va_scatter
from midiva.report import (
    CORRELATION_WORDS,
    PACE_WORDS,
    full_summary,
    make_figures,
    observations,
    plot_distribution,
    plot_genre_boxplot,
    plot_position_profile,
    plot_va_curve,
    plot_va_heatmap,
    render_report,
    va_histogram2d,
    word_for,
    write_plots,
    write_tables,
)

HEADER = "md5,bar_number,valence,arousal\n"
# genre -> planted song-level (valence, arousal) mean
PLANTED = {"metal": (-0.2, 0.6), "ambient": (0.1, -0.5), "pop": (0.5, 0.2), "blues": (-0.4, -0.1), "dance": (0.5, 0.2)}
N_BOOT = 300


def _md5(rng: np.random.Generator) -> str:
    return rng.bytes(16).hex()


def _write_bars(path: Path, songs: list[tuple[str, np.ndarray, np.ndarray]], *, shuffle: int | None = None) -> Path:
    frames = [
        pl.DataFrame({"md5": [md5] * len(v), "bar_number": np.arange(len(v)), "valence": v, "arousal": a})
        for md5, v, a in songs
    ]
    table = pl.concat(frames)
    if shuffle is not None:
        table = table.sample(fraction=1.0, shuffle=True, seed=shuffle)
    table.write_csv(path)
    return path


def _ar1(rng: np.random.Generator, n: int, phi: float = 0.7, sd: float = 0.08) -> np.ndarray:
    x = np.zeros(n)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + rng.normal(0, sd)
    return x


def make_corpus(
    tmp_path: Path,
    *,
    n_per_genre: int = 30,
    n_multi: int = 12,
    n_untagged: int = 10,
    seed: int = 0,
    shuffle: int | None = None,
) -> tuple[Path, Path, dict[str, set[str]]]:
    """annotations.csv + annotations.meta.csv; returns the paths and genre -> md5s."""
    rng = np.random.default_rng(seed)
    songs, meta_rows, members = [], [], {g: set() for g in PLANTED}
    groups = [
        (("metal",), n_per_genre),
        (("ambient",), n_per_genre),
        (("pop",), n_per_genre),
        (("blues",), n_per_genre),
    ]
    groups += [(("pop", "dance"), n_multi), (("dance",), 8), ((), n_untagged)]
    plan = []
    for genres, k in [(g, k) for g, k in groups if k]:
        # offsets and tempos centred per group: the planted value is the genre's song-level
        # mean up to bar noise, so a correct interval must cover it
        offsets = rng.normal(0, 0.08, (k, 2))
        tempos = rng.uniform(60, 180, k)
        plan += zip([genres] * k, offsets - offsets.mean(axis=0), tempos - tempos.mean() + 120, strict=True)
    for genres, offset, tempo in plan:
        md5 = _md5(rng)
        base = np.mean([PLANTED[g] for g in genres], axis=0) if genres else np.zeros(2)
        mean = base + offset + [0.0, 0.004 * (tempo - 120)]
        n_bars = int(rng.integers(16, 60))
        v = np.clip(mean[0] + _ar1(rng, n_bars), -1, 1)
        a = np.clip(mean[1] + _ar1(rng, n_bars), -1, 1)
        songs.append((md5, v, a))
        for g in genres:
            members[g].add(md5)
        meta_rows.append(
            {
                "md5": md5,
                "source": "synthetic",
                "split": "train",
                "title": f"t{len(meta_rows)}",
                "artist": "a",
                "music_styles_curated": "|".join(genres),
                "num_tracks": int(rng.integers(1, 12)),
                "tempo": float(tempo),
                "NOMML": int(rng.integers(1, 30)),
                "n_bars": n_bars,
                "n_notes": n_bars * int(rng.integers(4, 30)),
            }
        )
    csv = _write_bars(tmp_path / "annotations.csv", songs, shuffle=shuffle)
    meta = tmp_path / "annotations.meta.csv"
    pl.DataFrame(meta_rows).write_csv(meta)
    return csv, meta, members


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, set[str]]]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def stats(corpus: tuple[Path, Path, dict[str, set[str]]]) -> AnnotationStats:
    csv, meta, _ = corpus
    return compute_stats(csv, meta, n_boot=N_BOOT, seed=1)


def _genre(stats: AnnotationStats, name: str) -> dict:
    assert stats.genres is not None
    return stats.genres.filter(pl.col("genre") == name).row(0, named=True)


# ---------------------------------------------------------------- planted effects


def test_planted_genre_extremes_are_found_and_called_significant(stats: AnnotationStats) -> None:
    assert stats.genres is not None
    ranked = stats.genres.filter(pl.col("ranked"))
    assert ranked.sort("arousal_mean")["genre"][-1] == "metal"
    assert ranked.sort("arousal_mean")["genre"][0] == "ambient"
    assert ranked.sort("valence_mean")["genre"][0] == "blues"
    notes = " ".join(observations(stats))
    assert "Highest mean arousal: metal" in notes and "lowest: ambient" in notes
    assert "beyond both confidence intervals" in notes


@pytest.mark.parametrize("genre", ["metal", "ambient", "pop", "blues"])
def test_confidence_intervals_cover_the_planted_genre_mean(stats: AnnotationStats, genre: str) -> None:
    row = _genre(stats, genre)
    for j, dim in enumerate(("valence", "arousal")):
        assert row[f"{dim}_ci_low"] <= PLANTED[genre][j] <= row[f"{dim}_ci_high"], (dim, row)
        assert row[f"{dim}_ci_high"] - row[f"{dim}_ci_low"] < 0.2


def test_multi_genre_songs_count_in_each_of_their_genres(
    stats: AnnotationStats, corpus: tuple[Path, Path, dict[str, set[str]]]
) -> None:
    _, _, members = corpus
    assert _genre(stats, "pop")["n_songs"] == len(members["pop"]) == 30 + 12
    assert _genre(stats, "dance")["n_songs"] == len(members["dance"]) == 12 + 8
    assert _genre(stats, "pop")["n_multi_genre_songs"] == 12
    assert _genre(stats, "metal")["n_multi_genre_songs"] == 0
    assert stats.coverage is not None
    assert stats.coverage.n_multi_genre == 12
    assert stats.coverage.n_with_genre == stats.coverage.n_songs - 10
    assert _genre(stats, "dance")["ranked"] and not stats.genres.filter(pl.col("n_songs") < 20)["ranked"].any()  # type: ignore[union-attr]


def test_a_long_song_does_not_dominate_its_genre(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    songs = [(_md5(rng), np.full(10, -0.5), np.zeros(10)) for _ in range(10)]
    songs.append((_md5(rng), np.full(5000, 0.9), np.zeros(5000)))
    csv = _write_bars(tmp_path / "x.csv", songs)
    pl.DataFrame({"md5": [s[0] for s in songs], "music_styles_curated": "opera"}).write_csv(tmp_path / "x.meta.csv")
    result = compute_stats(csv, tmp_path / "x.meta.csv", n_boot=N_BOOT, min_songs_per_genre=5)
    assert _genre(result, "opera")["valence_mean"] == pytest.approx((10 * -0.5 + 0.9) / 11)
    assert result.song_level[0].mean == pytest.approx((10 * -0.5 + 0.9) / 11)
    assert result.bar_level[0].mean == pytest.approx((100 * -0.5 + 5000 * 0.9) / 5100, abs=1e-6)


def test_tempo_correlation_is_found_and_unrelated_metadata_is_not(stats: AnnotationStats) -> None:
    assert stats.correlations is not None
    table = {(r["variable"], r["dimension"]): r for r in stats.correlations.iter_rows(named=True)}
    tempo = table[("tempo", "arousal")]
    assert tempo["ci_low"] > 0 and tempo["pearson_r"] > 0.3
    assert ("notes_per_bar", "valence") in table and ("num_tracks", "arousal") in table
    nomml = table[("NOMML", "arousal")]
    assert nomml["ci_low"] < 0 < nomml["ci_high"]
    assert ("n_bars_meta", "valence") in table  # the metadata's n_bars does not clobber the annotated one


def test_bootstrap_interval_has_nominal_coverage() -> None:
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(200):
        sample = rng.normal(0.3, 0.2, size=30)
        low, high = bootstrap_mean_ci(sample, n_boot=400, rng=rng)[0]
        hits += low <= 0.3 <= high
    assert 0.88 <= hits / 200 <= 0.99
    a = bootstrap_mean_ci(np.arange(50.0), n_boot=100, rng=np.random.default_rng(5))
    b = bootstrap_mean_ci(np.arange(50.0), n_boot=100, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert np.isnan(bootstrap_mean_ci(np.array([1.0]), n_boot=100, rng=rng)).all()
    assert effective_resamples(100, 1000) == 1000 and effective_resamples(10**7, 1000) == 200


# ---------------------------------------------------------------- out of core and order


def test_several_passes_and_shuffled_rows_give_identical_results(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    csv, meta, _ = make_corpus(tmp_path / "a", n_per_genre=8)
    shuffled, _, _ = make_corpus(tmp_path / "b", n_per_genre=8, shuffle=7)  # same songs, rows shuffled
    one = compute_stats(csv, meta, n_boot=N_BOOT)
    many = compute_stats(csv, meta, n_boot=N_BOOT, max_rows_in_memory=300)
    mixed = compute_stats(shuffled, meta, n_boot=N_BOOT, max_rows_in_memory=700)
    assert one.n_buckets == 1 and many.n_buckets > 3 and mixed.n_buckets > 1
    for other in (many, mixed):
        assert other.quality.n_valid_rows == one.quality.n_valid_rows
        np.testing.assert_array_equal(other.fine_hist, one.fine_hist)
        np.testing.assert_array_equal(other.heatmap, one.heatmap)
        left, right = one.songs.sort("md5"), other.songs.sort("md5")
        numeric = [c for c, t in left.schema.items() if t.is_numeric()]
        np.testing.assert_allclose(
            right.select(numeric).to_numpy(), left.select(numeric).to_numpy(), rtol=1e-9, atol=1e-9
        )
        assert other.genres is not None and one.genres is not None
        assert other.genres.equals(one.genres)
        assert other.examples.equals(one.examples)
        np.testing.assert_allclose(
            other.position_profile["valence_mean"].to_numpy(), one.position_profile["valence_mean"].to_numpy()
        )


def test_song_sums_are_bit_identical_however_the_rows_are_sliced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run sums add rows in file order, so slicing (and polars' thread count) cannot change a digit."""
    import midiva.analysis as analysis

    csv, meta, _ = make_corpus(tmp_path, n_per_genre=6)
    whole = compute_stats(csv, meta, n_boot=N_BOOT)
    monkeypatch.setattr(analysis, "RUN_SUM_ROWS", 7)  # slices much shorter than a song
    sliced = compute_stats(csv, meta, n_boot=N_BOOT)
    assert sliced.songs.equals(whole.songs)
    assert sliced.position_profile.equals(whole.position_profile)
    frame = pl.read_csv(csv).sort("md5", "bar_number")
    by_song = frame.group_by("md5").agg(
        pl.col("valence").cast(pl.Float32).cast(pl.Float64).alias("v")
    )  # read as float32
    exact = {m: math.fsum(v) / len(v) for m, v in by_song.iter_rows()}
    got = dict(zip(whole.songs["md5"], whole.songs["valence_mean"], strict=True))
    assert got.keys() == exact.keys()
    assert max(abs(got[m] - exact[m]) for m in exact) < 1e-12


# ---------------------------------------------------------------- within-song dynamics


def test_dynamics_of_a_ramp_a_constant_an_ar1_series_and_a_gap(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    ramp = np.linspace(-0.6, 0.6, 50)
    ar = np.clip(_ar1(rng, 3000, phi=0.8, sd=0.05), -1, 1)
    songs = [("a" * 32, ramp, np.full(50, 0.2)), ("b" * 32, ar, ar[::-1].copy())]
    csv = _write_bars(tmp_path / "d.csv", songs)
    with open(csv, "a") as handle:  # bars 0, 1, 2, 10, 11, ..., 17: one gap
        for bar in [0, 1, 2, *range(10, 18)]:
            handle.write(f"{'c' * 32},{bar},0.1,0.1\n")
    songs_table = compute_stats(csv, n_boot=N_BOOT).songs
    r = songs_table.filter(pl.col("md5") == "a" * 32).row(0, named=True)
    assert r["valence_abs_change"] == pytest.approx(1.2 / 49)
    assert r["valence_start"] == pytest.approx(ramp[:10].mean())  # first fifth: bars 0-9 of 50
    assert r["valence_end"] == pytest.approx(ramp[40:].mean())
    assert r["valence_end_minus_start"] == pytest.approx(ramp[40:].mean() - ramp[:10].mean())
    assert r["arousal_lag1_autocorr"] is None and r["arousal_abs_change"] == pytest.approx(0.0, abs=1e-7)
    b = songs_table.filter(pl.col("md5") == "b" * 32).row(0, named=True)
    assert b["valence_lag1_autocorr"] == pytest.approx(0.8, abs=0.05)
    assert songs_table.filter(pl.col("md5") == "c" * 32)["n_consecutive_pairs"][0] == 2 + 7


# ---------------------------------------------------------------- bad input


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_empty_file_and_header_only_say_no_rows(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no rows"):
        compute_stats(_write(tmp_path / "empty.csv", ""))
    with pytest.raises(DataError, match="no rows"):
        compute_stats(_write(tmp_path / "header.csv", HEADER))


def test_missing_columns_are_named_and_extra_columns_ignored(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"lacks column\(s\) \['arousal'\]"):
        compute_stats(_write(tmp_path / "m.csv", "md5,bar_number,valence\n" + "a" * 32 + ",0,0.1\n"))
    extra = _write(
        tmp_path / "e.csv",
        "md5,bar_number,valence,arousal,model\n" + "".join(f"{'a' * 32},{i},0.1,0.2,x\n" for i in range(20)),
    )
    result = compute_stats(extra, n_boot=N_BOOT)
    assert result.quality.extra_columns == ("model",)
    assert result.quality.n_valid_rows == 20


def test_invalid_rows_are_counted_excluded_and_never_plotted(tmp_path: Path) -> None:
    good, bad = "a" * 32, "b" * 32
    rows = [f"{good},{i},0.5,-0.5" for i in range(20)]
    rows += [
        f"{good},20,nan,0.1",  # NaN
        f"{good},21,0.2,",  # missing arousal
        f"{good},22,abc,0.1",  # unparsable
        f"{good},23,1.5,0.1",  # out of range
        f"{good},24,0.1,-inf",  # out of range
        f"{good},-3,0.1,0.1",  # bad bar number
        ",25,0.1,0.1",  # missing md5
        f"{bad},0,NaN,2.0",  # NaN and out of range: one row, two reasons
        f"{good},25,1.0,-1.0",  # the closed interval's ends are valid
    ]
    result = compute_stats(_write(tmp_path / "bad.csv", HEADER + "\n".join(rows) + "\n"), n_boot=N_BOOT)
    q = result.quality
    assert (q.n_rows, q.n_valid_rows, q.n_excluded_rows) == (29, 21, 8)
    assert (q.n_nan_values, q.n_missing_values, q.n_out_of_range, q.n_bad_bar_number, q.n_missing_md5) == (
        2,
        2,
        3,
        1,
        1,
    )
    assert result.songs["md5"].to_list() == [good]  # the all-invalid song is gone
    assert result.songs["valence_mean"][0] == pytest.approx((20 * 0.5 + 1.0) / 21)
    assert result.fine_hist.sum(axis=1).tolist() == [21, 21] and result.heatmap.sum() == 21
    assert any("8 of 29 rows" in n for n in observations(result))
    ax = plot_va_scatter(
        result.songs.select(pl.col("valence_mean").alias("valence"), pl.col("arousal_mean").alias("arousal"))
    )
    assert sum(len(c.get_offsets()) for c in ax.collections) == 1


def test_no_valid_rows_is_an_error_that_gives_the_counts(tmp_path: Path) -> None:
    csv = _write(tmp_path / "nan.csv", HEADER + "".join(f"{'a' * 32},{i},nan,0.1\n" for i in range(5)))
    with pytest.raises(DataError, match=r"no valid rows: of 5 rows.* 5 are NaN"):
        compute_stats(csv)


def test_ragged_rows_are_a_clear_error(tmp_path: Path) -> None:
    csv = _write(tmp_path / "ragged.csv", HEADER + f"{'a' * 32},0,0.1,0.1,0.3\n")
    with pytest.raises(DataError, match="malformed"):
        compute_stats(csv)


def test_duplicate_bars_are_counted_and_averaged(tmp_path: Path) -> None:
    rows = [f"{'a' * 32},{i},0.2,0.2" for i in range(10)] + [f"{'a' * 32},3,0.6,0.2"]
    result = compute_stats(_write(tmp_path / "dup.csv", HEADER + "\n".join(rows) + "\n"), n_boot=N_BOOT)
    assert result.quality.n_duplicate_bars == 1 and result.quality.n_valid_rows == 10
    assert result.songs["valence_mean"][0] == pytest.approx((9 * 0.2 + 0.4) / 10)


def test_without_metadata_genre_analyses_say_they_need_it(corpus: tuple[Path, Path, dict[str, set[str]]]) -> None:
    csv, _, _ = corpus
    result = compute_stats(csv, None, n_boot=N_BOOT)
    assert result.genres is None and result.coverage is None
    assert result.genre_note is not None and "need the metadata table" in result.genre_note
    assert any("need the metadata table" in n for n in observations(result))
    assert result.correlations is not None and result.correlations["variable"].unique().to_list() == ["n_bars"]
    assert full_summary(result)["genres"]["available"] is False


def test_sparse_genres_are_reported_as_low_coverage(tmp_path: Path) -> None:
    csv, meta, _ = make_corpus(tmp_path, n_per_genre=3, n_multi=0, n_untagged=100)
    result = compute_stats(csv, meta, n_boot=N_BOOT)
    assert result.coverage is not None and result.coverage.fraction_with_genre == pytest.approx(20 / 120)
    assert result.genre_note is not None and "only 16.7% of songs" in result.genre_note
    assert result.genres is not None and not result.genres["ranked"].any()
    assert any("genres are not ranked" in n for n in observations(result))


def test_bad_metadata_tables(tmp_path: Path, corpus: tuple[Path, Path, dict[str, set[str]]]) -> None:
    csv, _, _ = corpus
    with pytest.raises(DataError, match="no 'md5' column"):
        compute_stats(csv, _write(tmp_path / "nomd5.csv", "id,music_styles_curated\n1,pop\n"))
    no_genre = compute_stats(csv, _write(tmp_path / "nogenre.csv", "md5,tempo\n" + "f" * 32 + ",120\n"), n_boot=N_BOOT)
    assert no_genre.genres is None and "no 'music_styles_curated' column" in (no_genre.genre_note or "")
    unmatched = compute_stats(
        csv, _write(tmp_path / "other.csv", "md5,music_styles_curated\n" + "f" * 32 + ",pop\n"), n_boot=N_BOOT
    )
    assert unmatched.genres is None and "no analysed song has a genre" in (unmatched.genre_note or "")


def test_sidecar_paths_and_failures_are_counted(tmp_path: Path, corpus: tuple[Path, Path, dict[str, set[str]]]) -> None:
    assert sidecar_paths("/d/run.csv") == (Path("/d/run.meta.csv"), Path("/d/run.failures.csv"))
    csv, meta, _ = corpus
    ledger = _write(
        tmp_path / "f.csv",
        "md5,stage,error_type,message\n"
        + "a" * 32
        + ",events,EmptyScoreError,x\n"
        + "b" * 32
        + ",read,MidiReadError,y\n"
        + "c" * 32
        + ",events,EmptyScoreError,z\n",
    )
    result = compute_stats(csv, meta, ledger, n_boot=N_BOOT)
    assert result.failures is not None and result.failures.n_failures == 3
    assert result.failures.by_error_type == (("EmptyScoreError", 2), ("MidiReadError", 1))
    assert any("3 files failed" in n for n in observations(result))


def test_example_songs_are_reproducible(corpus: tuple[Path, Path, dict[str, set[str]]], stats: AnnotationStats) -> None:
    csv, meta, _ = corpus
    again = compute_stats(csv, meta, n_boot=N_BOOT, seed=1)
    other = compute_stats(csv, meta, n_boot=N_BOOT, seed=2)
    picked = stats.examples["md5"].unique(maintain_order=True).to_list()
    assert len(picked) == 4 and again.examples.equals(stats.examples)
    assert picked != other.examples["md5"].unique(maintain_order=True).to_list()
    assert stats.examples.group_by("md5").len()["len"].min() >= 16  # type: ignore[operator]
    assert compute_stats(csv, meta, n_boot=N_BOOT, n_examples=0).examples.height == 0


# ---------------------------------------------------------------- plots (tested on their data)


def _quadrant_lines(ax: object) -> int:
    return sum(line.get_gid() == "quadrant-axis" for line in ax.get_lines())  # type: ignore[attr-defined]


def test_scatter_shows_every_point_or_a_stated_subset(stats: AnnotationStats) -> None:
    data = stats.genre_songs()
    ax = plot_va_scatter(data)
    assert sum(len(c.get_offsets()) for c in ax.collections) == data.height
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("valence", "arousal")
    assert ax.get_xlim() == (-1.0, 1.0) and ax.get_ylim() == (-1.0, 1.0) and _quadrant_lines(ax) == 2
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"metal", "ambient", "pop", "blues", "dance"} <= set(legend)
    small = plot_va_scatter(data, max_points=50, seed=3)
    assert sum(len(c.get_offsets()) for c in small.collections) == 50
    assert f"50 of {data.height}" in small.get_title()


def test_boxplot_has_one_box_per_genre_sorted_by_median(stats: AnnotationStats) -> None:
    data = stats.genre_songs()
    ax = plot_genre_boxplot(data, "arousal", genres=["metal", "ambient", "pop"])
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert [label.split(" ")[0] for label in labels] == ["ambient", "pop", "metal"]
    assert "n=30" in labels[0] and ax.get_xlabel() == "song mean arousal" and _quadrant_lines(ax) == 1
    with pytest.raises(ValueError, match="dimension"):
        plot_genre_boxplot(data, "dominance")


def test_heatmap_has_fixed_extent_and_all_counts() -> None:
    counts = va_histogram2d([-1.0, 1.0, 0.0, 0.05, 2.0], [-1.0, 1.0, 0.0, 0.05, 0.0], bins=4)
    assert counts.sum() == 4  # 2.0 is outside [-1, 1] and is not binned
    assert counts[0, 0] == 1 and counts[3, 3] == 1 and counts[2, 2] == 2
    ax = plot_va_heatmap(counts)
    image = ax.get_images()[0]
    assert tuple(image.get_extent()) == (-1.0, 1.0, -1.0, 1.0)
    assert image.get_array().sum() == 4 and _quadrant_lines(ax) == 2  # type: ignore[union-attr]
    assert [t.get_text() for t in ax.texts] == ["Q1 (V+A+)", "Q2 (V-A+)", "Q3 (V-A-)", "Q4 (V+A-)"]


def test_curve_and_distribution_plots(stats: AnnotationStats) -> None:
    md5 = stats.examples["md5"][0]
    bars = stats.examples.filter(pl.col("md5") == md5)
    ax = plot_va_curve(bars)
    assert [len(line.get_xdata()) for line in ax.get_lines() if line.get_gid() != "quadrant-axis"] == [bars.height] * 2
    assert ax.get_ylim() == (-1.0, 1.0) and _quadrant_lines(ax) == 1
    fig = Figure()
    ax2 = plot_distribution(np.array([[1, 3], [2, 2]]), fig.subplots(), level="song")
    assert ax2.get_ylabel() == "share of songs per bin" and "n = 4" in ax2.get_title()


def test_tables_and_figures_are_written(stats: AnnotationStats, tmp_path: Path) -> None:
    tables = write_tables(stats, tmp_path / "t")
    names = {p.name for p in tables}
    assert {"songs.csv", "genres.csv", "correlations.csv", "dynamics.csv", "summary.json", "heatmap_bars.csv"} <= names
    genres = pl.read_csv(tmp_path / "t" / "genres.csv")
    assert genres.filter(pl.col("genre") == "metal")["n_songs"][0] == 30
    songs = pl.read_csv(tmp_path / "t" / "songs.csv")
    assert songs.height == stats.quality.n_songs and songs.filter(pl.col("genres") == "pop|dance").height == 12
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["quality"]["n_valid_rows"] == stats.quality.n_valid_rows and summary["observations"]
    figures = write_plots(stats, tmp_path / "p", ("png", "svg"))
    assert {p.stem for p in figures} >= {
        "distributions",
        "va_heatmaps",
        "va_scatter_by_genre",
        "genre_boxplots",
        "genre_heatmaps",
        "position_profile",
        "example_curves",
    }
    for path in figures:
        head = path.read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else b"<svg" in head or b"<?xml" in head


# ---------------------------------------------------------------- CLI


def test_cli_stats_plot_report(
    corpus: tuple[Path, Path, dict[str, set[str]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv, _, _ = corpus  # the metadata is found beside the CSV
    assert main(["stats", str(csv), "--out", str(tmp_path / "s"), "--n-boot", "200"]) == 0
    printed = capsys.readouterr()
    assert printed.out == ""  # without --json stdout stays empty; the observations go to stderr
    assert "Highest mean arousal: metal" in printed.err and f"in {tmp_path / 's'}" in printed.err
    assert main(["-q", "stats", str(csv), "--out", str(tmp_path / "s"), "--n-boot", "200", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["genres"]["available"] and summary["metadata"].endswith("annotations.meta.csv")
    assert (tmp_path / "s" / "genres.csv").is_file() and (tmp_path / "s" / "run.json").is_file()
    assert main(["-q", "stats", str(csv), "--no-meta", "--out", str(tmp_path / "n"), "--n-boot", "200", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["genres"]["available"] is False
    assert main(["-q", "plot", str(csv), "--out", str(tmp_path / "p"), "--format", "svg", "--n-boot", "200"]) == 0
    assert {p.suffix for p in (tmp_path / "p").iterdir() if p.name != "run.json"} == {".svg"}
    assert main(["-q", "report", str(csv), "--out", str(tmp_path / "r"), "--n-boot", "200", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(tmp_path / "r" / "report.html")
    assert main(["-q", "report", str(csv), "--out", "-", "--n-boot", "200"]) == 0
    assert capsys.readouterr().out.startswith("<!doctype html>")


def test_cli_bad_input_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]) == 1  # nothing usable given
    assert "cannot read annotations" in capsys.readouterr().err and not (tmp_path / "o").exists()
    empty = _write(tmp_path / "empty.csv", "")
    assert main(["stats", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "DataError" in capsys.readouterr().err
    meta = _write(tmp_path / "m.csv", "md5\n")
    assert main(["stats", str(empty), "--meta", str(meta), "--no-meta", "--out", str(tmp_path)]) == 2


# ---------------------------------------------------------------- the HTML really renders

_PROBE = (
    "<script>window.addEventListener('load',function(){var r={images:[],tables:[]};"
    "document.querySelectorAll('img').forEach(function(i){var b=i.getBoundingClientRect();"
    "r.images.push([i.naturalWidth,i.naturalHeight,b.left+scrollX,b.top+scrollY,b.width,b.height]);});"
    "document.querySelectorAll('table').forEach(function(e){var b=e.getBoundingClientRect();"
    "r.tables.push([b.left+scrollX,b.top+scrollY,Math.min(b.width,innerWidth-b.left),b.height,e.rows.length]);});"
    "r.height=document.documentElement.scrollHeight;var d=document.createElement('pre');d.id='probe';"
    "d.textContent=JSON.stringify(r);document.body.appendChild(d);});</script>"
)


def _chromium() -> str:
    """The headless browser; missing it fails under CI=true (scripts/test.sh installs it there) and skips elsewhere."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        how = "install it (`apt-get install -y chromium`), or run `CI=true bash scripts/test.sh`, which installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(f"chromium is not installed, and CI=true requires the report screenshot test: {how}")
        pytest.skip(f"the report screenshot test needs headless chromium, which is not installed: {how}")
    return found


def _run_chromium(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--virtual-time-budget=10000",
    ]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=180, check=False)


def test_report_renders_images_and_tables_in_headless_chromium(stats: AnnotationStats, tmp_path: Path) -> None:
    from matplotlib.image import imread

    browser = _chromium()
    page = render_report(stats)
    assert "data:image/png;base64," in page and "<script" not in page and "http" not in page.split("</style>")[1]
    n_images, n_tables = page.count("<img "), page.count("<table>")
    assert n_images == 7 and n_tables >= 6
    probed = tmp_path / "probe.html"  # the page plus a script that measures it once loaded
    probed.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = _run_chromium(browser, "--window-size=1280,1000", "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    start = dom.stdout.index('<pre id="probe">') + len('<pre id="probe">')
    layout = json.loads(dom.stdout[start : dom.stdout.index("</pre>", start)])
    assert len(layout["images"]) == n_images and len(layout["tables"]) == n_tables
    assert all(nw > 100 and nh > 100 and w > 100 and h > 100 for nw, nh, _, _, w, h in layout["images"])
    height = min(int(layout["height"]) + 10, 16000)
    shot = tmp_path / "shot.png"
    done = _run_chromium(browser, f"--window-size=1280,{height}", f"--screenshot={shot}", probed.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = imread(shot)[..., :3]
    assert pixels.shape[0] >= min(height, 16000) - 10 and pixels.shape[1] == 1280

    def ink(x: float, y: float, w: float, h: float) -> tuple[float, float]:
        region = pixels[int(y) + 2 : int(y + h) - 2, int(x) + 2 : int(x + w) - 2]
        return float((region.mean(axis=2) < 0.9).mean()), float(region.std())

    for _, _, x, y, w, h in layout["images"]:
        if y + h <= pixels.shape[0]:
            share, spread = ink(x, y, w, h)
            assert share > 0.02 and spread > 0.05, (x, y, share, spread)  # a drawn figure, not a blank box
    for x, y, w, h, rows in layout["tables"]:
        if y + h <= pixels.shape[0]:
            assert rows >= 2 and ink(x, y, w, h)[0] > 0.01  # borders and text were painted
    right_margin = pixels[:, 1240:]
    assert (right_margin.mean(axis=2) > 0.97).mean() > 0.95  # the page itself is white: ink above is content


def test_report_without_metadata_states_it(corpus: tuple[Path, Path, dict[str, set[str]]]) -> None:
    csv, _, _ = corpus
    page = render_report(compute_stats(csv, None, n_boot=N_BOOT, n_examples=0))
    assert "genre analyses need the metadata table" in page
    assert page.count("<img ") == 4  # distributions, heat maps, scatter, position profile


# ---------------------------------------------------------------- what annotate writes, read by content


def test_parquet_and_csv_are_told_apart_by_content(
    corpus: tuple[Path, Path, dict[str, set[str]]], tmp_path: Path, stats: AnnotationStats
) -> None:
    csv, meta, _ = corpus
    frame = pl.read_csv(csv).cast(
        {"bar_number": pl.Int32, "valence": pl.Float32, "arousal": pl.Float32}
    )  # annotate's Parquet types
    disguised = tmp_path / "annotations.csv"  # Parquet bytes under a CSV name
    frame.write_parquet(disguised)
    plain = tmp_path / "table.parquet"  # CSV text under a Parquet name
    plain.write_bytes(csv.read_bytes())
    for path in (disguised, plain):
        other = compute_stats(path, meta, n_boot=N_BOOT, seed=1)
        assert other.quality.n_valid_rows == stats.quality.n_valid_rows and other.quality.n_rows == stats.quality.n_rows
        np.testing.assert_array_equal(other.fine_hist, stats.fine_hist)
        assert other.genres is not None and stats.genres is not None and other.genres.equals(stats.genres)
    many = compute_stats(disguised, meta, n_boot=N_BOOT, seed=1, max_rows_in_memory=500)
    assert many.n_buckets > 1 and many.quality.n_valid_rows == stats.quality.n_valid_rows


def test_cli_stats_reads_the_parquet_annotate_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    examples = Path(__file__).resolve().parents[1] / "src" / "midiva" / "assets" / "examples"
    out = tmp_path / "out" / "annotations.csv"
    assert main(["-q", "annotate", str(examples), "--out", str(out), "--parquet"]) == 0
    for table in (out, out.with_suffix(".parquet")):
        assert (
            main(["-q", "stats", str(table), "--out", str(tmp_path / table.suffix[1:]), "--n-boot", "50", "--json"])
            == 0
        )
        summary = json.loads(capsys.readouterr().out)
        assert summary["quality"]["n_valid_rows"] == 40 and summary["metadata"] == str(
            tmp_path / "out" / "annotations.meta.csv"
        )
    songs = pl.read_csv(tmp_path / "parquet" / "songs.csv")
    assert sorted(songs["song"]) == sorted(p.stem for p in examples.glob("*.mid"))  # named by title, not md5


def test_songs_are_named_by_title_and_artist_with_md5_as_fallback(stats: AnnotationStats, tmp_path: Path) -> None:
    names = dict(stats.songs.select("md5", "song").iter_rows())
    assert all(name.startswith("t") and name.endswith(" — a") for name in names.values())
    write_tables(stats, tmp_path / "t")
    assert pl.read_csv(tmp_path / "t" / "songs.csv").columns[:2] == ["md5", "song"]
    fig = make_figures(stats)["example_curves"]
    titles = [ax.get_title() for ax in fig.axes]
    md5s = stats.examples["md5"].unique(maintain_order=True).to_list()
    assert [t.split(" (")[0] for t in titles] == [names[m] for m in md5s] and all(
        f"md5 {m[:8]}" in t for t, m in zip(titles, md5s, strict=True)
    )
    rows = [f"{'a' * 32},{i},0.1,0.2" for i in range(20)] + [f"{'b' * 32},{i},0.3,0.2" for i in range(20)]
    csv = _write(tmp_path / "n.csv", HEADER + "\n".join(rows) + "\n")
    meta = _write(tmp_path / "n.meta.csv", "md5,title,artist\n" + "a" * 32 + ",Blue Sky,\n" + "b" * 32 + ",,Someone\n")
    named = dict(compute_stats(csv, meta, n_boot=N_BOOT).songs.select("md5", "song").iter_rows())
    assert named == {"a" * 32: "Blue Sky", "b" * 32: "b" * 32}  # an artist without a title names nothing
    assert dict(compute_stats(csv, None, n_boot=N_BOOT).songs.select("md5", "song").iter_rows()) == {
        "a" * 32: "a" * 32,
        "b" * 32: "b" * 32,
    }


def _legend_clear_of_the_data(ax: Any) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(ax.figure).get_renderer()
    ax.figure.draw_without_rendering()
    return bool(ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1)


def test_legends_sit_outside_the_curves(stats: AnnotationStats) -> None:
    bars = stats.examples.filter(pl.col("md5") == stats.examples["md5"][0])
    for ax in (plot_va_curve(bars), plot_distribution(stats.fine_hist), plot_position_profile(stats.position_profile)):
        assert _legend_clear_of_the_data(ax)


@pytest.mark.parametrize("peak", [1, 3, 9, 10, 500])
def test_heatmap_colourbar_ticks_are_whole_counts(peak: int) -> None:
    counts = np.zeros((4, 4), np.int64)
    counts[0, 0], counts[1, 2] = peak, 1
    ax = plot_va_heatmap(counts)
    ax.figure.draw_without_rendering()
    colourbar = next(a for a in ax.figure.axes if a is not ax)
    labels = [t.get_text() for t in colourbar.get_yticklabels() if t.get_text()]
    assert labels and all(label.replace(",", "").isdigit() for label in labels), labels
    assert str(peak) in labels or peak >= 10  # small counts: every whole number can be shown


def _dynamics_corpus(tmp_path: Path, name: str, step: float) -> AnnotationStats:
    """Songs whose consecutive bars differ by exactly `step` (a zig-zag)."""
    rows = [
        f"{md5 * 32},{i},{0.1 + (step if i % 2 else 0.0):.4f},{0.2 - (step if i % 2 else 0.0):.4f}"
        for md5 in "abcdef"
        for i in range(24)
    ]
    return compute_stats(_write(tmp_path / f"{name}.csv", HEADER + "\n".join(rows) + "\n"), n_boot=N_BOOT)


def test_report_wording_comes_from_one_set_of_thresholds(tmp_path: Path) -> None:
    assert [word_for(x, PACE_WORDS) for x in (0.0, 0.040, 0.048, 0.05, 0.1, 0.2)] == [
        "slowly",
        "slowly",
        "slowly",
        "moderately",
        "moderately",
        "quickly",
    ]
    assert [word_for(x, CORRELATION_WORDS) for x in (0.05, 0.2, 0.4, 0.9)] == [
        "negligible",
        "weak",
        "moderate",
        "strong",
    ]
    pace = {}
    for name, step in (("a", 0.040), ("b", 0.048), ("c", 0.2)):
        (sentence,) = [
            n for n in observations(_dynamics_corpus(tmp_path, name, step)) if "consecutive bars differ" in n
        ]
        assert f"differ by {step:.3f} in valence" in sentence
        pace[name] = sentence.split("so VA changes ")[1].split(" ")[0]
    assert pace == {"a": "slowly", "b": "slowly", "c": "quickly"}  # the same number always gets the same word


def test_constant_songs_do_not_break_the_observations(tmp_path: Path) -> None:
    rows = [f"{md5 * 32},{i},0.3,-0.2" for md5 in "abc" for i in range(12)]
    result = compute_stats(_write(tmp_path / "flat.csv", HEADER + "\n".join(rows) + "\n"), n_boot=N_BOOT)
    notes = " ".join(observations(result))
    assert "autocorrelation undefined (constant) / undefined (constant)" in notes and "changes slowly" in notes
    assert "<li>" in render_report(result)


def test_domain_distance_is_summarised_plotted_and_restricts_genre_tables(
    tmp_path: Path, corpus: tuple[Path, Path, dict[str, set[str]]]
) -> None:
    from midiva.report import plot_domain_distance, render_report

    csv, meta, members = corpus
    table = pl.read_csv(meta)
    # metal songs lie far from the training data; one song's distance is unknown (an older model)
    distance = [3.0 if m in members["metal"] else 0.9 for m in table["md5"]]
    distance[-1] = None  # type: ignore[call-overload]
    with_domain = tmp_path / "annotations.meta.csv"
    table.with_columns(pl.Series("domain_distance", distance, dtype=pl.Float64)).write_csv(with_domain)
    all_songs = compute_stats(csv, with_domain, n_boot=N_BOOT, seed=1)
    near = compute_stats(csv, with_domain, n_boot=N_BOOT, seed=1, max_domain_distance=2.0)
    d = all_songs.domain
    assert d is not None and d.n_known == table.height - 1 and d.n_unknown == 1
    assert d.fraction_above[">2"] == pytest.approx(len(members["metal"]) / (table.height - 1))
    assert all_songs.summary()["domain_distance"]["quantiles"]["p50"] == pytest.approx(0.9)
    assert "metal" in all_songs.genres["genre"].to_list()
    assert near.genres is not None and "metal" not in near.genres["genre"].to_list()
    assert near.domain is not None and near.domain.n_excluded == len(members["metal"]) + 1
    assert "domain_distance <= 2" in (near.genre_note or "")
    ax = plot_domain_distance(d.values, max_distance=2.0)
    assert sum(p.get_height() for p in ax.patches) == d.n_known
    assert "domain_distance" in ax.get_xlabel()
    assert "Distance from the training data" in render_report(near)
    with pytest.raises(DataError, match="domain_distance"):
        compute_stats(csv, meta, n_boot=N_BOOT, seed=1, max_domain_distance=2.0)

"""The one correlation and the one quadrant rule, and that training and statistics share them."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from midiva.analysis import correlation_table
from midiva.metrics import level_metrics, pearson, quadrant_counts, quadrant_of

SRC = Path(__file__).resolve().parents[1] / "src" / "midiva"


def test_pearson_of_an_exactly_constant_side_is_nan_even_when_its_mean_rounds() -> None:
    # the mean of three 0.1s is not 0.1 in floating point: the deviations are ~1e-17, not 0
    assert np.full(3, 0.1).mean() != 0.1
    assert math.isnan(pearson(np.full(3, 0.1), np.array([1.0, 2.0, 4.0])))
    assert math.isnan(pearson(np.array([1.0, 2.0]), np.full(2, 0.7)))
    assert math.isnan(pearson(np.array([]), np.array([])))
    x = np.array([0.1, 0.5, -0.3, 0.9, 0.2])
    y = np.array([1.0, 0.2, 0.4, -0.8, 0.0])
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson(x, 3 * x + 1) == pytest.approx(1.0)


def test_quadrant_rule_counts_zero_as_positive() -> None:
    v = np.array([0.0, -0.1, -0.2, 0.3, 0.0, -0.0])
    a = np.array([0.0, 0.5, -0.5, -0.1, -1.0, 0.2])
    assert quadrant_of(v, a).tolist() == [0, 1, 2, 3, 3, 0]  # -0.0 >= 0 as well
    assert quadrant_counts(v, a).tolist() == [2, 1, 1, 2]
    assert quadrant_counts(np.array([]), np.array([])).tolist() == [0, 0, 0, 0]


def test_sign_accuracy_follows_the_quadrant_rule() -> None:
    pred = np.array([[0.0, 0.5], [-0.2, -0.0], [0.4, -0.3]])
    m = level_metrics(pred, np.zeros((3, 2)), np.array([0, 2, 3]))  # true Q1, Q3, Q4
    assert m.quadrant_accuracy == pytest.approx(2 / 3)  # bar 2 is predicted Q2: arousal -0.0 counts positive
    assert (m.valence_sign_accuracy, m.arousal_sign_accuracy) == (1.0, pytest.approx(2 / 3))


def test_song_correlations_use_the_same_pearson() -> None:
    songs = pl.DataFrame(
        {
            "tempo": [0.7] * 7,
            "size": [1.0, 3.0, 2.0, 5.0, 4.0, 0.5, 2.5],
            "valence_mean": [0.1, 0.4, -0.2, 0.3, 0.0, -0.5, 0.2],
            "arousal_mean": [0.0, 0.2, 0.1, 0.5, 0.3, -0.1, -0.2],
        }
    )
    table = correlation_table(songs, ["tempo", "size"])
    r = {(row["variable"], row["dimension"]): row["pearson_r"] for row in table.iter_rows(named=True)}
    assert r["tempo", "valence"] is None  # a constant variable has no correlation (was a rounding artefact)
    assert r["size", "arousal"] == pytest.approx(pearson(songs["size"].to_numpy(), songs["arousal_mean"].to_numpy()))


def test_one_home_for_each_rule() -> None:
    text = {p.name: p.read_text(encoding="utf-8") for p in SRC.glob("*.py")}
    defined = {
        name: sorted(f for f, t in text.items() if re.search(rf"^def {name}\(", t, re.M))
        for name in ("pearson", "quadrant_of", "plot_va_scatter", "plot_confusion")
    }
    assert defined == {
        "pearson": ["metrics.py"],
        "quadrant_of": ["metrics.py"],
        "plot_va_scatter": ["plots.py"],
        "plot_confusion": ["plots.py"],
    }
    assert not [f for f, t in text.items() if "corrcoef" in t]

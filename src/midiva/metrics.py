"""Metrics: predicted (valence, arousal) against targets, per bar and per clip, and the quadrant rule.

Input: predictions and targets (n, 2) float (column 0 valence, column 1 arousal, unitless in
[-1, 1]) with true quadrants, or padded (n_clips, max_bars, 2) arrays with a bar mask. Output:
`LevelMetrics` (MAE/MSE/RMSE, Pearson, Lin's CCC, quadrant and sign accuracy, the 4x4 quadrant
confusion matrix) and `Metrics` (bar and clip level), JSON-ready via `metrics_json`.

The package's one correlation (`pearson`) and one quadrant rule (`quadrant_of`: Q1 V>=0 A>=0,
Q2 V<0 A>=0, Q3 V<0 A<0, Q4 V>=0 A<0) live here; training, robustness and the annotation
statistics all use them. numpy only: importing this module does not import torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva.errors import DataError
from midiva.labels import QUADRANTS

log = logging.getLogger(__name__)

_POSITIVE_VALENCE, _POSITIVE_AROUSAL = (0, 3), (0, 1)  # quadrant indices (Q1..Q4 = 0..3) on each positive side


def quadrant_of(valence: npt.NDArray[np.floating], arousal: npt.NDArray[np.floating]) -> npt.NDArray[np.int64]:
    """Quadrant index 0..3 (Q1..Q4) from signs; zero counts as positive."""
    v = np.asarray(valence) >= 0
    a = np.asarray(arousal) >= 0
    return np.where(v & a, 0, np.where(~v & a, 1, np.where(~v & ~a, 2, 3))).astype(np.int64)


def quadrant_counts(valence: npt.NDArray[np.floating], arousal: npt.NDArray[np.floating]) -> npt.NDArray[np.int64]:
    """How many (valence, arousal) points fall in each quadrant, by `quadrant_of`: (4,) for Q1..Q4."""
    return np.bincount(quadrant_of(valence, arousal), minlength=4).astype(np.int64)


@dataclass(frozen=True)
class LevelMetrics:
    """Errors and agreement of predictions against targets at one level (bars or clips)."""

    n: int
    mae_valence: float
    mae_arousal: float
    mse_valence: float
    mse_arousal: float
    rmse_valence: float
    rmse_arousal: float
    pearson_valence: float
    pearson_arousal: float
    ccc_valence: float
    ccc_arousal: float
    quadrant_accuracy: float
    valence_sign_accuracy: float
    arousal_sign_accuracy: float
    confusion: tuple[tuple[int, ...], ...]  # rows: true Q1..Q4, columns: predicted


@dataclass(frozen=True)
class Metrics:
    """Bar- and clip-level metrics; `to_dict` gives flat keys such as 'clip.mae_valence'."""

    bar: LevelMetrics
    clip: LevelMetrics

    def to_dict(self) -> dict[str, float]:
        """Flat {'bar.mae_valence': ..., 'clip.quadrant_accuracy': ...} (confusion matrices left out)."""
        out: dict[str, float] = {}
        for level in ("bar", "clip"):
            for key, value in asdict(getattr(self, level)).items():
                if key != "confusion":
                    out[f"{level}.{key}"] = value
        return out


def pearson(x: npt.NDArray[np.floating], y: npt.NDArray[np.floating]) -> float:
    """Pearson correlation of two equal-length 1-D arrays; NaN when either side is constant (or empty)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size == 0 or x.min() == x.max() or y.min() == y.max():
        return math.nan  # exactly constant: its mean can differ from it by rounding, so test the values
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx**2).sum() * (dy**2).sum()))
    return float((dx * dy).sum() / den) if den > 0 else math.nan


def ccc(x: npt.NDArray[np.floating], y: npt.NDArray[np.floating]) -> float:
    """Lin's concordance correlation coefficient (population moments); NaN when both are constant and equal."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    cov = float(((x - x.mean()) * (y - y.mean())).mean())
    den = float(x.var() + y.var() + (x.mean() - y.mean()) ** 2)
    return 2 * cov / den if den > 0 else math.nan


def level_metrics(
    pred: npt.NDArray[np.floating], target: npt.NDArray[np.floating], quadrants: npt.NDArray[np.integer]
) -> LevelMetrics:
    """Metrics of predictions (n, 2) against targets (n, 2) with true quadrant indices (n,) 0..3.

    Raises:
        DataError: no rows (metrics of zero examples are meaningless).
    """
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if pred.shape[0] == 0:
        raise DataError("no predictions to score; the evaluated split is empty")
    err = pred - target
    mae, mse = np.abs(err).mean(0), (err**2).mean(0)
    q_pred = quadrant_of(pred[:, 0], pred[:, 1])
    q_true = np.asarray(quadrants, np.int64)
    confusion = np.zeros((4, 4), np.int64)
    np.add.at(confusion, (q_true, q_pred), 1)
    return LevelMetrics(
        n=int(pred.shape[0]),
        mae_valence=float(mae[0]),
        mae_arousal=float(mae[1]),
        mse_valence=float(mse[0]),
        mse_arousal=float(mse[1]),
        rmse_valence=float(np.sqrt(mse[0])),
        rmse_arousal=float(np.sqrt(mse[1])),
        pearson_valence=pearson(pred[:, 0], target[:, 0]),
        pearson_arousal=pearson(pred[:, 1], target[:, 1]),
        ccc_valence=ccc(pred[:, 0], target[:, 0]),
        ccc_arousal=ccc(pred[:, 1], target[:, 1]),
        quadrant_accuracy=float((q_pred == q_true).mean()),
        valence_sign_accuracy=float((np.isin(q_pred, _POSITIVE_VALENCE) == np.isin(q_true, _POSITIVE_VALENCE)).mean()),
        arousal_sign_accuracy=float((np.isin(q_pred, _POSITIVE_AROUSAL) == np.isin(q_true, _POSITIVE_AROUSAL)).mean()),
        confusion=tuple(tuple(int(v) for v in row) for row in confusion),
    )


def masked_metrics(
    pred: npt.NDArray[np.floating],
    target: npt.NDArray[np.floating],
    mask: npt.NDArray[np.bool_],
    quadrants: Sequence[str],
) -> Metrics:
    """Bar and clip metrics from padded (n_clips, max_bars, 2) arrays; only bars where mask is True count.

    A clip's prediction and target are the means over its real bars.

    Raises:
        DataError: a clip has no real bars, or there are no clips.
    """
    mask = np.asarray(mask, bool)
    counts = mask.sum(1)
    if mask.shape[0] == 0 or (counts == 0).any():
        raise DataError("every clip needs at least one real bar; got an empty clip or no clips")
    q = np.array([QUADRANTS.index(x) for x in quadrants], np.int64)
    w = mask[..., None].astype(np.float64)
    clip_pred = (np.where(w > 0, pred, 0.0)).sum(1) / counts[:, None]
    clip_target = (np.where(w > 0, target, 0.0)).sum(1) / counts[:, None]
    bar = level_metrics(np.asarray(pred)[mask], np.asarray(target)[mask], np.repeat(q, counts))
    return Metrics(bar=bar, clip=level_metrics(clip_pred, clip_target, q))


def to_json_safe(value: Any) -> Any:
    """NaN/inf -> None recursively, so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    return value


def metrics_json(metrics: Metrics) -> dict[str, Any]:
    """Flat metrics plus the confusion matrices, JSON-ready (NaN -> null)."""
    return to_json_safe(
        {**metrics.to_dict(), "bar.confusion": metrics.bar.confusion, "clip.confusion": metrics.clip.confusion}
    )

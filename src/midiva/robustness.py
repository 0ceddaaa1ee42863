"""Authoring robustness: does a model read the music or the way it was written down?

Input: a loaded model (`midiva.annotate.AnnotationModel`, any backend), labelled EMOPIA clips
(MIDI bytes + quadrant), and authoring rewrites from `midiva.authoring`.
Output:
  - `score_variants`: per rewrite, the usual clip metrics and the mean |Δ| of clip predictions
    against the unrewritten clips (`VariantScore`);
  - `score_medleys`: clips of different quadrants and songs joined at bar lines, scored per bar
    against each bar's own segment, with the lag (bars after a boundary until the predicted
    quadrant becomes the new segment's) (`MedleyScore`);
  - `file_sensitivity`: per real file, how far its mean valence/arousal move when its drums are
    removed or its velocities flattened (`FileSensitivity`).
Units: valence/arousal in [-1, 1]; bars are MuseTok bars; a clip's prediction is its bars' mean.
Predictions go through the same representation code as `midiva annotate` (`prepare_file`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva.authoring import (  # noqa: F401 - LabelledClip, Medley, build_medleys are part of the suite's API
    LabelledClip,
    Medley,
    Rewrite,
    build_medleys,
    constant_velocity,
    rewrite_bytes,
    seeded_rng,
    without_drums,
)
from midiva.errors import MidivaError
from midiva.labels import QUADRANTS
from midiva.metrics import level_metrics, quadrant_of

log = logging.getLogger(__name__)

FLAT_VELOCITY = 100


@dataclass(frozen=True)
class VariantScore:
    """One rewrite scored over a clip set.

    Attributes:
        variant: the rewrite's name ('original' for the clips as they are).
        n_clips: clips scored; n_failed: clips the rewrite or the model could not handle (with reasons).
        metrics: clip-level metrics (`LevelMetrics` fields) over the scored clips.
        mean_abs_delta_valence / _arousal: mean |clip prediction − original clip prediction|.
    """

    variant: str
    n_clips: int
    n_failed: int
    metrics: dict[str, float]
    mean_abs_delta_valence: float
    mean_abs_delta_arousal: float
    failures: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MedleyScore:
    """Bar-level scores of medleys: accuracy against each bar's own segment and boundary lags."""

    n_medleys: int
    n_bars: int
    n_boundaries: int
    bar_quadrant_accuracy: float
    median_lag_bars: float
    mean_lag_bars: float
    lags: tuple[int, ...]


@dataclass(frozen=True)
class FileSensitivity:
    """How one real file's mean prediction moves under drum removal and flat velocities (NaN: n/a)."""

    name: str
    n_bars: int
    valence: float
    arousal: float
    delta_valence_no_drums: float
    delta_arousal_no_drums: float
    delta_valence_flat_velocity: float
    delta_arousal_flat_velocity: float
    n_bars_beyond: int = 0  # bars whose |valence| or |arousal| exceeds `file_sensitivity`'s `beyond`


PredictFn = Callable[[bytes], npt.NDArray[np.float32]]


def bar_predictor(model: Any, *, include_drums: bool = True, batch_size: int = 4096) -> PredictFn:
    """MIDI bytes -> (n_bars, 2) predictions of an `AnnotationModel`, as `midiva annotate` computes them
    (through the runner's pipeline, `midiva.runner.stream`, any backend).

    Raises (from the returned function):
        MidivaError: the file cannot be represented (unreadable, empty, ...).
    """
    from midiva.runner import RunOptions, stream
    from midiva.sources import SourceRow

    options = RunOptions(
        batch_size=batch_size, strict=True, include_drums=include_drums, progress=False, device=model.device
    )

    def predict(data: bytes) -> npt.NDArray[np.float32]:
        row = SourceRow(md5="0" * 32, name="clip", music=data)
        ((_, _, preds),) = stream(
            [row], model.backend, encoders=model.encoders, regressor=model.regressor, options=options
        )
        return np.asarray(preds, np.float32)

    return predict


def _clip_metrics(
    pred: npt.NDArray[np.float64], quadrants: Sequence[str], mapping: Mapping[str, tuple[float, float]]
) -> dict[str, float]:
    q = np.array([QUADRANTS.index(x) for x in quadrants], np.int64)
    target = np.array([mapping[x] for x in quadrants], np.float64)
    m = level_metrics(pred, target, q)
    return {k: float(v) for k, v in vars(m).items() if k not in ("confusion", "n")}


def score_variants(
    predict: PredictFn,
    clips: Sequence[LabelledClip],
    variants: Mapping[str, Rewrite],
    mapping: Mapping[str, tuple[float, float]],
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[VariantScore]:
    """Score the clips as they are ('original', first) and under every rewrite.

    A clip that a rewrite or the model cannot handle is counted in `n_failed` by error type and
    left out of that variant's metrics; |Δ| compares only clips scored both ways.
    """
    originals: dict[str, npt.NDArray[np.float64]] = {}
    failures: dict[str, int] = {}
    for clip in clips:
        try:
            originals[clip.name] = predict(clip.data).mean(0).astype(np.float64)
        except MidivaError as err:
            failures[type(err).__name__] = failures.get(type(err).__name__, 0) + 1
    base = [c for c in clips if c.name in originals]
    if not base:
        raise MidivaError("no clip could be scored as it is; check the model and the clips")
    scores = [_variant_score("original", base, originals, originals, mapping, failures)]
    for name, rewrite in variants.items():
        if progress is not None:
            progress(name)
        preds: dict[str, npt.NDArray[np.float64]] = {}
        failed: dict[str, int] = {}
        for clip in base:
            try:
                data = rewrite_bytes(clip.data, rewrite, seeded_rng(seed, name, clip.name))
                preds[clip.name] = predict(data).mean(0).astype(np.float64)
            except MidivaError as err:
                failed[type(err).__name__] = failed.get(type(err).__name__, 0) + 1
        scores.append(_variant_score(name, [c for c in base if c.name in preds], preds, originals, mapping, failed))
    return scores


def _variant_score(
    name: str,
    clips: Sequence[LabelledClip],
    preds: Mapping[str, npt.NDArray[np.float64]],
    originals: Mapping[str, npt.NDArray[np.float64]],
    mapping: Mapping[str, tuple[float, float]],
    failed: Mapping[str, int],
) -> VariantScore:
    n_failed = int(sum(failed.values()))
    if not clips:
        nan = float("nan")
        return VariantScore(name, 0, n_failed, {}, nan, nan, dict(failed))
    pred = np.stack([preds[c.name] for c in clips])
    orig = np.stack([originals[c.name] for c in clips])
    delta = np.abs(pred - orig).mean(0)
    metrics = _clip_metrics(pred, [c.quadrant for c in clips], mapping)
    return VariantScore(name, len(clips), n_failed, metrics, float(delta[0]), float(delta[1]), dict(failed))


def score_medleys(predict: PredictFn, medleys: Sequence[Medley]) -> MedleyScore:
    """Bar quadrant accuracy against each bar's own segment, and the lag after every boundary.

    The lag of a boundary is the number of bars from it to the first bar predicted in the new
    segment's quadrant; a segment never predicted right counts its full length.
    """
    correct, total = 0, 0
    lags: list[int] = []
    for medley in medleys:
        pred = predict(medley.data)
        n = min(len(pred), len(medley.bar_quadrants))
        if len(pred) != len(medley.bar_quadrants):
            log.debug("%s: %d predicted bars for %d labelled", medley.name, len(pred), len(medley.bar_quadrants))
        q_pred = quadrant_of(pred[:n, 0], pred[:n, 1])
        truth = np.array([QUADRANTS.index(q) for q in medley.bar_quadrants[:n]], np.int64)
        correct += int((q_pred == truth).sum())
        total += n
        ends = [*medley.boundaries[1:], n]
        for start, end in zip(medley.boundaries, ends, strict=True):
            if start >= n:
                continue
            hit = np.flatnonzero(q_pred[start:end] == truth[start])
            lags.append(int(hit[0]) if hit.size else end - start)
    lag_array = np.asarray(lags, np.float64)
    return MedleyScore(
        n_medleys=len(medleys),
        n_bars=total,
        n_boundaries=len(lags),
        bar_quadrant_accuracy=correct / total if total else float("nan"),
        median_lag_bars=float(np.median(lag_array)) if lags else float("nan"),
        mean_lag_bars=float(lag_array.mean()) if lags else float("nan"),
        lags=tuple(lags),
    )


def file_sensitivity(predict: PredictFn, files: Mapping[str, bytes], *, beyond: float = 0.85) -> list[FileSensitivity]:
    """Per file: mean valence/arousal, and |Δ| of those means without drums and with flat velocities.

    A file without drums gets Δ 0 for drum removal; a file the model cannot read is left out.
    """
    no_drums, flat = without_drums(), constant_velocity(FLAT_VELOCITY)
    out = []
    for name, data in files.items():
        try:
            base = predict(data)
        except MidivaError:
            continue
        mean = base.mean(0)
        deltas = []
        for rewrite in (no_drums, flat):
            try:
                other = predict(rewrite_bytes(data, rewrite, seeded_rng(name)))
                deltas.append(np.abs(other.mean(0) - mean))
            except MidivaError:
                deltas.append(np.full(2, np.nan))
        out.append(
            FileSensitivity(
                name,
                len(base),
                float(mean[0]),
                float(mean[1]),
                float(deltas[0][0]),
                float(deltas[0][1]),
                float(deltas[1][0]),
                float(deltas[1][1]),
                int((np.abs(base) > beyond).any(1).sum()),
            )
        )
    return out

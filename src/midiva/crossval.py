"""Stage 6c: score any backend by song-grouped cross-validation on EMOPIA train+val, with song-bootstrap CIs.

Input: a preprocessed, labelled EMOPIA directory (clips.csv and labels_clip.json, as `midiva train`
reads) read as a `ClipTable`, and a *fit and predict* callable (`FitPredict`): given a `FoldTask`
(names of the stored clips to train on, to stop early on and to predict, and a seed) it returns
each predicted clip's per-bar predictions, (n_bars, 2) float arrays in the order of `task.predict`.
Output: `Scores`: per metric the mean over runs and a bootstrap 95% CI, with every run's graded
clip predictions (the mean of its bar predictions, as annotation writes them; never decoded to
quadrant points). Metrics are `midiva.model.level_metrics` over clips (`CV_METRICS`).
Units: valence and arousal in [-1, 1].

The protocol (`cross_validate`):

- The pool is the original clips of EMOPIA's train and val splits; test never enters it.
- For every seed r, the pool's songs go to K folds (`midiva.emopia.song_folds`, seeded by r,
  balanced in clips per quadrant), so each repetition partitions the pool differently and each
  clip is held out once per seed. For fold k, its clips are predicted by a model trained on the
  other folds' songs; a seeded, song-grouped 1/`inner_folds` of those songs is held back as the
  early-stopping set (original clips only, as EMOPIA's val is never augmented), and the rest
  train, with their stored authoring rewrites ('<clip>~aug<k>': the fold of their source clip).
- Medleys ('medley~<k>') mix 2-4 songs. One that holds a held-out or early-stopping song would
  leak it, so a fold keeps only the medleys whose every segment's song trains
  (`midiva.emopia.training_clips`). Filtering rather than regenerating: one preprocessed pool
  serves every fold and seed (regenerating means building and preprocessing new medleys 15
  times), and a kept medley is built exactly as one regenerated from the training songs would be,
  up to the choice of clips. Only about a third survive (each segment's song trains with
  probability ~0.7), so preprocess the pool with about 3x the recipe's medley count and cap each
  fold at the recipe's count with `max_medleys` (the first ones by index); each run records how
  many it kept.
- A metric's estimate is its mean over folds x seeds; its CI is a percentile bootstrap over songs
  (songs drawn with replacement, every run re-scored on the drawn songs' clips, seeded), so it
  covers the variation of the music as well as of training. `paired` differences of two backends
  scored on the same songs resample both at once, which is how a 0.02 difference is resolved.
- `official_scores` is the usual split: train on train, stop early on val (as `midiva train`
  does), score val and test; test is reported only, never used for a choice.

Scoring a new backend: write a `FitPredict` for it (see `mlp_fit_predict`, the features / MuseTok
MLP) and pass it to `cross_validate` and `official_scores`; `benchmarks/cv_protocol.py` prints the table.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva.atomic import write_csv_atomic
from midiva.config import DEFAULT_CONTEXT, DEFAULT_EXCLUDE_FEATURES
from midiva.emopia import (
    AUGMENT_MARK,
    MEDLEY_PREFIX,
    SPLITS,
    ClipSet,
    RawClip,
    build_clip_set,
    load_split,
    recipe_for,
    song_folds,
    training_clips,
)
from midiva.errors import DataError, OutputError
from midiva.labels import QUADRANTS, read_csv_rows, read_labels
from midiva.metrics import level_metrics, to_json_safe
from midiva.train import TrainConfig, fit, predict_clips

log = logging.getLogger(__name__)

CV_METRICS = (
    "clip.quadrant_accuracy",
    "clip.valence_sign_accuracy",
    "clip.arousal_sign_accuracy",
    "clip.mae_valence",
    "clip.mae_arousal",
    "clip.ccc_valence",
    "clip.ccc_arousal",
)
POOL_SPLITS = ("train", "val")
OFFICIAL_FOLD = -1  # `ScoredRun.fold` of a model trained on the official train split


# ---------------------------------------------------------------- clips


@dataclass(frozen=True)
class ClipTable:
    """The stored clips of a preprocessed directory, with their clip-level targets (n_clips, 2)."""

    names: tuple[str, ...]
    songs: tuple[str, ...]
    quadrants: tuple[str, ...]
    splits: tuple[str, ...]
    targets: npt.NDArray[np.float64]

    @classmethod
    def from_dir(cls, data_dir: Path | str, labels_path: Path | str | None = None) -> ClipTable:
        """Read clips.csv (songs) and a clip label file (None: DATA/labels_clip.json).

        Raises:
            DataError: a file is missing or malformed, or a labelled clip is not in clips.csv.
        """
        data = Path(data_dir)
        if not (data / "clips.csv").is_file():
            raise DataError(
                f"{str(data / 'clips.csv')!r} is missing; run `midiva preprocess-emopia --out {data}` first"
            )
        song_of = {row["fname"]: row["song"] for row in read_csv_rows(data / "clips.csv")}
        labels, _ = read_labels(labels_path or data / "labels_clip.json")
        missing = [name for name in labels if name not in song_of]
        if missing:
            raise DataError(
                f"{len(missing)} labelled clips (e.g. {missing[0]!r}) are not in {data / 'clips.csv'}; "
                "rerun `midiva prepare-labels`"
            )
        names = tuple(labels)
        return cls(
            names,
            tuple(song_of[n] for n in names),
            tuple(labels[n].quadrant for n in names),
            tuple(labels[n].split for n in names),
            np.array([labels[n].targets.mean(0) for n in names], np.float64).reshape(-1, 2),
        )

    def originals(self, splits: Sequence[str]) -> list[int]:
        """Indices of the clips as distributed (no rewrites, no medleys) in these splits."""
        return [
            i
            for i, (n, s) in enumerate(zip(self.names, self.splits, strict=True))
            if s in splits and AUGMENT_MARK not in n and not n.startswith(MEDLEY_PREFIX)
        ]


def write_pool_view(emopia_dir: Path | str, out_dir: Path | str) -> Path:
    """An EMOPIA directory whose train split is train+val (test kept), so that preprocessing it augments the whole pool.

    `midiva preprocess-emopia --augment N --medleys M` rewrites and mixes train clips only; on this
    view every pool clip gets its rewrites and the medleys draw on all pool songs, as each CV fold's
    training songs then have the bundled recipe's augmentation. `midis/` is a symbolic link to the original's.

    Raises:
        DataError: `emopia_dir` has no official split files or no midis/. OutputError: `out_dir` cannot be written.
    """
    src, out = Path(emopia_dir).resolve(), Path(out_dir)
    files = {s: src / "split" / f"{s}.csv" for s in SPLITS}
    if not (src / "midis").is_dir() or not all(p.is_file() for p in files.values()):
        raise DataError(f"{str(src)!r} needs midis/ and split/{{train,val,test}}.csv to make a pooled view")
    try:
        (out / "split").mkdir(parents=True, exist_ok=True)
        link = out / "midis"
        if link.is_symlink() and link.resolve() != (src / "midis").resolve():
            link.unlink()
        if not link.exists():
            link.symlink_to(src / "midis", target_is_directory=True)
    except OSError as err:
        raise OutputError(f"cannot write the pooled view in {str(out)!r}: {err.strerror or err}") from err
    rows = {s: read_csv_rows(p) for s, p in files.items()}
    write_csv_atomic(
        out / "split" / "train.csv",
        ["fname", "label"],
        [{"fname": r["fname"], "label": r.get("label", "")} for s in POOL_SPLITS for r in rows[s]],
    )
    write_csv_atomic(
        out / "split" / "test.csv",
        ["fname", "label"],
        [{"fname": r["fname"], "label": r.get("label", "")} for r in rows["test"]],
    )
    return out


# ---------------------------------------------------------------- runs


@dataclass(frozen=True)
class FoldTask:
    """One training run: the stored clips to train on, to stop early on and to predict (by name)."""

    seed: int
    fold: int  # OFFICIAL_FOLD for the official split
    train: tuple[str, ...]
    early_stop: tuple[str, ...]
    predict: tuple[str, ...]


FitPredict = Callable[[FoldTask], Sequence[npt.NDArray[np.floating]]]
"""Train on `task.train` (seeded by `task.seed`, stopping on `task.early_stop`); return (n_bars, 2) per predicted clip."""


@dataclass(frozen=True)
class ScoredRun:
    """One run's graded clip predictions (n, 2) for the table rows `clips` it held out."""

    seed: int
    fold: int
    clips: npt.NDArray[np.int64]
    predictions: npt.NDArray[np.float64]
    n_train: int = 0
    n_medleys: int = 0
    n_early_stop: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Estimate:
    """A metric's mean over runs and its bootstrap CI."""

    mean: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """Half the CI's width: differences much smaller than this are not resolved."""
        return (self.high - self.low) / 2


@dataclass(frozen=True)
class Scores:
    """Estimates per metric (`CV_METRICS` keys) and the runs they come from."""

    name: str
    estimates: dict[str, Estimate]
    runs: tuple[ScoredRun, ...]


def _score_task(task: FoldTask, fit_predict: FitPredict, index: dict[str, int]) -> ScoredRun:
    """Run `fit_predict` on one task and check what it returns.

    Raises:
        DataError: it returned another number of clips, or arrays that are not (n_bars >= 1, 2).
    """
    started = time.perf_counter()
    bar_preds = list(fit_predict(task))
    if len(bar_preds) != len(task.predict):
        raise DataError(
            f"fit_predict returned {len(bar_preds)} clips for {len(task.predict)} asked (seed {task.seed}, "
            f"fold {task.fold}); return one (n_bars, 2) array per name of task.predict, in order"
        )
    clip_preds = np.zeros((len(bar_preds), 2), np.float64)
    for i, (name, pred) in enumerate(zip(task.predict, bar_preds, strict=True)):
        arr = np.asarray(pred, np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
            raise DataError(f"fit_predict returned shape {arr.shape} for clip {name!r}; expected (n_bars >= 1, 2)")
        clip_preds[i] = arr.mean(0)  # graded: the mean of the bars, as annotation writes them
    medleys = sum(n.startswith(MEDLEY_PREFIX) for n in task.train)
    return ScoredRun(
        task.seed,
        task.fold,
        np.array([index[n] for n in task.predict], np.int64),
        clip_preds,
        len(task.train),
        medleys,
        len(task.early_stop),
        time.perf_counter() - started,
    )


def fold_tasks(
    table: ClipTable,
    *,
    n_folds: int = 5,
    seeds: Sequence[int] = (0, 1, 2),
    inner_folds: int = 8,
    max_medleys: int | None = None,
) -> list[FoldTask]:
    """The cross-validation runs over the pool (originals of train and val), seed by seed and fold by fold.

    Raises:
        DataError: the pool has fewer songs than folds, or a fold's training songs fewer than `inner_folds`.
    """
    pool = table.originals(POOL_SPLITS)
    if not pool:
        raise DataError("no original train or val clips to cross-validate; check the labels' splits")
    songs = [table.songs[i] for i in pool]
    strata = [table.quadrants[i] for i in pool]
    tasks = []
    for seed in seeds:
        fold_of = song_folds(songs, n_folds, seed=seed, strata=strata)
        for k in range(n_folds):
            rest = [i for i in pool if fold_of[table.songs[i]] != k]
            inner = song_folds(
                [table.songs[i] for i in rest], inner_folds, seed=(seed, k), strata=[table.quadrants[i] for i in rest]
            )
            fit_songs = sorted(s for s, f in inner.items() if f != 0)
            tasks.append(
                FoldTask(
                    seed,
                    k,
                    tuple(training_clips(table.names, table.songs, fit_songs, max_medleys=max_medleys)),
                    tuple(table.names[i] for i in rest if inner[table.songs[i]] == 0),
                    tuple(table.names[i] for i in pool if fold_of[table.songs[i]] == k),
                )
            )
    return tasks


def cross_validate(
    table: ClipTable,
    fit_predict: FitPredict,
    *,
    n_folds: int = 5,
    seeds: Sequence[int] = (0, 1, 2),
    inner_folds: int = 8,
    max_medleys: int | None = None,
    n_boot: int = 1000,
    boot_seed: int = 0,
    on_run: Callable[[ScoredRun], None] | None = None,
) -> Scores:
    """Song-grouped K-fold cross-validation over train+val, repeated per seed (see the module docstring).

    Args:
        table: the stored clips (`ClipTable.from_dir`), originals and derived ones.
        fit_predict: trains one model per `FoldTask` and predicts its held-out clips.
        inner_folds: 1/inner_folds of a fold's training songs is its early-stopping set.
        max_medleys: keep at most this many medleys per run (None: every one whose songs all train).
        on_run: called after every run (progress).

    Raises:
        DataError: too few songs, or `fit_predict` returned the wrong clips or shapes.
    """
    tasks = fold_tasks(table, n_folds=n_folds, seeds=seeds, inner_folds=inner_folds, max_medleys=max_medleys)
    index = {n: i for i, n in enumerate(table.names)}
    runs = []
    for task in tasks:
        run = _score_task(task, fit_predict, index)
        log.info(
            "seed %d fold %d: %d train clips (%d medleys), %d early-stop, %d held out, %.1f s",
            run.seed,
            run.fold,
            run.n_train,
            run.n_medleys,
            run.n_early_stop,
            len(run.clips),
            run.seconds,
        )
        runs.append(run)
        if on_run is not None:
            on_run(run)
    return Scores("cv", bootstrap_estimates(runs, table, n_boot=n_boot, seed=boot_seed), tuple(runs))


def official_scores(
    table: ClipTable,
    fit_predict: FitPredict,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    splits: Sequence[str] = ("val", "test"),
    max_medleys: int | None = None,
    n_boot: int = 1000,
    boot_seed: int = 0,
    on_run: Callable[[ScoredRun], None] | None = None,
) -> dict[str, Scores]:
    """Train on the official train split (stopping early on val, as `midiva train`), score `splits` per seed.

    The CIs bootstrap the songs of each scored split.

    Raises:
        DataError: a split has no original clips, or `fit_predict` returned the wrong clips or shapes.
    """
    train_songs = sorted({table.songs[i] for i in table.originals(("train",))})
    stop = [table.names[i] for i in table.originals(("val",))]
    targets = {s: table.originals((s,)) for s in splits}
    for split, rows in (("train", train_songs), ("val", stop), *targets.items()):
        if not rows:
            raise DataError(f"the {split} split has no original clips in the labels; the official split needs it")
    index = {n: i for i, n in enumerate(table.names)}
    per_split: dict[str, list[ScoredRun]] = {s: [] for s in splits}
    for seed in seeds:
        predict = [table.names[i] for s in splits for i in targets[s]]
        task = FoldTask(
            seed,
            OFFICIAL_FOLD,
            tuple(training_clips(table.names, table.songs, train_songs, max_medleys=max_medleys)),
            tuple(stop),
            tuple(predict),
        )
        run = _score_task(task, fit_predict, index)
        log.info(
            "official split, seed %d: %d train clips (%d medleys), %.1f s",
            seed,
            run.n_train,
            run.n_medleys,
            run.seconds,
        )
        if on_run is not None:
            on_run(run)
        start = 0
        for split in splits:
            n = len(targets[split])
            per_split[split].append(
                replace(run, clips=run.clips[start : start + n], predictions=run.predictions[start : start + n])
            )
            start += n
    return {
        s: Scores(s, bootstrap_estimates(r, table, n_boot=n_boot, seed=boot_seed), tuple(r))
        for s, r in per_split.items()
    }


# ---------------------------------------------------------------- bootstrap


def _run_metrics(
    run: ScoredRun,
    table: ClipTable,
    quadrant_index: npt.NDArray[np.int64],
    keys: Sequence[str],
    select: npt.NDArray[np.int64] | None = None,
) -> npt.NDArray[np.float64]:
    rows = run.clips if select is None else run.clips[select]
    pred = run.predictions if select is None else run.predictions[select]
    scored = level_metrics(pred, table.targets[rows], quadrant_index[rows])
    return np.array([getattr(scored, key.split(".", 1)[1]) for key in keys], np.float64)


def bootstrap_estimates(
    runs: Sequence[ScoredRun],
    table: ClipTable,
    *,
    keys: Sequence[str] = CV_METRICS,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    baseline: Sequence[ScoredRun] = (),
) -> dict[str, Estimate]:
    """Each metric's mean over runs, with a percentile bootstrap CI over the runs' songs.

    A bootstrap draw takes as many songs as there are, with replacement, and re-scores every run on
    the clips of the drawn songs (a song drawn twice counts twice). With `baseline`, the statistic is
    the runs' mean minus the baseline runs' mean on the same draw: a paired difference.

    Raises:
        DataError: no runs, `n_boot` < 1, or `level` outside (0, 1).
    """
    if not runs:
        raise DataError("no runs to score")
    if n_boot < 1 or not 0 < level < 1:
        raise DataError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot} and {level}")
    quadrant_index = np.array([QUADRANTS.index(q) for q in table.quadrants], np.int64)
    groups = [(list(runs), 1.0), *([(list(baseline), -1.0)] if baseline else [])]
    used = np.unique(np.concatenate([r.clips for g, _ in groups for r in g]))
    songs, song_of = np.unique(np.array(table.songs)[used], return_inverse=True)
    song_index = np.full(len(table.names), -1, np.int64)
    song_index[used] = song_of

    def statistic(weights: npt.NDArray[np.int64] | None) -> npt.NDArray[np.float64]:
        total = np.zeros(len(keys))
        for group, sign in groups:
            values = []
            for run in group:
                select = (
                    None if weights is None else np.repeat(np.arange(len(run.clips)), weights[song_index[run.clips]])
                )
                if select is not None and select.size == 0:
                    continue  # no drawn song in this run's clips
                values.append(_run_metrics(run, table, quadrant_index, keys, select))
            total += sign * np.mean(values, axis=0)
        return total

    point = statistic(None)
    rng = np.random.default_rng(seed)
    draws = np.array(
        [statistic(np.bincount(rng.integers(0, len(songs), len(songs)), minlength=len(songs))) for _ in range(n_boot)]
    )
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(draws, [tail, 100 - tail], axis=0)
    return {k: Estimate(float(point[j]), float(low[j]), float(high[j])) for j, k in enumerate(keys)}


def paired(
    scores: Scores, baseline: Scores, table: ClipTable, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Estimate]:
    """Differences `scores` - `baseline` per metric with a paired song-bootstrap CI (both on `table`'s rows).

    Raises:
        DataError: the two score sets are empty.
    """
    return bootstrap_estimates(scores.runs, table, n_boot=n_boot, seed=seed, baseline=baseline.runs)


# ---------------------------------------------------------------- JSON


def scores_json(scores: Scores, table: ClipTable) -> dict[str, Any]:
    """Every number of a `Scores`, JSON-ready: estimates, the mean over folds per seed, and per run its
    metrics and clip predictions by name."""
    quadrant_index = np.array([QUADRANTS.index(q) for q in table.quadrants], np.int64)
    runs: list[dict[str, Any]] = []
    for run in scores.runs:
        metrics = _run_metrics(run, table, quadrant_index, CV_METRICS)
        runs.append(
            {
                "seed": run.seed,
                "fold": run.fold,
                "n_train": run.n_train,
                "n_medleys": run.n_medleys,
                "n_early_stop": run.n_early_stop,
                "n_predicted": len(run.clips),
                "seconds": round(run.seconds, 2),
                "metrics": dict(zip(CV_METRICS, metrics.tolist(), strict=True)),
                "predictions": {
                    table.names[i]: [round(float(v), 6) for v in p]
                    for i, p in zip(run.clips, run.predictions, strict=True)
                },
            }
        )
    estimates = {
        k: {"mean": e.mean, "low": e.low, "high": e.high, "half_width": e.half_width}
        for k, e in scores.estimates.items()
    }
    per_seed = {
        str(seed): {k: float(np.mean([r["metrics"][k] for r in runs if r["seed"] == seed])) for k in CV_METRICS}
        for seed in sorted({r.seed for r in scores.runs})
    }  # the spread that training alone adds
    return to_json_safe({"name": scores.name, "estimates": estimates, "per_seed": per_seed, "runs": runs})


def scores_from_json(data: dict[str, Any], table: ClipTable) -> Scores:
    """A `Scores` back from `scores_json` output, its runs re-indexed onto `table` (for `paired`).

    Raises:
        DataError: the JSON names clips that `table` does not hold.
    """
    index = {n: i for i, n in enumerate(table.names)}
    runs = []
    for run in data["runs"]:
        names = list(run["predictions"])
        unknown = [n for n in names if n not in index]
        if unknown:
            raise DataError(
                f"the saved scores name {len(unknown)} clips (e.g. {unknown[0]!r}) this data does not hold; "
                "compare runs on the same EMOPIA clips"
            )
        runs.append(
            ScoredRun(
                int(run["seed"]),
                int(run["fold"]),
                np.array([index[n] for n in names], np.int64),
                np.array([run["predictions"][n] for n in names], np.float64).reshape(-1, 2),
            )
        )
    estimates = {k: Estimate(v["mean"], v["low"], v["high"]) for k, v in data["estimates"].items()}
    return Scores(str(data["name"]), estimates, tuple(runs))


# ---------------------------------------------------------------- the MLP backends


def mlp_fit_predict(
    data_dir: Path | str,
    *,
    backend: str | None = None,
    features: Sequence[str] = (),
    exclude_features: Sequence[str] = DEFAULT_EXCLUDE_FEATURES,
    context: Sequence[str] = DEFAULT_CONTEXT,
    config: TrainConfig = TrainConfig(),
    labels_path: Path | str | None = None,
) -> FitPredict:
    """A `FitPredict` training `midiva.train.fit`'s MLP on a preprocessed directory's stored clips.

    All clips are read and turned into model inputs once. Training and early-stopping clips are
    sorted by name, as `midiva train` reads a split, so the official run of seed s is `midiva train
    --seed s` on the same data.

    Args:
        backend: 'features', 'musetok' or 'hybrid' (None: the one the data was preprocessed with).
        features, exclude_features, context: the input recipe (defaults: the bundled model's).
        config: hyperparameters (defaults: the bundled recipe's); the seed is each task's.

    Raises:
        DataError: missing labels or representations, or globs that select nothing.
    """
    data = Path(data_dir)
    labels = Path(labels_path) if labels_path is not None else data / "labels_bar.json"
    by_label, mapping = read_labels(labels)
    info = json.loads((data / "preprocess.json").read_text()) if (data / "preprocess.json").is_file() else {}
    present = [s for s in SPLITS if any(lab.split == s for lab in by_label.values())]
    raw: list[RawClip] = [c for s in present for c in load_split(data, s, labels)]
    recipe = recipe_for(raw[0], backend or info.get("backend", "features"), features, exclude_features, context)
    built = build_clip_set(raw, recipe)
    at = {n: i for i, n in enumerate(built.names)}

    def subset(names: Sequence[str]) -> ClipSet:
        missing = [n for n in names if n not in at]
        if missing:
            raise DataError(
                f"{len(missing)} clips (e.g. {missing[0]!r}) are not in {data}; the task and the data disagree"
            )
        rows = [at[n] for n in names]
        return ClipSet(
            tuple(names),
            tuple(built.quadrants[i] for i in rows),
            tuple(built.inputs[i] for i in rows),
            tuple(built.targets[i] for i in rows),
        )

    def fit_predict(task: FoldTask) -> list[npt.NDArray[np.float32]]:
        result = fit(
            subset(sorted(task.train)),
            subset(sorted(task.early_stop)),
            recipe,
            replace(config, seed=task.seed),
            label_mapping=mapping,
        )
        return predict_clips(result.regressor, subset(task.predict))

    return fit_predict

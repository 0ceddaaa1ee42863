"""The cross-validation protocol: song-grouped folds, what trains with what, bootstrap CIs, the benchmark."""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from midiva.crossval import (
    OFFICIAL_FOLD,
    ClipTable,
    FoldTask,
    bootstrap_estimates,
    cross_validate,
    fold_tasks,
    mlp_fit_predict,
    official_scores,
    paired,
    scores_from_json,
    scores_json,
    write_pool_view,
)
from midiva.emopia import list_emopia, song_folds, source_songs, training_clips
from midiva.errors import DataError
from midiva.labels import DEFAULT_LABEL_MAPPING, prepare_labels

REPO = Path(__file__).resolve().parents[1]
FEATURES = tuple(f"f{i}" for i in range(4))


def _table(
    n_songs: int = 40, clips_per_song: int = 3, augment: int = 2, n_medleys: int = 30, seed: int = 0
) -> ClipTable:
    """Originals of train/val/test songs, rewrites of train ones, and medleys of 2-4 train songs."""
    rng = np.random.default_rng(seed)
    names, songs, quads, splits = [], [], [], []
    for s in range(n_songs):
        split = "test" if s % 10 == 9 else "val" if s % 5 == 4 else "train"
        for c in range(clips_per_song):
            q = f"Q{(s + c) % 4 + 1}"
            for name in [
                f"{q}_song{s}_{c}",
                *(f"{q}_song{s}_{c}~aug{k}" for k in range(augment if split == "train" else 0)),
            ]:
                names.append(name)
                songs.append(f"song{s}")
                quads.append(q)
                splits.append(split)
    train_songs = sorted({s for s, sp in zip(songs, splits, strict=True) if sp == "train"})
    for k in range(n_medleys):
        chosen = rng.choice(len(train_songs), size=int(rng.integers(2, 5)), replace=False)
        names.append(f"medley~{k}")
        songs.append("+".join(train_songs[i] for i in chosen))
        quads.append("Q1")
        splits.append("train")
    targets = np.array([DEFAULT_LABEL_MAPPING[q] for q in quads], np.float64)
    return ClipTable(tuple(names), tuple(songs), tuple(quads), tuple(splits), targets)


# ---------------------------------------------------------------- folds


def test_folds_never_split_a_song_and_hold_every_clip_once(emopia_dir: Path) -> None:
    clips = [c for c in list_emopia(emopia_dir).clips if c.split in ("train", "val")]
    songs, quadrants = [c.song for c in clips], [c.quadrant for c in clips]
    folds = song_folds(songs, 5, seed=0, strata=quadrants)
    assert set(folds) == set(songs), "every song (hence every clip) is in exactly one fold"
    assert set(folds.values()) == set(range(5))
    sizes = Counter(folds[s] for s in songs)
    assert max(sizes.values()) - min(sizes.values()) <= 0.05 * len(clips) / 5, sizes
    for q in ("Q1", "Q2", "Q3", "Q4"):
        per_q = Counter(folds[c.song] for c in clips if c.quadrant == q)
        assert max(per_q.values()) - min(per_q.values()) <= 0.15 * sum(per_q.values()) / 5, (q, per_q)
    assert song_folds(songs, 5, seed=0, strata=quadrants) == folds, "seeded"
    assert song_folds(songs, 5, seed=1, strata=quadrants) != folds, "another seed, another partition"
    with pytest.raises(DataError, match="cannot fill"):
        song_folds(["a", "a", "b"], 3)


def test_cv_tasks_keep_songs_apart_and_rewrites_and_medleys_with_their_sources() -> None:
    table = _table()
    tasks = fold_tasks(table, n_folds=4, seeds=(0, 1), inner_folds=4)
    assert len(tasks) == 8
    test_songs = {s for s, sp in zip(table.songs, table.splits, strict=True) if sp == "test"}
    pool = set(table.originals(("train", "val")))
    song_of = dict(zip(table.names, table.songs, strict=True))
    for seed in (0, 1):
        held = [n for t in tasks if t.seed == seed for n in t.predict]
        assert sorted(held) == sorted(table.names[i] for i in pool), "each pool clip is held out exactly once per seed"
    for task in tasks:
        held, stop = {song_of[n] for n in task.predict}, {song_of[n] for n in task.early_stop}
        trained = {s for n in task.train for s in source_songs(n, song_of[n])}
        fit_songs = {song_of[n] for n in task.train if not n.startswith("medley~")}
        assert not held & trained and not held & stop and not stop & trained, "no song in two roles"
        assert not (held | stop | trained) & test_songs, "test never enters cross-validation"
        assert all("~aug" not in n and not n.startswith("medley~") for n in task.predict + task.early_stop)
        for name, song in zip(table.names, table.songs, strict=True):
            if "~aug" in name:  # a rewrite trains exactly when its source clip does
                assert (name in task.train) == (name.split("~aug")[0] in task.train)
            elif name.startswith("medley~"):
                assert (name in task.train) == (set(song.split("+")) <= fit_songs)
        assert any(n.startswith("medley~") for n in task.train) and any("~aug" in n for n in task.train)
    capped = fold_tasks(table, n_folds=4, seeds=(0,), inner_folds=4, max_medleys=2)
    for task, full in zip(capped, tasks, strict=False):
        medleys = [n for n in full.train if n.startswith("medley~")]
        assert [n for n in task.train if n.startswith("medley~")] == medleys[:2], "the cap keeps the first by index"


def test_training_clips_follow_sources() -> None:
    names = ["Q1_a_0", "Q1_a_0~aug0", "Q2_b_0", "Q2_b_0~aug1", "medley~10", "medley~2", "medley~3"]
    songs = ["a", "a", "b", "b", "a+b", "a", "b+c"]
    assert training_clips(names, songs, {"a"}) == ["Q1_a_0", "Q1_a_0~aug0", "medley~2"]
    assert training_clips(names, songs, {"a", "b"}) == [
        "Q1_a_0",
        "Q1_a_0~aug0",
        "Q2_b_0",
        "Q2_b_0~aug1",
        "medley~2",
        "medley~10",
    ]
    assert training_clips(names, songs, {"a", "b", "c"}, max_medleys=2) == [*names[:4], "medley~2", "medley~3"]


# ---------------------------------------------------------------- scores


def _oracle(table: ClipTable, noise: float, seed: int = 0):
    index = {n: i for i, n in enumerate(table.names)}
    seen: list[FoldTask] = []

    def fit_predict(task: FoldTask) -> list[np.ndarray]:
        seen.append(task)
        rng = np.random.default_rng([seed, task.seed, task.fold + 1])
        return [np.tile(table.targets[index[n]], (3, 1)) + rng.normal(0, noise, (3, 2)) for n in task.predict]

    return fit_predict, seen


def test_bootstrap_ci_contains_the_mean_and_is_seeded() -> None:
    table = _table(n_songs=60)
    fit_predict, seen = _oracle(table, noise=0.5)
    scores = cross_validate(table, fit_predict, n_folds=3, seeds=(0, 1), inner_folds=3, n_boot=60, boot_seed=7)
    assert len(seen) == 6 and len(scores.runs) == 6
    for key, est in scores.estimates.items():
        assert est.low <= est.mean <= est.high, key
        assert est.half_width > 0, key
    runs = scores.runs
    acc = np.mean([np.mean((r.predictions[:, 0] >= 0) == (table.targets[r.clips, 0] >= 0)) for r in runs])
    assert scores.estimates["clip.valence_sign_accuracy"].mean == pytest.approx(acc), "the mean over folds x seeds"
    again = bootstrap_estimates(runs, table, n_boot=60, seed=7)
    assert again == scores.estimates, "same seed, same CI"
    other = bootstrap_estimates(runs, table, n_boot=20, seed=8)
    assert other["clip.mae_valence"].mean == again["clip.mae_valence"].mean
    assert other["clip.mae_valence"].low != again["clip.mae_valence"].low, "another seed, other draws"
    same = paired(scores, scores, table, n_boot=10)
    assert all(e.mean == e.low == e.high == 0 for e in same.values()), "a run set paired with itself differs by 0"
    worse, _ = _oracle(table, noise=0.8, seed=1)
    diff = paired(
        scores, cross_validate(table, worse, n_folds=3, seeds=(0, 1), inner_folds=3, n_boot=1), table, n_boot=60
    )
    assert diff["clip.mae_valence"].high < 0 < diff["clip.valence_sign_accuracy"].low, (
        "less noise is resolved as better"
    )
    back = scores_from_json(json.loads(json.dumps(scores_json(scores, table))), table)
    assert [r.clips.tolist() for r in back.runs] == [r.clips.tolist() for r in runs]
    assert np.allclose(
        np.concatenate([r.predictions for r in back.runs]), np.concatenate([r.predictions for r in runs]), atol=1e-6
    )


def test_official_scores_split_val_and_test_and_refuse_bad_predictions() -> None:
    table = _table()
    fit_predict, seen = _oracle(table, noise=0.1)
    result = official_scores(table, fit_predict, seeds=(0, 1), n_boot=20)
    assert set(result) == {"val", "test"} and [t.fold for t in seen] == [OFFICIAL_FOLD] * 2
    for split in ("val", "test"):
        assert {table.splits[i] for r in result[split].runs for i in r.clips} == {split}
    assert set(seen[0].early_stop) == {table.names[i] for i in table.originals(("val",))}
    assert len([n for n in seen[0].train if n.startswith("medley~")]) == 30, "official medleys are all train-song ones"
    with pytest.raises(DataError, match="returned 0 clips"):
        official_scores(table, lambda task: [], seeds=(0,), n_boot=5)
    with pytest.raises(DataError, match="expected"):
        official_scores(table, lambda task: [np.zeros((2, 3))] * len(task.predict), seeds=(0,), n_boot=5)


# ---------------------------------------------------------------- the MLP on stored clips, and the benchmark


def _write_data(root: Path, n_songs: int = 24) -> Path:
    """A preprocessed, labelled directory of synthetic clips whose first features carry the labels."""
    from midiva.emopia import CLIPS_DIR
    from midiva.latents import save_bar_tensors

    table = _table(n_songs=n_songs, augment=1, n_medleys=6)
    rng = np.random.default_rng(0)
    rows = []
    for name, song, quad, split in zip(table.names, table.songs, table.quadrants, table.splits, strict=True):
        v, a = DEFAULT_LABEL_MAPPING[quad]
        feats = rng.normal(size=(4, len(FEATURES))).astype(np.float32)
        feats[:, 0] += 2 * v
        feats[:, 1] += 2 * a
        save_bar_tensors(
            root / CLIPS_DIR / f"{name}.safetensors",
            {"features": feats},
            {"feature_names": json.dumps(FEATURES), "bars": "4"},
        )
        rows.append({"fname": name, "quadrant": quad, "song": song, "split": split, "n_bars": 4})
    with open(root / "clips.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["fname", "quadrant", "song", "split", "n_bars"])
        writer.writeheader()
        writer.writerows(rows)
    prepare_labels(root)
    return root


def test_official_run_is_midiva_train_and_the_benchmark_writes_one_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from midiva.train import TrainConfig, train_from_dir

    data = _write_data(tmp_path / "data")
    config = TrainConfig(max_epochs=4, patience=2)
    table = ClipTable.from_dir(data)
    official = official_scores(table, mlp_fit_predict(data, config=config), seeds=(1,), splits=("val",), n_boot=5)
    trained = train_from_dir(
        data,
        tmp_path / "m.safetensors",
        config=TrainConfig(max_epochs=4, patience=2, seed=1),
        exclude_features=(),
        context=("window8",),
    )
    assert official["val"].runs[0].predictions.shape == (len(table.originals(("val",))), 2)
    ours = bootstrap_estimates(official["val"].runs, table, n_boot=5)
    assert ours["clip.mae_valence"].mean == pytest.approx(trained.metrics["val"]["clip.mae_valence"], abs=1e-6)
    assert ours["clip.quadrant_accuracy"].mean == pytest.approx(trained.metrics["val"]["clip.quadrant_accuracy"])

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import cv_protocol
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = tmp_path / "cv.json"
    argv = [
        "--data",
        str(data),
        "--folds",
        "2",
        "--seeds",
        "1",
        "--inner-folds",
        "3",
        "--max-epochs",
        "2",
        "--patience",
        "1",
        "--n-boot",
        "5",
        "-q",
        "--json",
        str(out),
    ]
    assert cv_protocol.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| quadrant_accuracy |" in printed and "reported, not for choices" in printed
    saved = json.loads(out.read_text())
    assert set(saved["scores"]) == {"cv", "val", "test"}
    assert len(saved["scores"]["cv"]["runs"]) == 2
    assert cv_protocol.main([*argv[:-2], "--no-test", "--compare", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test" not in printed.split("\n\n", 1)[1].splitlines()[0] and "cv diff vs --compare" in printed


def test_pool_view_merges_train_and_val(tmp_path: Path, emopia_dir: Path) -> None:
    view = write_pool_view(emopia_dir, tmp_path / "view")
    listing = list_emopia(view)
    official = list_emopia(emopia_dir)
    assert Counter(c.split for c in listing.clips) == {
        "train": sum(c.split != "test" for c in official.clips),
        "test": sum(c.split == "test" for c in official.clips),
    }
    assert write_pool_view(emopia_dir, tmp_path / "view") == view, "rewriting the view is harmless"

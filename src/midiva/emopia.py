"""Stage 6a: EMOPIA as training data — listing, song-disjoint splits, preprocessing, clip sets.

Input: an EMOPIA directory as distributed (`midis/Q<1-4>_<song>_<n>.mid`, optional
`split/{train,val,test}.csv` with columns fname,label, optional `label.csv`).
Preprocessing (`midiva.preprocess`) stores per-clip bar representations (`<data>/clips/<clip>.safetensors`:
`features` and/or `latents`, (n_bars, dim) float32, with clips.csv and preprocess.json beside them);
they are read back here as `RawClip`s (stored arrays plus (n_bars, 2) targets from a label file of
`midiva.labels`) and, once an `InputRecipe` is applied, as a `ClipSet` of model inputs.
Units: valence and arousal in [-1, 1]; a bar is a MuseTok bar; all clips of a song share a split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva.errors import DataError
from midiva.labels import QUADRANTS, read_csv_rows, read_labels
from midiva.model import InputRecipe

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CLIP_NAME = re.compile(r"^(?P<quadrant>Q[1-4])_(?P<song>.+)_(?P<index>\d+)$")
CLIPS_DIR = "clips"
AUGMENT_MARK = "~aug"  # augmented copies are stored as '<clip>~aug<k>'
MEDLEY_PREFIX = "medley~"  # training medleys are stored as 'medley~<k>'
DERIVED_SPLIT = (0.8, 0.1, 0.1)  # train/val/test song fractions when no split files exist


# ---------------------------------------------------------------- listing


@dataclass(frozen=True)
class EmopiaClip:
    """One EMOPIA clip: file, quadrant label, song id and split."""

    name: str
    path: Path
    quadrant: str
    song: str
    split: str


@dataclass(frozen=True)
class Failure:
    """One clip that was skipped, and why."""

    fname: str
    md5: str
    stage: str
    error_type: str
    message: str


@dataclass(frozen=True)
class EmopiaListing:
    """Clips with labels and splits, plus what could not be listed.

    Attributes:
        clips: labelled clips in a split, sorted by name.
        failures: files without a usable label, or split rows without a file.
        split_source: 'official' (split/*.csv) or 'song-hash' (derived, song-disjoint).
        n_unsplit: files that no split file names (skipped).
    """

    clips: tuple[EmopiaClip, ...]
    failures: tuple[Failure, ...]
    split_source: str
    n_unsplit: int


def _normalise_quadrant(value: str) -> str | None:
    text = value.strip().upper()
    text = text if text.startswith("Q") else f"Q{text}"
    return text if text in QUADRANTS else None


def song_split(song: str, fractions: Sequence[float] = DERIVED_SPLIT) -> str:
    """Deterministic split of a song id (sha1 bucket), so all clips of a song share a split."""
    bucket = int(hashlib.sha1(song.encode("utf-8")).hexdigest()[:8], 16) / 0x1_0000_0000
    edges = np.cumsum(fractions) / sum(fractions)
    return SPLITS[int(np.searchsorted(edges, bucket, side="right"))]


def list_emopia(emopia_dir: Path | str, splits: Sequence[str] = SPLITS) -> EmopiaListing:
    """List EMOPIA clips with quadrant, song and split.

    Labels come from the split files' `label` column, else `label.csv` (ID/fname, 4Q/label), else the
    file name's `Q<n>_` prefix. Without split files, songs are split 80/10/10 by a hash of the song id.

    Raises:
        DataError: the directory has no `midis/` folder or no MIDI files.
    """
    root = Path(emopia_dir)
    midis = root / "midis"
    if not midis.is_dir():
        raise DataError(f"{str(root)!r} has no midis/ folder; point --emopia-dir at the unpacked EMOPIA directory")
    files = {
        p.stem: p for p in sorted(midis.iterdir()) if p.suffix.lower() in (".mid", ".midi") and p.is_file()
    }  # no FIFOs
    if not files:
        raise DataError(f"{str(midis)!r} holds no .mid files")
    labels = _label_csv(root / "label.csv")
    failures: list[Failure] = []
    split_files = [root / "split" / f"{s}.csv" for s in SPLITS]
    official = any(p.is_file() for p in split_files)
    split_of = _official_splits(split_files, files, splits, labels, failures) if official else {}
    clips: list[EmopiaClip] = []
    n_unsplit = 0
    for stem, path in files.items():
        match = CLIP_NAME.match(stem)
        song = match["song"] if match else stem
        split = split_of.get(stem, "") if official else song_split(song)
        if not split:
            n_unsplit += 1
        elif split in splits:
            clip = _labelled_clip(stem, path, song, split, labels.get(stem), match)
            if isinstance(clip, Failure):
                failures.append(clip)
            else:
                clips.append(clip)
    if n_unsplit:
        log.info("%d files of %s are in no split file; skipped", n_unsplit, midis)
    return EmopiaListing(tuple(clips), tuple(failures), "official" if official else "song-hash", n_unsplit)


def _label_csv(path: Path) -> dict[str, str]:
    """clip stem -> quadrant from EMOPIA's label.csv (ID/fname, 4Q/label columns), when there is one."""
    labels: dict[str, str] = {}
    if path.is_file():
        for row in read_csv_rows(path):
            key = row.get("ID") or row.get("fname") or ""
            quadrant = _normalise_quadrant(row.get("4Q") or row.get("label") or "")
            if key and quadrant:
                labels[Path(key).stem] = quadrant
    return labels


def _official_splits(
    split_files: Sequence[Path],
    files: Mapping[str, Path],
    splits: Sequence[str],
    labels: dict[str, str],
    failures: list[Failure],
) -> dict[str, str]:
    """clip stem -> split from split/{train,val,test}.csv; their labels win over label.csv (updates `labels`),
    and a row naming a missing file is a failure."""
    split_of: dict[str, str] = {}
    for split, path in zip(SPLITS, split_files, strict=True):
        if not path.is_file():
            log.warning("no %s; split %r will be empty", path, split)
            continue
        rows = read_csv_rows(path)
        if rows and "fname" not in rows[0]:
            raise DataError(
                f"{str(path)!r} has no 'fname' column (columns: {', '.join(rows[0])}); EMOPIA's split files "
                "have the header fname,label: fix the file or remove split/ for a song-hash split"
            )
        if not rows:
            log.warning("%s has no rows; split %r will be empty", path, split)
        for row in rows:
            stem = Path(row.get("fname", "")).stem
            if not stem:
                continue
            split_of[stem] = split
            quadrant = _normalise_quadrant(row.get("label", ""))
            if quadrant:
                labels[stem] = quadrant  # the split file wins over label.csv
            if stem not in files and split in splits:
                failures.append(
                    Failure(
                        stem, "", "list", "DataError", f"{path.name} names {stem!r} but midis/{stem}.mid is missing"
                    )
                )
    return split_of


def _labelled_clip(
    stem: str, path: Path, song: str, split: str, label: str | None, match: re.Match[str] | None
) -> EmopiaClip | Failure:
    """The clip with its quadrant (the label files', else its name's), or why it has none."""
    quadrant = label or (match["quadrant"] if match else None)
    if quadrant is None:
        return Failure(
            stem,
            "",
            "list",
            "DataError",
            f"no label for {path.name!r}: its name is not Q<1-4>_<song>_<n>.mid and no split file or "
            "label.csv gives its quadrant; add it to label.csv or rename it",
        )
    if match and match["quadrant"] != quadrant:
        log.warning(
            "%s: file name says %s but the label file says %s; using %s", stem, match["quadrant"], quadrant, quadrant
        )
    return EmopiaClip(stem, path, quadrant, song, split)


# ---------------------------------------------------------------- preprocessing


def run_lengths(labels: Sequence[str]) -> str:
    """'Q1:12 Q3:20' for 12 bars of Q1 then 20 of Q3 (how clips.csv stores a medley's bar labels)."""
    runs: list[list[Any]] = []
    for label in labels:
        if runs and runs[-1][0] == label:
            runs[-1][1] += 1
        else:
            runs.append([label, 1])
    return " ".join(f"{q}:{n}" for q, n in runs)


def parse_run_lengths(text: str) -> list[str]:
    """Inverse of `run_lengths`.

    Raises:
        DataError: malformed text.
    """
    out: list[str] = []
    for run in text.split():
        label, _, count = run.partition(":")
        if not count.isdigit():
            raise DataError(f"bad bar-label run {run!r}; expected QUADRANT:COUNT")
        out.extend([label] * int(count))
    return out


# ---------------------------------------------------------------- data sets


@dataclass(frozen=True)
class RawClip:
    """A clip's stored representations and labels, before an input recipe is applied.

    `blocks` holds the stored blocks of representations other than features and MuseTok latents, by name.
    """

    name: str
    quadrant: str
    features: npt.NDArray[np.float32] | None
    latents: npt.NDArray[np.float32] | None
    feature_names: tuple[str, ...]
    targets: npt.NDArray[np.float32]
    blocks: Mapping[str, npt.NDArray[np.float32]] = field(default_factory=dict)


@dataclass(frozen=True)
class ClipSet:
    """Model inputs and targets of a set of clips (each (n_bars, dim) / (n_bars, 2))."""

    names: tuple[str, ...]
    quadrants: tuple[str, ...]
    inputs: tuple[npt.NDArray[np.float32], ...]
    targets: tuple[npt.NDArray[np.float32], ...]

    @property
    def n_clips(self) -> int:
        """Number of clips."""
        return len(self.names)

    @property
    def n_bars(self) -> int:
        """Number of real bars over all clips."""
        return int(sum(x.shape[0] for x in self.inputs))

    def padded(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """(n_clips, max_bars, dim) inputs, (n_clips, max_bars, 2) targets, (n_clips, max_bars) mask."""
        return pad_clips(self.inputs, self.targets)


def pad_clips(
    inputs: Sequence[npt.NDArray[np.float32]], targets: Sequence[npt.NDArray[np.float32]], fill: float = 0.0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Stack variable-length clips into padded arrays plus a mask (True = real bar)."""
    n, t = len(inputs), max((x.shape[0] for x in inputs), default=0)
    dim = inputs[0].shape[1] if inputs else 0
    x = np.full((n, t, dim), fill, np.float32)
    y = np.full((n, t, 2), fill, np.float32)
    mask = np.zeros((n, t), bool)
    for i, (xi, yi) in enumerate(zip(inputs, targets, strict=True)):
        x[i, : xi.shape[0]], y[i, : yi.shape[0]], mask[i, : xi.shape[0]] = xi, yi, True
    return x, y, mask


def load_split(data_dir: Path | str, split: str, labels_path: Path | str | None = None) -> list[RawClip]:
    """Read the representations and labels of one split.

    Raises:
        DataError: the split is empty, a representation is missing, or bar counts disagree.
    """
    from midiva.latents import load_bar_tensors

    data = Path(data_dir)
    labels, _ = read_labels(labels_path or data / "labels_bar.json")
    chosen = sorted(c for c, lab in labels.items() if lab.split == split)
    if not chosen:
        raise DataError(
            f"split {split!r} has no clips in the labels of {str(data)!r}; "
            f"check split/{split}.csv or the preprocessing failures (failures.csv)"
        )
    clips = []
    for name in chosen:
        path = data / CLIPS_DIR / f"{name}.safetensors"
        if not path.is_file():
            raise DataError(
                f"labels name clip {name!r} but {str(path)!r} is missing; re-run `midiva preprocess-emopia`"
            )
        tensors, meta = load_bar_tensors(path)
        lab = labels[name]
        for key, arr in tensors.items():
            if arr.shape[0] != lab.targets.shape[0]:
                raise DataError(
                    f"{path.name}: {key} has {arr.shape[0]} bars but the labels have "
                    f"{lab.targets.shape[0]}; re-run `midiva prepare-labels`"
                )
        others = {k: v for k, v in tensors.items() if k not in ("features", "latents")}
        clips.append(
            RawClip(
                name,
                lab.quadrant,
                tensors.get("features"),
                tensors.get("latents"),
                tuple(json.loads(meta.get("feature_names", "[]"))),
                lab.targets,
                others,
            )
        )
    return clips


def build_clip_set(clips: Sequence[RawClip], recipe: InputRecipe) -> ClipSet:
    """Apply an input recipe to raw clips (the same `InputRecipe.build` annotation uses).

    Raises:
        DataError: no clips, or a representation lacks what the recipe needs.
    """
    if not clips:
        raise DataError("no clips to build inputs from; refusing to train or evaluate on zero examples")
    inputs = []
    for c in clips:
        try:
            inputs.append(recipe.build(c.features, c.latents, c.feature_names, c.blocks))
        except DataError as err:
            raise DataError(f"clip {c.name!r}: {err}") from err
    return ClipSet(
        tuple(c.name for c in clips), tuple(c.quadrant for c in clips), tuple(inputs), tuple(c.targets for c in clips)
    )


def select_features(
    available: Sequence[str], patterns: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> tuple[str, ...]:
    """Feature names matching any glob in `patterns` (None or empty: all) and none in `exclude`, in order.

    Raises:
        DataError: an include pattern matches nothing (a typo), or nothing is left.
    """
    for pattern in patterns or ():
        if not any(fnmatch(name, pattern) for name in available):
            raise DataError(
                f"feature pattern {pattern!r} matches none of {len(available)} features, e.g. {list(available)[:5]}"
            )
    chosen = tuple(
        n
        for n in available
        if (not patterns or any(fnmatch(n, p) for p in patterns)) and not any(fnmatch(n, p) for p in exclude or ())
    )
    if not chosen:
        raise DataError(f"no features left after selecting {list(patterns or [])} and excluding {list(exclude or [])}")
    return chosen


# ---------------------------------------------------------------- song-grouped folds


def song_folds(
    songs: Sequence[str], n_folds: int = 5, *, seed: int | Sequence[int] = 0, strata: Sequence[str] | None = None
) -> dict[str, int]:
    """Assign every song to one of `n_folds` folds, so that no fold splits a song.

    Songs are visited in a seeded random order, largest first, and each goes to the fold where it
    adds least to the sum of squared (fold, stratum) clip counts: folds come out balanced in size
    and, with `strata` (e.g. each clip's quadrant), in their mix of strata.

    Args:
        songs: the song of every clip (a song repeats once per clip).
        strata: one label per clip, or None for size balance only.

    Raises:
        DataError: fewer songs than folds, fewer than two folds, or `strata` of another length.
    """
    if n_folds < 2:
        raise DataError(f"cross-validation needs at least 2 folds, got {n_folds}")
    labels = list(strata) if strata is not None else [""] * len(songs)
    if len(labels) != len(songs):
        raise DataError(f"{len(songs)} songs but {len(labels)} strata; give one stratum per clip")
    kinds = sorted(set(labels))
    counts: dict[str, npt.NDArray[np.int64]] = {}
    for song, label in zip(songs, labels, strict=True):
        counts.setdefault(song, np.zeros(len(kinds), np.int64))[kinds.index(label)] += 1
    if len(counts) < n_folds:
        raise DataError(f"{len(counts)} songs cannot fill {n_folds} song-disjoint folds; use fewer folds")
    rng = np.random.default_rng(seed)
    shuffled = [sorted(counts)[i] for i in rng.permutation(len(counts))]
    order = sorted(shuffled, key=lambda s: -int(counts[s].sum()))  # stable: ties keep the seeded order
    totals = np.zeros((n_folds, len(kinds)), np.int64)
    fold_of: dict[str, int] = {}
    for song in order:
        # Adding v to fold f raises the sum of squares by 2 T_f.v + |v|^2: pick the smallest T_f.v,
        # then the smallest fold, then the lowest index.
        cost = totals @ counts[song]
        best = min(range(n_folds), key=lambda f: (int(cost[f]), int(totals[f].sum()), f))
        fold_of[song] = best
        totals[best] += counts[song]
    return fold_of


def source_songs(name: str, song: str) -> tuple[str, ...]:
    """The songs a stored clip is made of: a medley's ('medley~<k>', song 'a+b+c') are its segments'; a
    clip's and its authoring rewrites' ('<clip>~aug<k>') are its own song."""
    return tuple(song.split("+")) if name.startswith(MEDLEY_PREFIX) else (song,)


def training_clips(
    names: Sequence[str], songs: Sequence[str], train_songs: Collection[str], *, max_medleys: int | None = None
) -> list[str]:
    """The stored clips a model may train on when only `train_songs` are training data.

    A clip or rewrite is kept when its song is a training song; a medley when every one of its
    segments' songs is (a medley of a held-out song would leak it). Medleys are kept in the order of
    their index k, at most `max_medleys` of them (None: all).

    Args:
        names: stored clip names (clips.csv's fname), `songs` their song column.
    """
    keep = set(train_songs)
    plain, medleys = [], []
    for name, song in zip(names, songs, strict=True):
        if not all(s in keep for s in source_songs(name, song)):
            continue
        if name.startswith(MEDLEY_PREFIX):
            medleys.append(name)
        else:
            plain.append(name)
    medleys.sort(key=lambda n: int(n[len(MEDLEY_PREFIX) :]) if n[len(MEDLEY_PREFIX) :].isdigit() else -1)
    return plain + medleys[: max_medleys if max_medleys is not None else len(medleys)]


def recipe_for(
    clip: RawClip,
    backend: str,
    features: Sequence[str] = (),
    exclude_features: Sequence[str] = (),
    context: Sequence[str] = (),
) -> InputRecipe:
    """The input recipe of `backend` over what a stored clip holds (feature globs resolved against its
    columns, each other block's width read from it).

    Raises:
        DataError: the clip lacks a representation the backend needs, or the globs select nothing.
    """
    from midiva import representations

    parts = [rep.name for rep in representations.recipe(backend)]
    stored = {"features": clip.features, "musetok": clip.latents, **clip.blocks}
    for part in parts:
        if stored.get(part) is None:
            raise DataError(
                f"clip {clip.name!r} holds no {part} blocks for backend {backend!r}; "
                f"preprocess with --backend {backend}"
            )
    names = select_features(clip.feature_names, features, exclude_features) if "features" in parts else ()
    latent_dim = clip.latents.shape[1] if "musetok" in parts and clip.latents is not None else 0
    dims = tuple((part, int(stored[part].shape[1])) for part in parts if part not in ("features", "musetok"))  # type: ignore[union-attr]
    return InputRecipe(backend, names, latent_dim, tuple(context), dims)

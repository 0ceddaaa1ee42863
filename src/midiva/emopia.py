"""Stage 6a: EMOPIA as training data — listing, song-disjoint splits, preprocessing, clip sets.

Input: an EMOPIA directory as distributed (`midis/Q<1-4>_<song>_<n>.mid`, optional
`split/{train,val,test}.csv` with columns fname,label, optional `label.csv`).
Output: per-clip bar representations (`<data>/clips/<clip>.safetensors`: `features` and/or
`latents`, (n_bars, dim) float32, with clips.csv, failures.csv and preprocess.json beside them);
read back as `RawClip`s (stored arrays plus (n_bars, 2) targets from a label file of
`midiva.model`) and, once an `InputRecipe` is applied, as a `ClipSet` of model inputs.
Units: valence and arousal in [-1, 1]; a bar is a MuseTok bar; all clips of a song share a split.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva.errors import DataError, MidivaError, OutputError
from midiva.model import (
    QUADRANTS,
    InputRecipe,
    read_csv_rows,
    read_labels,
    write_csv_atomic,
    write_text_atomic,
)
from midiva.workers import map_in_order

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CLIP_NAME = re.compile(r"^(?P<quadrant>Q[1-4])_(?P<song>.+)_(?P<index>\d+)$")
CLIPS_DIR = "clips"
DERIVED_SPLIT = (0.8, 0.1, 0.1)  # train/val/test song fractions when no split files exist
FAILURE_FIELDS = ("fname", "md5", "stage", "error_type", "message")


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
    files = {p.stem: p for p in sorted(midis.iterdir()) if p.suffix.lower() in (".mid", ".midi") and p.is_file()}  # no FIFOs
    if not files:
        raise DataError(f"{str(midis)!r} holds no .mid files")
    labels: dict[str, str] = {}
    if (root / "label.csv").is_file():
        for row in read_csv_rows(root / "label.csv"):
            key = row.get("ID") or row.get("fname") or ""
            quadrant = _normalise_quadrant(row.get("4Q") or row.get("label") or "")
            if key and quadrant:
                labels[Path(key).stem] = quadrant
    failures: list[Failure] = []
    split_of: dict[str, str] = {}
    split_files = [root / "split" / f"{s}.csv" for s in SPLITS]
    official = any(p.is_file() for p in split_files)
    if official:
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
                    failures.append(Failure(stem, "", "list", "DataError", f"{path.name} names {stem!r} but midis/{stem}.mid is missing"))
    clips: list[EmopiaClip] = []
    n_unsplit = 0
    for stem, path in files.items():
        match = CLIP_NAME.match(stem)
        song = match["song"] if match else stem
        split = split_of.get(stem, "") if official else song_split(song)
        if not split:
            n_unsplit += 1
            continue
        if split not in splits:
            continue
        quadrant = labels.get(stem) or (match["quadrant"] if match else None)
        if quadrant is None:
            failures.append(Failure(
                stem, "", "list", "DataError",
                f"no label for {path.name!r}: its name is not Q<1-4>_<song>_<n>.mid and no split file or "
                "label.csv gives its quadrant; add it to label.csv or rename it",
            ))
            continue
        if match and match["quadrant"] != quadrant:
            log.warning("%s: file name says %s but the label file says %s; using %s", stem, match["quadrant"], quadrant, quadrant)
        clips.append(EmopiaClip(stem, path, quadrant, song, split))
    if n_unsplit:
        log.info("%d files of %s are in no split file; skipped", n_unsplit, midis)
    return EmopiaListing(tuple(clips), tuple(failures), "official" if official else "song-hash", n_unsplit)


# ---------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class _Represented:
    """Worker result for one clip (error fields set when it failed)."""

    name: str
    md5: str
    variant: str = ""
    features: npt.NDArray[np.float32] | None = None
    feature_names: tuple[str, ...] = ()
    token_ids: list[list[int]] | None = None
    error_type: str = ""
    message: str = ""


AUGMENT_MARK = "~aug"  # augmented copies are stored as '<clip>~aug<k>'


MEDLEY_PREFIX = "medley~"  # training medleys are stored as 'medley~<k>'


@dataclass(frozen=True)
class _Job:
    """One representation to write: a clip as it is (augment -1), its k-th authoring rewrite, or a
    medley of train clips (`data` and the quadrant of every bar given)."""

    clip: EmopiaClip
    augment: int = -1
    data: bytes | None = None
    bar_quadrants: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        if self.data is not None:
            return self.clip.name
        return self.clip.name if self.augment < 0 else f"{self.clip.name}{AUGMENT_MARK}{self.augment}"

    def md5(self) -> str:
        return hashlib.md5(self.data if self.data is not None else self.clip.path.read_bytes()).hexdigest()


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


def _represent(path: Path, need_features: bool, need_tokens: bool, augment: tuple[int, int] | None = None,
               name: str = "", data: bytes | None = None) -> _Represented:
    """Parse one clip (or, with `augment` = (seed, k), its k-th random authoring rewrite; or the
    given MIDI `data`) into bar features and/or token ids; errors are returned, not raised."""
    md5 = ""
    name = name or path.stem
    try:
        data = path.read_bytes() if data is None else data
        md5 = hashlib.md5(data).hexdigest()
        from midiva.features import midi_to_features

        variant = ""
        if augment is not None:
            from midiva.authoring import random_augmentation, rewrite_bytes, seeded_rng

            variant, rewrite = random_augmentation(seeded_rng("augment", augment[0], path.stem, augment[1]))
            data = rewrite_bytes(data, rewrite, seeded_rng("rewrite", augment[0], path.stem, augment[1]))
        bars, feats = midi_to_features(data, name=name)
        return _Represented(
            name=name,
            variant=variant,
            md5=md5,
            features=feats.values if need_features else None,
            feature_names=tuple(feats.names),
            token_ids=bars.bar_token_ids() if need_tokens else None,
        )
    except MidivaError as err:
        return _Represented(name, md5, error_type=type(err).__name__, message=str(err))
    except OSError as err:
        return _Represented(name, md5, error_type="MidiReadError", message=f"cannot read {str(path)!r}: {err}")
    except Exception as err:  # a batch records unexpected errors and goes on
        log.debug("unexpected error on %s", path, exc_info=True)
        return _Represented(name, md5, error_type=type(err).__name__, message=str(err))


def _represent_job(job: _Job, need_features: bool, need_tokens: bool, seed: int) -> _Represented:
    """`_represent` of one job (the one-argument function the worker pool maps)."""
    return _represent(job.clip.path, need_features, need_tokens, _augment_key(job, seed), job.name, job.data)


def _crashed_job(job: _Job) -> _Represented:
    if job.data is None and job.augment < 0:
        return _crashed(job.clip.path)
    return _Represented(job.name, job.md5(), error_type="WorkerCrash",
                        message=f"{job.name!r} crashed the parsing worker process (e.g. a segfault in the MIDI parser); skipped")


def _crashed(path: Path) -> _Represented:
    return _Represented(path.stem, _md5_or_blank(path), error_type="WorkerCrash",
                        message=f"{path.name!r} crashed the parsing worker process (e.g. a segfault in the MIDI parser); skipped")


def _md5_or_blank(path: Path) -> str:
    try:
        return hashlib.md5(path.read_bytes()).hexdigest()
    except OSError:
        return ""


@dataclass(frozen=True)
class PreprocessSummary:
    """What `preprocess_emopia` did."""

    out_dir: Path
    backend: str
    split_source: str
    n_clips: int
    n_written: int
    n_resumed: int
    n_failed: int
    failures_by_type: dict[str, int]
    seconds: float


def _representation_fingerprint() -> dict[str, str]:
    """Feature names and a hash of the code that makes representations; resume redoes clips when either changed."""
    import midiva.events
    import midiva.features
    import midiva.midi

    digest = hashlib.sha256()
    for module in (midiva.midi, midiva.events, midiva.features):
        digest.update(Path(str(module.__file__)).read_bytes())
    return {"feature_names": json.dumps(list(midiva.features.FEATURE_NAMES)), "code_sha256": digest.hexdigest()}


def _valid_output(path: Path, md5: str, expected: Mapping[str, str]) -> bool:
    """Whether `path` is a complete representation of the clip with this md5 and settings."""
    if not path.is_file():
        return False
    from midiva.latents import load_bar_tensors

    try:
        tensors, meta = load_bar_tensors(path)
    except DataError:
        return False
    if meta.get("md5") != md5 or any(meta.get(k) != v for k, v in expected.items()):
        return False
    n_bars = int(meta.get("bars", "-1"))
    return all(t.ndim == 2 and t.shape[0] == n_bars for t in tensors.values()) and bool(tensors)


def preprocess_emopia(
    emopia_dir: Path | str,
    out_dir: Path | str,
    *,
    backend: str = "features",
    checkpoint: Path | str | None = None,
    device: str = "cpu",
    batch_size: int = 4096,
    num_workers: int = 0,
    resume: bool = True,
    splits: Sequence[str] = SPLITS,
    progress: bool = True,
    strict: bool = False,
    augment: int = 0,
    augment_seed: int = 0,
    medleys: int = 0,
) -> PreprocessSummary:
    """Write one `.safetensors` per clip (`features` and/or `latents`, (n_bars, dim)) plus clips.csv.

    Args:
        emopia_dir: EMOPIA as distributed.
        out_dir: output directory (clips/, clips.csv, failures.csv, preprocess.json).
        backend: 'features', 'musetok' or 'hybrid'; the last two need `checkpoint`.
        checkpoint: MuseTok tokenizer model.pt.
        num_workers: MIDI-parsing processes (0: in this process).
        resume: skip clips whose output exists and matches md5, backend, features and checkpoint.
        splits: which splits to process.
        strict: re-raise the first failure instead of recording it.
        augment: also write this many random authoring rewrites of every train clip
            (`midiva.authoring.random_augmentation`, seeded by `augment_seed`, the clip and k) as
            '<clip>~aug<k>', same song, quadrant and split; val and test are never augmented.
        medleys: also write this many medleys of train clips ('medley~<k>', `midiva.authoring.build_medleys`
            seeded by `augment_seed`) whose bars carry their own segment's label.

    Raises:
        DataError: no clips to process. CheckpointError: the MuseTok checkpoint cannot be loaded.
        OutputError: `out_dir` cannot be written.
    """
    from tqdm import tqdm

    from midiva.config import sha256_file
    from midiva.latents import save_bar_tensors

    started = time.perf_counter()
    out = Path(out_dir)
    listing = list_emopia(emopia_dir, splits)
    if not listing.clips:
        raise DataError(f"no labelled clips of splits {list(splits)} in {str(emopia_dir)!r}")
    need_features, need_latents = backend in ("features", "hybrid"), backend in ("musetok", "hybrid")
    encoder = None
    expected = {"backend": backend, **_representation_fingerprint()}
    if need_latents:
        from midiva.latents import default_checkpoint_path, load_encoder

        ckpt = Path(checkpoint) if checkpoint is not None else default_checkpoint_path()
        encoder = load_encoder(ckpt, device=device)
        expected["checkpoint_sha256"] = sha256_file(ckpt)
    clip_dir = out / CLIPS_DIR
    try:
        clip_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {str(clip_dir)!r}: {err.strerror or err}; choose a writable --out") from err
    failures = list(listing.failures)
    if strict and failures:
        raise DataError(failures[0].message)
    if augment < 0:
        raise DataError(f"augment must be >= 0 copies per train clip, got {augment}")
    if medleys < 0:
        raise DataError(f"medleys must be >= 0, got {medleys}")
    jobs = _jobs(listing, augment, medleys, augment_seed)
    todo: list[_Job] = []
    n_resumed = 0
    for job in jobs:
        md5 = job.md5()
        if resume and _valid_output(clip_dir / f"{job.name}.safetensors", md5, _job_expected(expected, job, augment_seed)):
            n_resumed += 1
        else:
            todo.append(job)
    log.info("%d clips to process, %d already done", len(todo), n_resumed)
    by_name = {j.name: j for j in jobs}
    bar = tqdm(total=len(todo), unit="clip", disable=not progress or not sys.stderr.isatty(), file=sys.stderr)
    n_written = 0

    def handle(batch: list[_Represented]) -> None:
        nonlocal n_written
        ok = [r for r in batch if not r.error_type]
        for r in batch:
            if r.error_type:
                if strict:
                    raise DataError(f"{r.name}: {r.error_type}: {r.message}")
                failures.append(Failure(r.name, r.md5, "represent", r.error_type, r.message))
        latents: list[npt.NDArray[np.float32]] = []
        if encoder is not None and ok:
            from midiva.latents import encode_songs

            latents = [e.latents for e in encode_songs(encoder, [r.token_ids or [] for r in ok], batch_size=batch_size, device=device)]
        for i, r in enumerate(ok):
            job = by_name[r.name]
            clip = job.clip
            tensors: dict[str, npt.NDArray[np.float32]] = {}
            if need_features and r.features is not None:
                tensors["features"] = r.features
            if encoder is not None:
                tensors["latents"] = latents[i]
            n_bars = next(iter(tensors.values())).shape[0]
            meta = {
                **_job_expected(expected, job, augment_seed), "md5": r.md5, "bars": str(n_bars),
                "source": clip.path.name, "clip": job.name, "quadrant": clip.quadrant, "song": clip.song,
                "split": clip.split, **({"variant": r.variant} if job.augment >= 0 else {}),
                **({"bar_quadrants": run_lengths(job.bar_quadrants)} if job.bar_quadrants else {}),
            }
            save_bar_tensors(clip_dir / f"{job.name}.safetensors", tensors, meta)
            n_written += 1
        bar.update(len(batch))

    chunk = 64
    represent = functools.partial(_represent_job, need_features=need_features, need_tokens=need_latents, seed=augment_seed)
    pending: list[_Represented] = []
    for result in map_in_order(represent, iter(todo), num_workers if len(todo) > 1 else 0, _crashed_job, chunk_size=4):
        pending.append(result)
        if len(pending) >= chunk:
            handle(pending)
            pending = []
    handle(pending)
    bar.close()
    # The manifest lists every split's valid outputs, so processing one split never hides the others.
    full = listing if set(splits) >= set(SPLITS) else list_emopia(emopia_dir)
    _write_manifest(out, full, failures, backend, expected, augment, augment_seed, medleys)
    seconds = time.perf_counter() - started
    counts = dict(Counter(f.error_type for f in failures))
    log.info("preprocessed %d clips (%d written, %d resumed, %d failed) in %.1f s",
             len(listing.clips), n_written, n_resumed, len(failures), seconds)
    return PreprocessSummary(out, backend, listing.split_source, len(listing.clips), n_written, n_resumed,
                             len(failures), counts, seconds)


def _jobs(listing: EmopiaListing, augment: int, medleys: int = 0, seed: int = 0) -> list[_Job]:
    """Every clip as it is, then `augment` rewrites of each train clip, then `medleys` medleys of train clips."""
    jobs = [_Job(c) for c in listing.clips]
    train = [c for c in listing.clips if c.split == "train"]
    jobs += [_Job(c, k) for c in train for k in range(augment)]
    if medleys and train:
        from midiva.authoring import LabelledClip, build_medleys

        by_name = {c.name: c for c in train}
        labelled = [LabelledClip(c.name, c.song, c.quadrant, c.path.read_bytes()) for c in train]
        for k, medley in enumerate(build_medleys(labelled, medleys, seed=seed)):
            first = by_name[medley.clips[0]]
            clip = EmopiaClip(f"{MEDLEY_PREFIX}{k}", first.path, medley.bar_quadrants[0],
                              "+".join(by_name[c].song for c in medley.clips), "train")
            jobs.append(_Job(clip, data=medley.data, bar_quadrants=medley.bar_quadrants))
    return jobs


def _augment_key(job: _Job, seed: int) -> tuple[int, int] | None:
    return None if job.augment < 0 else (seed, job.augment)


def _job_expected(expected: Mapping[str, str], job: _Job, seed: int) -> dict[str, str]:
    """What a job's stored output must say about itself to count as done (augmented: which rewrite)."""
    return {**expected, **({"augment": f"{seed}:{job.augment}"} if job.augment >= 0 else {})}  # medleys: their md5


def _write_manifest(out: Path, listing: EmopiaListing, failures: list[Failure], backend: str,
                    expected: Mapping[str, str], augment: int = 0, augment_seed: int = 0, medleys: int = 0) -> None:
    """clips.csv (every clip with a valid, current output), failures.csv and preprocess.json, atomically."""
    from midiva.latents import load_bar_tensors

    failed = {f.fname for f in failures}
    rows = []
    for job in _jobs(listing, augment, medleys, augment_seed):
        clip = job.clip
        path = out / CLIPS_DIR / f"{job.name}.safetensors"
        md5 = job.md5()
        if job.name in failed or not _valid_output(path, md5, _job_expected(expected, job, augment_seed)):
            continue
        _, meta = load_bar_tensors(path)
        rows.append({"fname": job.name, "quadrant": clip.quadrant, "song": clip.song, "split": clip.split,
                     "n_bars": meta["bars"], "md5": meta["md5"], "source": clip.path.name,
                     "variant": meta.get("variant", ""), "bar_quadrants": meta.get("bar_quadrants", "")})
    write_csv_atomic(out / "clips.csv",
                     ["fname", "quadrant", "song", "split", "n_bars", "md5", "source", "variant", "bar_quadrants"], rows)
    write_csv_atomic(out / "failures.csv", list(FAILURE_FIELDS), [asdict(f) for f in failures])
    info = {"backend": backend, "split_source": listing.split_source, "n_clips": len(rows),
            "n_failed": len(failures), "n_unsplit": listing.n_unsplit,
            "feature_names": json.loads(expected["feature_names"]), "code_sha256": expected["code_sha256"],
            "checkpoint_sha256": expected.get("checkpoint_sha256"),
            "augment": {"copies_per_train_clip": augment, "medleys": medleys, "seed": augment_seed}}
    write_text_atomic(out / "preprocess.json", json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------- data sets


@dataclass(frozen=True)
class RawClip:
    """A clip's stored representations and labels, before an input recipe is applied."""

    name: str
    quadrant: str
    features: npt.NDArray[np.float32] | None
    latents: npt.NDArray[np.float32] | None
    feature_names: tuple[str, ...]
    targets: npt.NDArray[np.float32]


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


def pad_clips(inputs: Sequence[npt.NDArray[np.float32]], targets: Sequence[npt.NDArray[np.float32]],
              fill: float = 0.0) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
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
        raise DataError(f"split {split!r} has no clips in the labels of {str(data)!r}; "
                        f"check split/{split}.csv or the preprocessing failures (failures.csv)")
    clips = []
    for name in chosen:
        path = data / CLIPS_DIR / f"{name}.safetensors"
        if not path.is_file():
            raise DataError(f"labels name clip {name!r} but {str(path)!r} is missing; re-run `midiva preprocess-emopia`")
        tensors, meta = load_bar_tensors(path)
        lab = labels[name]
        for key, arr in tensors.items():
            if arr.shape[0] != lab.targets.shape[0]:
                raise DataError(f"{path.name}: {key} has {arr.shape[0]} bars but the labels have "
                                f"{lab.targets.shape[0]}; re-run `midiva prepare-labels`")
        clips.append(RawClip(name, lab.quadrant, tensors.get("features"), tensors.get("latents"),
                             tuple(json.loads(meta.get("feature_names", "[]"))), lab.targets))
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
            inputs.append(recipe.build(c.features, c.latents, c.feature_names))
        except DataError as err:
            raise DataError(f"clip {c.name!r}: {err}") from err
    return ClipSet(tuple(c.name for c in clips), tuple(c.quadrant for c in clips), tuple(inputs),
                   tuple(c.targets for c in clips))


def select_features(available: Sequence[str], patterns: Sequence[str] | None = None,
                    exclude: Sequence[str] | None = None) -> tuple[str, ...]:
    """Feature names matching any glob in `patterns` (None or empty: all) and none in `exclude`, in order.

    Raises:
        DataError: an include pattern matches nothing (a typo), or nothing is left.
    """
    for pattern in patterns or ():
        if not any(fnmatch(name, pattern) for name in available):
            raise DataError(f"feature pattern {pattern!r} matches none of {len(available)} features, e.g. {list(available)[:5]}")
    chosen = tuple(n for n in available if (not patterns or any(fnmatch(n, p) for p in patterns))
                   and not any(fnmatch(n, p) for p in exclude or ()))
    if not chosen:
        raise DataError(f"no features left after selecting {list(patterns or [])} and excluding {list(exclude or [])}")
    return chosen

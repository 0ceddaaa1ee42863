"""Stage 6a: EMOPIA clips -> stored bar representations, through the one batch runner.

Input: an EMOPIA directory (`midiva.emopia.list_emopia`: labelled clips and their split) and a
backend (`midiva.representations`). Output, in the data directory:
  clips/<clip>.safetensors  the clip's blocks ((n_bars, dim) float32, named by each representation's
                            store key: `features`, `latents`) and string metadata (md5, bars, source,
                            clip, quadrant, song, split, backend, feature names, code hash, ...)
  clips.csv                 the manifest training reads: every clip with a valid, current output
  preprocess.json           backend, split source, feature names, code hash, augmentation
  clips.index.csv, clips.meta.csv, failures.csv, clips.index.csv.done
                            the runner's tables and ledger (`midiva.ledger`): annotate's failures
                            schema, annotate's resume (committed clips are skipped; --no-resume starts over)
Jobs are every clip as it is, then `augment` seeded authoring rewrites of each train clip
('<clip>~aug<k>', rewritten in the parsing worker), then `medleys` medleys of train clips
('medley~<k>', whose bars carry their own segment's quadrant). A job's ledger key is the md5 of its
name, its bytes' md5 and its rewrite, so identical clips under two names are both kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva import representations
from midiva.atomic import write_csv_atomic, write_text_atomic
from midiva.emopia import (
    AUGMENT_MARK,
    CLIPS_DIR,
    MEDLEY_PREFIX,
    SPLITS,
    EmopiaClip,
    EmopiaListing,
    list_emopia,
    run_lengths,
)
from midiva.errors import DataError, OutputError
from midiva.ledger import FAILURE_FIELDS, META_FIELDS, OutputPaths, csv_line
from midiva.prepare import FileResult, PrepareOptions, prepare_file
from midiva.runner import RunOptions, run
from midiva.sources import SourceRow

log = logging.getLogger(__name__)

INDEX_FIELDS = ("md5", "name", "n_bars", "variant")
MANIFEST_FIELDS = ("fname", "quadrant", "song", "split", "n_bars", "md5", "source", "variant", "bar_quadrants")


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
    """Feature names and a hash of the code that makes representations: a stored clip is current only when both match."""
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
            clip = EmopiaClip(
                f"{MEDLEY_PREFIX}{k}",
                first.path,
                medley.bar_quadrants[0],
                "+".join(by_name[c].song for c in medley.clips),
                "train",
            )
            jobs.append(_Job(clip, data=medley.data, bar_quadrants=medley.bar_quadrants))
    return jobs


def _augment_tag(seed: int, k: int, backing: bool = False, sequenced: bool = False) -> str:
    """Which rewrite a job gets: 'seed:k', plus ':backing' when band backings are among the draws and
    ':sequenced' when sequenced combinations are."""
    return f"{seed}:{k}" + (":backing" if backing else "") + (":sequenced" if sequenced else "")


def _job_expected(
    expected: Mapping[str, str], job: _Job, seed: int, backing: bool = False, sequenced: bool = False
) -> dict[str, str]:
    """What a job's stored output must say about itself to count as current (augmented: which rewrite)."""
    # medleys: their md5
    tag = {"augment": _augment_tag(seed, job.augment, backing, sequenced)} if job.augment >= 0 else {}
    return {**expected, **tag}


def _job_key(name: str, md5: str, augment: str) -> str:
    return hashlib.md5(f"{name}\0{md5}\0{augment}".encode()).hexdigest()


def _job_rows(
    jobs: Sequence[_Job], listing: EmopiaListing, seed: int, backing: bool = False, sequenced: bool = False
) -> Iterator[SourceRow]:
    """The runner's rows: one per job (bytes, the rewrite to apply, the source md5), then the listing's failures."""
    for job in jobs:
        augment = _augment_tag(seed, job.augment, backing, sequenced) if job.augment >= 0 else ""
        try:
            data = job.data if job.data is not None else job.clip.path.read_bytes()
        except OSError as err:
            key = _job_key(job.name, "", augment)
            yield SourceRow(
                key,
                job.name,
                job.clip.split,
                None,
                {"title": job.name},
                "MidiReadError",
                f"cannot read {str(job.clip.path)!r}: {err.strerror or err}",
            )
            continue
        md5 = hashlib.md5(data).hexdigest()
        meta = {"title": job.name, "source_md5": md5, "augment": augment, "stem": job.clip.path.stem}
        yield SourceRow(_job_key(job.name, md5, augment), job.name, job.clip.split, data, meta)
    for failure in listing.failures:
        yield SourceRow(
            _job_key(failure.fname, failure.md5, "list"),
            failure.fname,
            "",
            None,
            {"title": failure.fname},
            failure.error_type,
            failure.message,
        )


def prepare_clip(row: SourceRow, options: PrepareOptions, strict: bool = False) -> FileResult:
    """`prepare_file` of a job, after its seeded authoring rewrite when it has one (runs in the workers)."""
    augment = str(row.meta.get("augment", ""))
    if not augment or row.music is None:
        return prepare_file(row, options, strict)
    from midiva.authoring import random_augmentation, rewrite_bytes, seeded_rng

    seed_text, k_text, *extra = augment.split(":")
    seed, k = int(seed_text), int(k_text)
    stem = str(row.meta["stem"])
    try:
        variant, rewrite = random_augmentation(
            seeded_rng("augment", seed, stem, k), backing="backing" in extra, sequenced="sequenced" in extra
        )
        data = rewrite_bytes(row.music, rewrite, seeded_rng("rewrite", seed, stem, k))
    except Exception as err:  # a rewrite that cannot be built is that job's failure
        if strict:
            raise
        return FileResult(
            row.md5,
            row.name,
            row.split,
            row.meta,
            stage="augment",
            error_type=type(err).__name__,
            error=str(err) or type(err).__name__,
        )
    result = prepare_file(dataclasses.replace(row, music=data), options, strict)
    result.info["variant"] = variant
    return result


def clip_paths(out_dir: Path | str) -> OutputPaths:
    """The runner's tables, ledger and summary of a clip store."""
    out = Path(out_dir)
    return OutputPaths(
        out / "clips.index.csv",
        out / "clips.meta.csv",
        out / "failures.csv",
        out / "clips.index.csv.done",
        out / "preprocess.summary.json",
    )


class ClipSink:
    """`clips/<clip>.safetensors` per job, indexed in clips.index.csv (`midiva.runner.Sink`)."""

    headers = (csv_line(INDEX_FIELDS), csv_line(META_FIELDS), csv_line(FAILURE_FIELDS))
    label = "preprocess"

    def __init__(
        self,
        out: Path,
        backend: str,
        jobs: Sequence[_Job],
        expected: Mapping[str, str],
        seed: int,
        backing: bool = False,
        sequenced: bool = False,
    ) -> None:
        self.out, self.backend, self.expected, self.seed, self.backing = out, backend, dict(expected), seed, backing
        self.sequenced = sequenced
        self.paths = clip_paths(out)
        self.jobs = {job.name: job for job in jobs}
        self.store_keys = [rep.store_key for rep in representations.recipe(backend)]

    def rows(self, result: FileResult, tensors: Mapping[str, npt.NDArray[Any]], predictions: Any) -> tuple[bytes, int]:
        """Write the clip's blocks and metadata; its index row."""
        job = self.jobs[result.name]
        clip = job.clip
        arrays: dict[str, npt.NDArray[np.float32]] = {key: tensors[key] for key in self.store_keys}
        n_bars = next(iter(arrays.values())).shape[0]
        variant = str(result.info.get("variant", ""))
        meta = {
            **_job_expected(self.expected, job, self.seed, self.backing, self.sequenced),
            "md5": str(result.meta["source_md5"]),
            "bars": str(n_bars),
            "source": clip.path.name,
            "clip": job.name,
            "quadrant": clip.quadrant,
            "song": clip.song,
            "split": clip.split,
            **({"variant": variant} if job.augment >= 0 else {}),
            **({"bar_quadrants": run_lengths(job.bar_quadrants)} if job.bar_quadrants else {}),
        }
        from midiva.latents import save_bar_tensors

        save_bar_tensors(self.out / CLIPS_DIR / f"{job.name}.safetensors", arrays, meta)
        return csv_line([result.md5, job.name, n_bars, variant]), 1

    def finish(self, complete: bool) -> None:
        """Nothing here: `preprocess_emopia` writes the manifest from the stored clips."""


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
    augment_backing: bool = False,
    augment_sequenced: bool = False,
) -> PreprocessSummary:
    """Write one `.safetensors` per clip (each representation's block, (n_bars, dim)) plus clips.csv.

    Args:
        emopia_dir: EMOPIA as distributed.
        out_dir: output directory (see the module docstring).
        backend: 'features', 'musetok', 'hybrid' or any recipe of `midiva.representations`.
        checkpoint: MuseTok tokenizer model.pt, for backends with 'musetok'.
        num_workers: MIDI-parsing processes (0: in this process).
        resume: skip clips committed before (False: start over; the manifest still lists every
            split's valid stored clips).
        splits: which splits to process.
        strict: re-raise the first failure instead of recording it.
        augment: also write this many random authoring rewrites of every train clip
            (`midiva.authoring.random_augmentation`, seeded by `augment_seed`, the clip and k) as
            '<clip>~aug<k>', same song, quadrant and split; val and test are never augmented.
        medleys: also write this many medleys of train clips ('medley~<k>', `midiva.authoring.build_medleys`
            seeded by `augment_seed`) whose bars carry their own segment's label.
        augment_backing: let the rewrites also add a band backing of the clip's own harmony
            (`midiva.authoring.band_backing`, drawn after every other rewrite); off: the rewrites of
            earlier versions, byte for byte.
        augment_sequenced: let SEQUENCED_PROBABILITY of the rewrites be a sequenced file's whole
            authoring at once (quantized, notated lengths, flat velocities, no pedal, spread tracks;
            drawn after every other rewrite); off: the rewrites of earlier versions, byte for byte.

    Raises:
        DataError: no clips to process. CheckpointError: an encoder checkpoint cannot be loaded.
        OutputError: `out_dir` cannot be written. ConfigError: resuming a store made with other settings.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    listing = list_emopia(emopia_dir, splits)
    if not listing.clips:
        raise DataError(f"no labelled clips of splits {list(splits)} in {str(emopia_dir)!r}")
    if strict and listing.failures:
        raise DataError(listing.failures[0].message)
    if augment < 0:
        raise DataError(f"augment must be >= 0 copies per train clip, got {augment}")
    if medleys < 0:
        raise DataError(f"medleys must be >= 0, got {medleys}")
    expected = {"backend": backend, **_representation_fingerprint()}
    if any(rep.batched for rep in representations.recipe(backend)):
        from midiva.latents import resolve_device

        device = str(resolve_device(device))  # 'auto' -> where the encoders run
    encoders = representations.load_encoders(backend, checkpoint=checkpoint, device=device)
    if "musetok" in encoders:
        expected["checkpoint_sha256"] = encoders["musetok"].checkpoint_sha256
    if "barseq" in encoders:  # clips encoded with other barseq weights are stale, and a model records which
        expected["barseq_sha256"] = encoders["barseq"].sha256
    try:
        (out / CLIPS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"cannot create {str(out / CLIPS_DIR)!r}: {err.strerror or err}; choose a writable --out"
        ) from err
    jobs = _jobs(listing, augment, medleys, augment_seed)
    sink = ClipSink(out, backend, jobs, expected, augment_seed, augment_backing, augment_sequenced)
    sink_fingerprint = {
        **expected,
        "augment_seed": augment_seed,
        **({"augment_backing": True} if augment_backing else {}),
        **({"augment_sequenced": True} if augment_sequenced else {}),
    }
    options = RunOptions(
        batch_size=batch_size,
        num_workers=num_workers if len(jobs) > 1 else 0,
        resume=resume,
        strict=strict,
        progress=progress,
        device=device,
        cpu_threads=0,
        total_files=len(jobs) + len(listing.failures),
    )
    summary = run(
        _job_rows(jobs, listing, augment_seed, augment_backing, augment_sequenced),
        sink,
        backend,
        encoders=encoders,
        options=options,
        prepare=prepare_clip,
        extra_fingerprint=sink_fingerprint,
    )
    # The manifest lists every split's valid outputs, so processing one split never hides the others.
    full = listing if set(splits) >= set(SPLITS) else list_emopia(emopia_dir)
    manifest_jobs = jobs if full is listing else _jobs(full, augment, medleys, augment_seed)  # medleys are built once
    n_listed = _write_manifest(
        out, full, manifest_jobs, backend, expected, augment, augment_seed, medleys, augment_backing, augment_sequenced
    )
    seconds = time.perf_counter() - started
    log.info(
        "preprocessed %d clips (%d written, %d resumed, %d failed) in %.1f s; %d in clips.csv",
        len(listing.clips),
        summary.files_done,
        summary.files_skipped_done,
        summary.files_failed,
        seconds,
        n_listed,
    )
    return PreprocessSummary(
        out,
        backend,
        listing.split_source,
        len(listing.clips),
        summary.files_done,
        summary.files_skipped_done,
        summary.files_failed,
        dict(summary.failures_by_type),
        seconds,
    )


def _write_manifest(
    out: Path,
    listing: EmopiaListing,
    jobs: Sequence[_Job],
    backend: str,
    expected: Mapping[str, str],
    augment: int = 0,
    augment_seed: int = 0,
    medleys: int = 0,
    augment_backing: bool = False,
    augment_sequenced: bool = False,
) -> int:
    """clips.csv (every clip with a valid, current stored output) and preprocess.json, atomically; rows written."""
    from midiva.latents import load_bar_tensors

    rows = []
    for job in jobs:
        clip = job.clip
        path = out / CLIPS_DIR / f"{job.name}.safetensors"
        try:
            md5 = job.md5()
        except OSError:
            continue
        if not _valid_output(path, md5, _job_expected(expected, job, augment_seed, augment_backing, augment_sequenced)):
            continue
        _, meta = load_bar_tensors(path)
        rows.append(
            {
                "fname": job.name,
                "quadrant": clip.quadrant,
                "song": clip.song,
                "split": clip.split,
                "n_bars": meta["bars"],
                "md5": meta["md5"],
                "source": clip.path.name,
                "variant": meta.get("variant", ""),
                "bar_quadrants": meta.get("bar_quadrants", ""),
            }
        )
    write_csv_atomic(out / "clips.csv", list(MANIFEST_FIELDS), rows)
    with open(clip_paths(out).failures, "rb") as handle:
        n_failed = max(0, sum(1 for _ in handle) - 1)  # every failure committed, this run and before
    info = {
        "backend": backend,
        "split_source": listing.split_source,
        "n_clips": len(rows),
        "n_failed": n_failed,
        "n_unsplit": listing.n_unsplit,
        "feature_names": json.loads(expected["feature_names"]),
        "code_sha256": expected["code_sha256"],
        "checkpoint_sha256": expected.get("checkpoint_sha256"),
        **({"barseq_sha256": expected["barseq_sha256"]} if "barseq_sha256" in expected else {}),
        "augment": {
            "copies_per_train_clip": augment,
            "medleys": medleys,
            "seed": augment_seed,
            **({"backing": True} if augment_backing else {}),
            **({"sequenced": True} if augment_sequenced else {}),
        },
    }
    write_text_atomic(out / "preprocess.json", json.dumps(info, indent=2) + "\n")
    return len(rows)

"""Stage 7b: parse files into what the representations need, in worker processes, crash-isolated.

Input: `SourceRow`s (`midiva.sources`). Output: one `FileResult` per row, in input order: the
file's bars, per-bar features (float32, (n_bars, n_features)) and/or MuseTok token ids, the
conversion report — or the stage and reason it failed. `parse_in_order` runs `prepare_file` (or
any `PrepareFn`) over `midiva.workers.map_in_order`'s pool: a worker that dies costs one file.

A worker's task is `CHUNK_FILES` rows: `prepare_files` converts the small files among them
together (`events.score_to_bars_many`, `features.bar_features_many`), with the same results as
one by one, so EMOPIA-sized clips are not dominated by fixed per-call costs. The run's finish
step (`PrepareOptions.finish`: for the features backend, prediction and row formatting) runs on
each file in the worker too.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva.errors import DataError, EmptyScoreError, MidivaError
from midiva.sources import SourceRow
from midiva.workers import map_in_order, take_chunk

log = logging.getLogger(__name__)

CHUNK_FILES = 32  # files per worker task: amortises the pool's per-task overhead, the writer's main cost
CHUNKS_AHEAD = 2  # tasks queued per worker: one running, one waiting (bounds the bytes in flight)


@dataclass(frozen=True)
class PrepareOptions:
    """What a worker computes for each file."""

    include_drums: bool = True
    features: bool = True
    tokens: bool = False
    # token ids of the pitched tracks only, on the same bars (`FileResult.pitched_token_ids`)
    pitched_tokens: bool = False
    bar_times: bool = False  # info gets bar_start_ticks / bar_start_seconds (for midiva.predict)
    finish: Callable[[FileResult], FileResult] | None = None  # run on each parsed file, in the worker


@dataclass(frozen=True)
class FileResult:
    """A file after parsing (worker → main): per-bar inputs, or the reason it failed.

    `predictions` ((n_bars, 2) valence, arousal) and `rows` (the sink's table rows) are set when the
    run's prediction step ran beside the parse (`PrepareOptions.finish`, `midiva.runner.PredictStep`).
    """

    md5: str
    name: str
    split: str
    meta: Mapping[str, Any]
    n_bars: int = 0
    features: npt.NDArray[np.float32] | None = None
    token_ids: list[list[int]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    predictions: npt.NDArray[np.float32] | None = None
    rows: bytes | None = None
    stage: str = ""
    error_type: str = ""
    error: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    pitched_token_ids: list[list[int]] | None = None  # `events.pitched_bar_token_ids`, when asked for

    @property
    def ok(self) -> bool:
        """True when the file has bars to predict."""
        return not self.error_type


def _row_failure(row: SourceRow, stage: str, error_type: str, error: str) -> FileResult:
    """The failure of one source row at `stage`."""
    return FileResult(row.md5, row.name, row.split, row.meta, stage=stage, error_type=error_type, error=error)


def _fail(row: SourceRow, stage: str, err: BaseException, strict: bool) -> FileResult:
    if strict:
        raise err
    if not isinstance(err, MidivaError):
        log.debug("unexpected error on %s at %s:\n%s", row.name, stage, traceback.format_exc())
    message = " ".join(str(err).split()) or type(err).__name__
    return _row_failure(row, stage, type(err).__name__, message)


@dataclass
class _Parsed:
    """A file between its stages: loaded, cut into bars, its features once computed."""

    row: SourceRow
    midi: Any
    bars: Any
    seconds: dict[str, float]
    features: npt.NDArray[np.float32] | None = None


def _source_failure(row: SourceRow) -> FileResult:
    return _row_failure(row, "source", row.error_type or "DataError", row.error or "no MIDI bytes")


def _load(row: SourceRow, strict: bool) -> tuple[Any, float] | FileResult:
    """The file's bytes parsed (`midiva.midi.load_midi`) and the seconds it took, or its failure."""
    from midiva.midi import load_midi

    if row.error_type or row.music is None:
        return _source_failure(row)
    t0 = time.perf_counter()
    try:
        midi = load_midi(row.music, name=row.name)
    except Exception as err:  # one bad file must not stop the batch; --strict re-raises
        return _fail(row, "read", err, strict)
    return midi, time.perf_counter() - t0


def _with_bars(row: SourceRow, midi: Any, bars: Any, seconds: dict[str, float], strict: bool) -> _Parsed | FileResult:
    """A loaded file with its bars (or the error converting it gave), checked to have notes."""
    try:
        if isinstance(bars, Exception):
            raise bars
        if bars.n_bars == 0:
            raise EmptyScoreError(f"{row.name!r} has no bars with notes after filtering; skipped")
    except Exception as err:
        return _fail(row, "events", err, strict)
    return _Parsed(row, midi, bars, seconds)


def _events(row: SourceRow, midi: Any, read_s: float, options: PrepareOptions, strict: bool) -> _Parsed | FileResult:
    """A loaded file cut into MuseTok bars on its own (`midiva.events.score_to_bars`)."""
    from midiva.events import score_to_bars

    t0 = time.perf_counter()
    try:
        bars: Any = score_to_bars(midi, include_drums=options.include_drums)
    except Exception as err:
        bars = err
    return _with_bars(row, midi, bars, {"read": read_s, "events": time.perf_counter() - t0}, strict)


def _checked_features(parsed: _Parsed, values: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    features = np.ascontiguousarray(values, dtype=np.float32)
    if features.shape[0] != parsed.bars.n_bars:
        raise DataError(f"{parsed.row.name!r}: {features.shape[0]} feature rows for {parsed.bars.n_bars} bars")
    return features


def _complete(parsed: _Parsed, options: PrepareOptions, strict: bool) -> FileResult:
    """Tokens, bar times and the conversion report of a parsed file; then the run's finish step."""
    row, midi, bars = parsed.row, parsed.midi, parsed.bars
    try:
        token_ids = bars.bar_token_ids() if options.tokens else None
        pitched_ids = None
        if options.pitched_tokens:
            from midiva.events import pitched_bar_token_ids

            t0 = time.perf_counter()
            pitched_ids = pitched_bar_token_ids(midi, bars)  # a second events pass where the file has drums
            parsed.seconds["events"] = parsed.seconds.get("events", 0.0) + time.perf_counter() - t0
        times: dict[str, Any] = {}
        if options.bar_times:
            from midiva.features import bar_start_times

            times = dict(zip(("bar_start_ticks", "bar_start_seconds"), bar_start_times(midi, bars), strict=True))
    except Exception as err:
        return _fail(row, "events", err, strict)
    report = bars.report.to_dict()
    info = {
        "n_bytes": midi.n_bytes,
        "ticks_per_quarter": bars.ticks_per_quarter,
        "time_signature": "{}/{}".format(*bars.time_signature),
        "leading_bars_dropped": bars.leading_bars_dropped,
        **{k: int(v) for k, v in report.items() if isinstance(v, (int, np.integer))},
        **times,
    }
    result = FileResult(
        row.md5,
        row.name,
        row.split,
        row.meta,
        bars.n_bars,
        parsed.features,
        token_ids,
        info,
        seconds=parsed.seconds,
        pitched_token_ids=pitched_ids,
    )
    # An error the finish step raises (not one it records on the file) is the model's, not the file's: it stops the run.
    return result if options.finish is None else options.finish(result)


def prepare_file(row: SourceRow, options: PrepareOptions, strict: bool = False) -> FileResult:
    """Parse one file into per-bar model inputs; a failure becomes a FileResult with its reason."""
    loaded = _load(row, strict)
    return loaded if isinstance(loaded, FileResult) else _prepare_loaded(row, *loaded, options, strict)


def _prepare_loaded(row: SourceRow, midi: Any, read_s: float, options: PrepareOptions, strict: bool) -> FileResult:
    """Events, features and the rest of one loaded file, on its own."""
    parsed = _events(row, midi, read_s, options, strict)
    if isinstance(parsed, _Parsed) and options.features:
        parsed = _with_features(parsed, strict)
    return parsed if isinstance(parsed, FileResult) else _complete(parsed, options, strict)


def _with_features(parsed: _Parsed, strict: bool) -> _Parsed | FileResult:
    """The file's bar features on their own (`midiva.features.bar_features`), or its failure."""
    from midiva.features import bar_features

    t0 = time.perf_counter()
    try:
        parsed.features = _checked_features(parsed, bar_features(parsed.midi, parsed.bars).values)
    except Exception as err:
        return _fail(parsed.row, "features", err, strict)
    parsed.seconds["features"] = time.perf_counter() - t0
    return parsed


def prepare_files(rows: Sequence[SourceRow], options: PrepareOptions, strict: bool = False) -> list[FileResult]:
    """`prepare_file` of each row, the same results, with the small files among them (at most
    `BATCH_MAX_NOTES` notes) converted together (`events.score_to_bars_many`,
    `features.bar_features_many`): small files cost far less than one by one. A larger file is
    done on its own at once, so a worker holds at most one of them, as with `prepare_file`."""
    from midiva.events import BATCH_MAX_NOTES

    out: list[FileResult | None] = [None] * len(rows)
    small: list[tuple[int, Any, float]] = []  # (position, loaded file, seconds to load it)
    for i, row in enumerate(rows):
        loaded = _load(row, strict)
        if isinstance(loaded, FileResult):
            out[i] = loaded
        elif loaded[0].score.note_num() > BATCH_MAX_NOTES:
            out[i] = _prepare_loaded(row, *loaded, options, strict)
        else:
            small.append((i, *loaded))
    for i, result in zip((i for i, _, _ in small), _prepare_small(rows, small, options, strict), strict=True):
        out[i] = result
    return [r for r in out if r is not None]


def _prepare_small(
    rows: Sequence[SourceRow], small: list[tuple[int, Any, float]], options: PrepareOptions, strict: bool
) -> list[FileResult]:
    """Events and features of the small loaded files together; an unforeseen error in a batch
    (not one the batched functions return for their file) sends each file through alone."""
    from midiva.events import score_to_bars_many

    if not small:
        return []
    try:
        t0 = time.perf_counter()
        converted = score_to_bars_many([midi for _, midi, _ in small], include_drums=options.include_drums)
        share = (time.perf_counter() - t0) / max(sum(midi.score.note_num() for _, midi, _ in small), 1)
        parsed = [
            _with_bars(rows[i], midi, bars, {"read": read_s, "events": share * midi.score.note_num()}, strict)
            for (i, midi, read_s), bars in zip(small, converted, strict=True)
        ]
        if options.features:
            parsed = _with_features_together(parsed, strict)
    except Exception:
        if strict:
            raise
        return [_prepare_loaded(rows[i], midi, read_s, options, strict) for i, midi, read_s in small]
    return [p if isinstance(p, FileResult) else _complete(p, options, strict) for p in parsed]


def _with_features_together(parsed: list[_Parsed | FileResult], strict: bool) -> list[_Parsed | FileResult]:
    """`_with_features` of each parsed file, from one `bar_features_many` call."""
    from midiva.features import bar_features_many

    todo = [p for p in parsed if isinstance(p, _Parsed)]
    if not todo:
        return parsed
    t0 = time.perf_counter()
    computed = iter(bar_features_many([(p.midi, p.bars) for p in todo]))
    share = (time.perf_counter() - t0) / max(sum(p.bars.n_bars for p in todo), 1)
    out: list[_Parsed | FileResult] = []
    for p in parsed:
        if isinstance(p, _Parsed):
            features = next(computed)
            try:
                if isinstance(features, Exception):
                    raise features
                p.features = _checked_features(p, features.values)
            except Exception as err:
                p = _fail(p.row, "features", err, strict)
            else:
                p.seconds["features"] = share * p.bars.n_bars
        out.append(p)
    return out


PrepareFn = Callable[[SourceRow, PrepareOptions, bool], FileResult]


def limit_threads(threads: int, *, blas_only: bool = False) -> Any:
    """Cap this process's BLAS pools (numpy's OpenBLAS/MKL), OpenMP and torch's intra-op pool at `threads`.

    A worker parses one file at a time, so extra BLAS threads only spin and compete with the other
    workers. 0 leaves the libraries alone; `blas_only` leaves torch and OpenMP alone (the main
    process, whose torch threads are set on their own). Returns threadpoolctl's limiter
    (`.restore_original_limits()` undoes the cap), or None for 0.
    """
    if threads <= 0:
        return None
    from threadpoolctl import threadpool_limits

    if blas_only:
        return threadpool_limits(limits=threads, user_api="blas")
    torch = sys.modules.get("torch")  # never imported here: only a process that uses torch pays for it
    if torch is not None and int(torch.get_num_threads()) != threads:
        torch.set_num_threads(threads)
    return threadpool_limits(limits=threads)


# glibc's mallopt parameters (malloc.h) and the values `keep_freed_memory` sets.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_TRIM_THRESHOLD_BYTES = 64 * 2**20
MALLOC_MMAP_THRESHOLD_BYTES = 32 * 2**20  # the most glibc's own adaptive threshold reaches on 64-bit


def keep_freed_memory() -> bool:
    """Let glibc keep up to 64 MiB of freed memory for reuse instead of handing it back to the OS at once.

    The features stage frees and allocates arrays of a few MiB per batch; by default glibc returns
    the top of the heap once 128 kB are free and maps larger blocks afresh, so every batch pays for
    page faults on new zeroed pages (EMOPIA: 3,800 per features pass, about 3% of its time; GigaMIDI
    5%). Applied in parsing workers only; an idle worker then holds at most 64 MiB more. Returns
    False (nothing changed) where the C library has no `mallopt` or refuses the values.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES)
    )


_worker_state: dict[str, Any] = {}


@dataclass(frozen=True)
class _PrepareCall:
    """`prepare` bound to its options, as the one-argument function a worker runs (never strict)."""

    prepare: PrepareFn
    options: PrepareOptions
    threads: int = 0  # BLAS/OpenMP/torch threads of the worker process, capped on its first file

    def __call__(self, row: SourceRow) -> FileResult:
        self._limit()
        return self.prepare(row, self.options, False)

    def many(self, rows: list[SourceRow]) -> list[FileResult]:
        """A worker's whole task: `prepare_files` (features batched) when `prepare` is the default."""
        if self.prepare is not prepare_file:
            return [self(row) for row in rows]
        self._limit()
        return prepare_files(rows, self.options, False)

    def _limit(self) -> None:
        if self.threads and not _worker_state.get("threads_limited"):
            limit_threads(self.threads)
            _worker_state["threads_limited"] = True
        if not _worker_state.get("malloc_tuned"):
            _worker_state["malloc_tuned"] = True
            keep_freed_memory()


def _crashed(row: SourceRow) -> FileResult:
    message = f"{row.name!r} crashed the parsing worker process (e.g. a segfault in the MIDI parser); skipped"
    return _row_failure(row, "read", "WorkerCrash", message)


def parse_in_order(
    rows: Iterator[SourceRow],
    prepare: PrepareFn,
    options: PrepareOptions,
    num_workers: int,
    strict: bool,
    threads: int = 0,
) -> Iterator[FileResult]:
    """Results in input order; in-flight work is bounded; a crashed worker costs only its file.

    `threads` caps BLAS and torch threads in each worker (`limit_threads`; 0: library defaults).
    """
    if num_workers == 0:
        if prepare is not prepare_file or strict:  # strict: the first error is raised, from its own file
            for row in rows:
                yield prepare(row, options, strict)
            return
        while True:
            chunk, source_error = take_chunk(rows, CHUNK_FILES)
            yield from prepare_files(chunk, options)
            if source_error is not None:
                raise source_error
            if len(chunk) < CHUNK_FILES:
                return
    yield from map_in_order(
        _PrepareCall(prepare, options, threads),
        rows,
        num_workers,
        _crashed,
        chunk_size=CHUNK_FILES,
        max_in_flight=CHUNKS_AHEAD * num_workers,
    )

"""Stage 7b: parse files into what the representations need, in worker processes, crash-isolated.

Input: `SourceRow`s (`midiva.sources`). Output: one `FileResult` per row, in input order: the
file's bars, per-bar features (float32, (n_bars, n_features)) and/or MuseTok token ids, the
conversion report — or the stage and reason it failed. `parse_in_order` runs `prepare_file` (or
any `PrepareFn`) over `midiva.workers.map_in_order`'s pool: a worker that dies costs one file.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva.errors import DataError, EmptyScoreError, MidivaError
from midiva.sources import SourceRow
from midiva.workers import map_in_order

log = logging.getLogger(__name__)

CHUNK_FILES = 8  # files per worker task: amortises inter-process overhead, keeps latency low


@dataclass(frozen=True)
class PrepareOptions:
    """What a worker computes for each file."""

    include_drums: bool = True
    features: bool = True
    tokens: bool = False
    bar_times: bool = False  # info gets bar_start_ticks / bar_start_seconds (for midiva.predict)


@dataclass(frozen=True)
class FileResult:
    """A file after parsing (worker → main): per-bar inputs, or the reason it failed."""

    md5: str
    name: str
    split: str
    meta: Mapping[str, Any]
    n_bars: int = 0
    features: npt.NDArray[np.float32] | None = None
    token_ids: list[list[int]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    stage: str = ""
    error_type: str = ""
    error: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the file has bars to predict."""
        return not self.error_type


def _fail(row: SourceRow, stage: str, err: BaseException, strict: bool) -> FileResult:
    if strict:
        raise err
    if not isinstance(err, MidivaError):
        log.debug("unexpected error on %s at %s:\n%s", row.name, stage, traceback.format_exc())
    message = " ".join(str(err).split()) or type(err).__name__
    return FileResult(row.md5, row.name, row.split, row.meta, stage=stage, error_type=type(err).__name__, error=message)


def prepare_file(row: SourceRow, options: PrepareOptions, strict: bool = False) -> FileResult:
    """Parse one file into per-bar model inputs; a failure becomes a FileResult with its reason."""
    from midiva.events import score_to_bars
    from midiva.midi import load_midi

    if row.error_type or row.music is None:
        return FileResult(
            row.md5,
            row.name,
            row.split,
            row.meta,
            stage="source",
            error_type=row.error_type or "DataError",
            error=row.error or "no MIDI bytes",
        )
    seconds: dict[str, float] = {}
    stage = "read"
    try:
        t0 = time.perf_counter()
        midi = load_midi(row.music, name=row.name)
        t1 = time.perf_counter()
        stage = "events"
        bars = score_to_bars(midi, include_drums=options.include_drums)
        if bars.n_bars == 0:
            raise EmptyScoreError(f"{row.name!r} has no bars with notes after filtering; skipped")
        t2 = time.perf_counter()
        seconds = {"read": t1 - t0, "events": t2 - t1}
        features = None
        if options.features:
            stage = "features"
            from midiva.features import bar_features

            features = np.ascontiguousarray(bar_features(midi, bars).values, dtype=np.float32)
            if features.shape[0] != bars.n_bars:
                raise DataError(f"{row.name!r}: {features.shape[0]} feature rows for {bars.n_bars} bars")
            seconds["features"] = time.perf_counter() - t2
        token_ids = bars.bar_token_ids() if options.tokens else None
        times: dict[str, Any] = {}
        if options.bar_times:
            from midiva.features import bar_start_times

            times = dict(zip(("bar_start_ticks", "bar_start_seconds"), bar_start_times(midi, bars), strict=True))
    except Exception as err:  # one bad file must not stop the batch; --strict re-raises
        return _fail(row, stage, err, strict)
    report = bars.report.to_dict()
    info = {
        "n_bytes": midi.n_bytes,
        "ticks_per_quarter": bars.ticks_per_quarter,
        "time_signature": "{}/{}".format(*bars.time_signature),
        "leading_bars_dropped": bars.leading_bars_dropped,
        **{k: int(v) for k, v in report.items() if isinstance(v, (int, np.integer))},
        **times,
    }
    return FileResult(row.md5, row.name, row.split, row.meta, bars.n_bars, features, token_ids, info, seconds=seconds)


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


_worker_state: dict[str, Any] = {}


@dataclass(frozen=True)
class _PrepareCall:
    """`prepare` bound to its options, as the one-argument function a worker runs (never strict)."""

    prepare: PrepareFn
    options: PrepareOptions
    threads: int = 0  # BLAS/OpenMP/torch threads of the worker process, capped on its first file

    def __call__(self, row: SourceRow) -> FileResult:
        if self.threads and not _worker_state.get("threads_limited"):
            limit_threads(self.threads)
            _worker_state["threads_limited"] = True
        return self.prepare(row, self.options, False)


def _crashed(row: SourceRow) -> FileResult:
    return FileResult(
        row.md5,
        row.name,
        row.split,
        row.meta,
        stage="read",
        error_type="WorkerCrash",
        error=f"{row.name!r} crashed the parsing worker process (e.g. a segfault in the MIDI parser); skipped",
    )


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
        for row in rows:
            yield prepare(row, options, strict)
        return
    yield from map_in_order(
        _PrepareCall(prepare, options, threads), rows, num_workers, _crashed, chunk_size=CHUNK_FILES
    )

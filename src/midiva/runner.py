"""The one batch runner behind annotate, encode and preprocess-emopia: every file once, in order, resumable.

Input: `SourceRow`s in a stable order, a backend (`midiva.representations`: what each file is turned
into), its loaded encoders, optionally a regressor, and a sink. The flow:

    source rows -> skip other shards, committed files, repeated md5s (before any bytes are parsed)
                -> parse in a crash-isolated worker pool (`midiva.prepare`; a dead worker costs one file)
                -> encode the batched representations, bars of many files per call, on the run's device
                -> predict (when there is a regressor): per file, each bar on its own (`PredictStep`;
                   for the features backend in the parsing worker, which also formats the rows)
                -> the sink turns each file into its table rows (and per-file tensors), staged in the ledger
                -> commit: fsync the tables, then the ledger records (`midiva.ledger`)

The runner takes the output's exclusive lock, computes the resume fingerprint itself (backend, drum
option, shard, the regressor's weights and recipe, each encoder's identity; see `fingerprint`), and
makes a file's values independent of which files shared its batch, so a resumed, re-batched or
sharded run writes the same bytes as one uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from midiva import representations
from midiva.atomic import write_json_atomic
from midiva.errors import ConfigError, DataError, MidivaError, OutputError, SourceError
from midiva.ledger import REPORT_FIELDS, LedgerState, LedgerWriter, Md5Set, OutputPaths
from midiva.lock import OutputLock, acquire_output_lock
from midiva.prepare import (
    FileResult,
    PrepareFn,
    PrepareOptions,
    limit_threads,
    parse_in_order,
    prepare_file,
)
from midiva.representations import EncodeContext
from midiva.sources import SkipUnread, SourceRow, shard_of

log = logging.getLogger(__name__)

MAX_PENDING_FILES = 4096
# How the head computes (`midiva.model.BarHead`): part of the fingerprint, since it sets the last digits.
PREDICTION_NUMERICS = "per-bar float64"


class Regressor(Protocol):
    """What the runner needs from `midiva.model.Regressor`."""

    @property
    def backend(self) -> str: ...

    def make_inputs(
        self, features: Any = None, latents: Any = None, feature_names: Any = None, blocks: Any = None
    ) -> npt.NDArray[np.float32]: ...

    def predict(self, inputs: Any, *, batch_size: int = ..., device: Any = ...) -> npt.NDArray[np.float32]: ...


class Sink(Protocol):
    """Where a run's files go: the ledger's three tables (`paths`) and anything written per file.

    `rows` is called once per finished file, in source order, before the file is staged; it writes
    the file's own outputs (if any) and returns its bytes for the first table and their row count.
    `finish` runs after the last commit.
    """

    paths: OutputPaths
    headers: tuple[bytes, bytes, bytes]
    label: str

    def rows(
        self, result: FileResult, tensors: Mapping[str, npt.NDArray[Any]], predictions: npt.NDArray[np.float32] | None
    ) -> tuple[bytes, int]: ...

    def finish(self, complete: bool) -> None: ...


@dataclass(frozen=True)
class RunOptions:
    """How a run is carried out.

    Attributes:
        batch_size: bars per encoder call (bars of many files are batched together); does not change
            the features backend's output (the regressor predicts each bar on its own).
        num_workers: MIDI-parsing processes (0: parse in this process).
        num_shards / shard_index: process only files with `shard_of(md5, num_shards) == shard_index`.
        resume: skip committed files (False: start over, discarding the previous outputs).
        retry_failures: on resume, try files recorded as failed again.
        strict: re-raise the first per-file error (parses in-process, for debugging).
        include_drums: keep drum notes in the bars (MuseTok's reference does).
        limit: process at most this many new files, then stop.
        commit_interval_s: fsync and commit at most this often (a kill loses at most this much work).
        progress: show a tqdm bar on stderr (only when stderr is a terminal).
        device: torch device for the encoders and the regressor.
        torch_threads: intra-op threads for torch in this process during the run (None: leave as is).
        autocast: 'bf16' or 'fp16' runs batched encoders in reduced precision on CUDA (part of the fingerprint).
        total_files: rows the source will yield, when known: the progress bar's total.
        lock: take the output's exclusive lock (`midiva.lock`); False only where the filesystem has
            no working locks and one writer is ensured otherwise.
        lock_label: what this run is (e.g. its Slurm task), shown to a run refused by the lock.
        cpu_threads: BLAS threads in this process, and BLAS/OpenMP/torch threads in each parsing
            worker (0: the libraries' defaults).
    """

    batch_size: int = 4096
    num_workers: int = 0
    num_shards: int = 1
    shard_index: int = 0
    resume: bool = True
    retry_failures: bool = False
    strict: bool = False
    include_drums: bool = True
    limit: int | None = None
    commit_interval_s: float = 1.0
    progress: bool = True
    device: str = "cpu"
    torch_threads: int | None = None
    autocast: str | None = None
    total_files: int | None = None
    lock: bool = True
    lock_label: str = ""
    cpu_threads: int = 1


@dataclass(frozen=True)
class RunSummary:
    """What one run did (also written to the output's summary JSON).

    Attributes:
        files_done / files_failed / bars: committed by this run.
        files_skipped_done / _shard / _duplicate: committed earlier, other shards, repeats of an md5.
        complete: the source was read to its end (not stopped by `limit` or a stop request).
        failures_by_type: error type -> count, this run.
        conversion: ConversionReport totals over this run's finished files.
        seconds_by_stage: where the time went (worker stages summed over workers).
        total_files / total_bars: everything committed at the output, all runs together
            (total_bars counts the first table's rows: bars for annotation, files for tensor outputs).
    """

    out: str
    files_done: int
    files_failed: int
    files_skipped_done: int
    files_skipped_shard: int
    files_skipped_duplicate: int
    bars: int
    complete: bool
    elapsed_s: float
    files_per_s: float
    bars_per_s: float
    failures_by_type: dict[str, int]
    conversion: dict[str, int]
    seconds_by_stage: dict[str, float]
    total_files: int
    total_bars: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


SMALL_INPUT_FILES = 64  # fewer files parse faster in-process than a worker pool starts
MAX_DEFAULT_WORKERS = 4


def default_num_workers(n_files: int | None) -> int:
    """Parsing workers when none are asked for: none for fewer than `SMALL_INPUT_FILES` files (or
    one CPU), else min(4, CPUs - 1), leaving a core for the main process."""
    import os

    if n_files is not None and n_files < SMALL_INPUT_FILES:
        return 0
    return min(MAX_DEFAULT_WORKERS, max(0, (os.cpu_count() or 1) - 1))


def torch_threads_for(backend: str, num_workers: int, cpu_threads: int) -> int | None:
    """torch intra-op threads for the main process: `cpu_threads` (None for 0) when the backend has no
    batched encoder (the small MLP needs no more) or workers parse alongside; else torch's default."""
    if num_workers > 0 or not any(rep.batched for rep in representations.recipe(backend)):
        return cpu_threads or None
    return None


def regressor_sha256(regressor: Any) -> str:
    """The regressor's identity: its own `sha256` (`midiva.model.Regressor`: the weights file's, or its
    tensors' and recipe's), else a hash of its type and state for other objects."""
    own = getattr(regressor, "sha256", None)
    if isinstance(own, str) and own:
        return own
    state = {k: repr(v) for k, v in sorted(vars(regressor).items())} if hasattr(regressor, "__dict__") else {}
    kind = f"{type(regressor).__module__}.{type(regressor).__qualname__}"
    return hashlib.sha256(json.dumps([kind, state], sort_keys=True).encode()).hexdigest()


def fingerprint(backend: str, encoders: Mapping[str, Any], regressor: Any, options: RunOptions) -> dict[str, Any]:
    """Everything that changes the output's bytes, for the ledger header; a resume must match it."""
    context = EncodeContext(options.batch_size, options.device, options.autocast)
    out: dict[str, Any] = {
        "backend": backend,
        "include_drums": options.include_drums,
        "num_shards": options.num_shards,
        "shard_index": options.shard_index,
    }
    if regressor is not None:
        out["model_sha256"] = regressor_sha256(regressor)
        out["prediction"] = PREDICTION_NUMERICS
    out.update(representations.fingerprint(backend, encoders, context))
    return out


def check_backend(regressor: Any, backend: str | None) -> str:
    """The backend to run: the model's own; asking for another one is an error.

    Raises:
        ConfigError: `backend` is given and differs from the model's, or the model's is unknown.
    """
    model_backend = str(getattr(regressor, "backend", ""))
    if not representations.is_backend(model_backend):
        raise ConfigError(
            f"the regressor reports backend {model_backend!r}; expected one of {representations.backend_names()}"
        )
    if backend is not None and backend != model_backend:
        raise ConfigError(
            f"--backend {backend} does not match the model, which was trained on {model_backend!r} bar inputs; "
            f"pass --backend {model_backend}, or a --model trained for {backend!r}"
        )
    return model_backend


def _failed(f: FileResult, stage: str, err: BaseException) -> FileResult:
    return FileResult(f.md5, f.name, f.split, f.meta, stage=stage, error_type=type(err).__name__, error=str(err))


@dataclass(frozen=True)
class PredictStep:
    """One file's model inputs, predictions, domain distance and (when `format_rows` is given) its table rows.

    For the features backend it runs in the parsing worker (`PrepareOptions.finish`), so the main
    process only appends and commits; for batched backends it runs in the main process once the
    file's blocks are encoded. `model` is the regressor, or its `predictor` (picklable numpy
    arrays, `midiva.model.Predictor`) for the workers. Predictions are per bar and do not depend on
    which files share a batch. A file whose inputs cannot be built fails at stage 'inputs'; an
    error from `predict` is the model's and stops the run.
    """

    model: Regressor
    domain: bool = True
    format_rows: Callable[[str, npt.NDArray[np.float32]], bytes] | None = None
    strict: bool = False

    def __call__(self, f: FileResult, blocks: Mapping[str, npt.NDArray[Any]] | None = None) -> FileResult:
        if not f.ok:
            return f
        t0 = time.perf_counter()
        blocks = dict(blocks or {})
        latents = blocks.pop("musetok", None)
        try:  # context blocks (piece mean, windows) make inputs a per-piece computation
            made = (
                self.model.make_inputs(f.features, latents, blocks=blocks)
                if blocks
                else self.model.make_inputs(f.features, latents)
            )
            inputs = np.asarray(made, np.float32)
            if inputs.ndim != 2 or len(inputs) != f.n_bars:
                raise DataError(f"{f.name!r}: the model built {inputs.shape} inputs for {f.n_bars} bars")
        except MidivaError as err:
            if self.strict:
                raise
            return _failed(f, "inputs", err)
        preds = np.asarray(self.model.predict(inputs), np.float32)
        if preds.shape != (f.n_bars, 2):
            raise DataError(f"the regressor returned shape {preds.shape} for {f.n_bars} bars; expected ({f.n_bars}, 2)")
        info = dict(f.info)
        distance = self.model.domain_distance(inputs) if self.domain and f.n_bars else None  # type: ignore[attr-defined]
        if distance is not None:
            info["domain_distance"] = f"{distance:.4f}"
        seconds = {**f.seconds, "predict": f.seconds.get("predict", 0.0) + time.perf_counter() - t0}
        if self.format_rows is None:
            return replace(f, predictions=preds, info=info, seconds=seconds)
        # The file's table rows are made here, so the writer only appends them; the features are
        # not needed any more and do not travel back to the main process.
        rows = self.format_rows(f.md5, preds)
        return replace(f, features=None, predictions=preds, rows=rows, info=info, seconds=seconds)


def predict_step(
    regressor: Regressor | None,
    backend: str,
    options: RunOptions,
    format_rows: Callable[[str, npt.NDArray[np.float32]], bytes] | None = None,
) -> tuple[PredictStep | None, bool]:
    """The run's prediction step, and whether it runs in the parsing workers (the features backend).

    Warns once (per run, not per file) when the model cannot give `domain_distance`.
    """
    if regressor is None:
        return None, False
    domain = callable(getattr(regressor, "domain_distance", None))
    if domain and getattr(regressor, "domain_reference", 0.0) is None:
        log.warning(
            "the model's metadata has no training-domain reference; the domain_distance "
            "column stays empty (retrain the model with this midiva version to get it)"
        )
        domain = False
    in_workers = not any(rep.batched for rep in representations.recipe(backend))
    predictor = getattr(regressor, "predictor", None)
    model = predictor if predictor is not None else regressor
    # rows are formatted only in the workers; the main process formats what it predicts itself
    return PredictStep(model, domain, format_rows if in_workers else None, options.strict), in_workers


class _Batches:
    """Files in, (file, tensors, predictions) out, in order.

    Batched representations encode the bars of many files at once; the prediction step (when it did
    not already run in the worker) then runs per file: inputs are built per piece (the context
    blocks span the piece) and the head predicts each bar on its own, so nothing depends on which
    files shared a batch, nor on --batch-size.
    """

    def __init__(
        self,
        backend: str,
        encoders: Mapping[str, Any],
        step: PredictStep | None,
        options: RunOptions,
        seconds: defaultdict[str, float],
    ) -> None:
        self.backend, self.encoders, self.step = backend, encoders, step
        self.recipe = representations.recipe(backend)
        self.context = EncodeContext(options.batch_size, options.device, options.autocast)
        self.seconds = seconds

    def _encode(self, ok: list[FileResult]) -> list[dict[str, npt.NDArray[Any]]]:
        tensors: list[dict[str, npt.NDArray[Any]]] = [{} for _ in ok]
        if any(rep.batched for rep in self.recipe) and ok:
            t0 = time.perf_counter()
            songs = {
                "tokens": [f.token_ids or [] for f in ok],
                "pitched_tokens": [f.pitched_token_ids or [] for f in ok],
            }
            for encoded in representations.encode_batch(self.backend, self.encoders, songs, self.context).values():
                for piece, named in zip(tensors, encoded, strict=True):
                    piece.update(named)
            self.seconds["encode"] += time.perf_counter() - t0
        for f, piece in zip(ok, tensors, strict=True):
            if f.features is not None:
                piece["features"] = f.features
        return tensors

    def run(
        self, files: list[FileResult]
    ) -> Iterator[tuple[FileResult, dict[str, npt.NDArray[Any]], npt.NDArray[np.float32] | None]]:
        """Encode, predict what the workers did not, and yield every file in order."""
        ok = [f for f in files if f.ok]
        encoded = iter(self._encode(ok))
        for f in files:
            tensors = next(encoded) if f.ok else {}
            if f.ok and self.step is not None and f.predictions is None:
                blocks = {rep.name: tensors[rep.store_key] for rep in self.recipe if rep.batched}
                f = self.step(f, blocks)
                self.seconds["predict"] += f.seconds.get("predict", 0.0)
            yield f, tensors, f.predictions


def _select(
    rows: Iterable[SourceRow], state: LedgerState, options: RunOptions, counts: Counter[str]
) -> Iterator[SourceRow]:
    """Skip other shards, committed files and repeated md5s — before any bytes are parsed."""
    claimed = Md5Set()
    for row in rows:
        if options.num_shards > 1 and shard_of(row.md5, options.num_shards) != options.shard_index:
            counts["skipped_shard"] += 1
        elif state.is_done(row.md5, options.retry_failures):
            counts["skipped_done"] += 1
        elif row.md5 in claimed:
            counts["skipped_duplicate"] += 1
        elif options.limit is not None and counts["dispatched"] >= options.limit:
            counts["limited"] = 1
            return
        else:
            claimed.add(row.md5)
            counts["dispatched"] += 1
            yield row


def _set_torch_threads(threads: int | None) -> int | None:
    """Set torch's intra-op threads (when torch is in use); returns the previous value."""
    torch = sys.modules.get("torch")
    if threads is None or torch is None:
        return None
    previous = int(torch.get_num_threads())
    torch.set_num_threads(threads)
    return previous


def progress_bar(options: RunOptions, label: str = "annotate") -> Any:
    """The run's tqdm bar on stderr: a total when the source knows it, off unless stderr is a terminal."""
    from tqdm import tqdm

    disable = not options.progress or not sys.stderr.isatty()
    desc = label if options.total_files is not None else f"{label} (unknown total)"
    return tqdm(total=options.total_files, unit="file", desc=desc, file=sys.stderr, disable=disable, dynamic_ncols=True)


def stream(
    rows: Iterable[SourceRow],
    backend: str,
    *,
    encoders: Mapping[str, Any] | None = None,
    regressor: Regressor | None = None,
    options: RunOptions | None = None,
    prepare: PrepareFn | None = None,
    parse: PrepareOptions | None = None,
    stop: Callable[[], bool] | None = None,
    counts: Counter[str] | None = None,
    seconds: defaultdict[str, float] | None = None,
    format_rows: Callable[[str, npt.NDArray[np.float32]], bytes] | None = None,
) -> Iterator[tuple[FileResult, dict[str, npt.NDArray[Any]], npt.NDArray[np.float32] | None]]:
    """The pipeline without a ledger: (file, its tensors, its predictions or None) per row, in order.

    Rows are parsed in the crash-isolated pool, batched representations are encoded across files,
    the regressor (if any) predicts each bar on its own. When the source fails (SourceError) or the
    user interrupts, the files already parsed are still yielded before the error is raised. `stop`
    is polled between files (True: the files parsed so far are yielded, then the stream ends and
    `counts["stopped"]` is set). `parse` defaults to what the backend's representations need;
    `seconds` collects the time spent encoding and predicting. With the features backend the
    prediction step (`PredictStep`) runs in the parsing workers, and `format_rows(md5, predictions)`
    (a sink's row formatter) too, its bytes returned as `FileResult.rows`.
    """
    options = options or RunOptions()
    counts = counts if counts is not None else Counter()
    seconds = seconds if seconds is not None else defaultdict(float)
    if parse is None:
        needs = representations.needs_of(backend)
        parse = PrepareOptions(
            options.include_drums, "features" in needs, "tokens" in needs, pitched_tokens="pitched_tokens" in needs
        )
    step, in_workers = predict_step(regressor, backend, options, format_rows)
    if in_workers:
        parse = replace(parse, finish=step)
    # The step also runs here for files a worker did not predict (a custom `prepare` that ignores `finish`).
    batches = _Batches(backend, dict(encoders or {}), step, options, seconds)
    num_workers = 0 if options.strict else options.num_workers
    results = parse_in_order(
        iter(rows), prepare or prepare_file, parse, num_workers, options.strict, threads=options.cpu_threads
    )
    pending: list[FileResult] = []
    pending_bars = 0
    try:
        for result in results:
            if stop is not None and stop():  # in-flight files are dropped; the next run redoes them
                counts["stopped"] = 1
                log.info("stop requested: committing the files parsed so far")
                break
            pending.append(result)
            pending_bars += result.n_bars
            if pending_bars >= options.batch_size or len(pending) >= MAX_PENDING_FILES:
                yield from batches.run(pending)
                pending, pending_bars = [], 0
    except (SourceError, KeyboardInterrupt):  # e.g. the hub stream broke: finish what was parsed, then raise
        yield from batches.run(pending)
        raise
    finally:
        if hasattr(results, "close"):
            results.close()  # ends the worker pool now
    yield from batches.run(pending)


class _Run:
    """One run's state: the sink, the ledger writer, the counters and the progress bar."""

    def __init__(self, sink: Sink, writer: LedgerWriter, options: RunOptions) -> None:
        self.sink, self.writer, self.options = sink, writer, options
        self.counts: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.conversion: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.start = time.perf_counter()
        self.bar = progress_bar(options, sink.label)

    def stage(
        self, f: FileResult, tensors: Mapping[str, npt.NDArray[Any]], preds: npt.NDArray[np.float32] | None
    ) -> None:
        """Stage one file (its rows, or its failure) and commit when the interval has passed."""
        t0 = time.perf_counter()
        for stage, spent in f.seconds.items():
            self.seconds[stage] += spent
        if f.ok:
            f = self._stage_ok(f, tensors, preds)
        if not f.ok:
            self.writer.stage_failed(f)
            self.counts["failed"] += 1
            self.failures[f.error_type] += 1
            log.info("failed %s at %s: %s: %s", f.name, f.stage, f.error_type, f.error)
        self.writer.maybe_commit()
        self.seconds["write"] += time.perf_counter() - t0
        self.show()

    def show(self) -> None:
        """Move the progress bar: staged files and skipped rows count towards the total."""
        if self.bar.disable:  # called per file: nothing to do off a terminal
            return
        counts = self.counts
        seen = (
            counts["done"]
            + counts["failed"]
            + counts["skipped_done"]
            + counts["skipped_shard"]
            + counts["skipped_duplicate"]
        )
        if seen > counts["shown"]:
            self.bar.update(seen - counts["shown"])
            counts["shown"] = seen
            rate = counts["bars"] / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix(bars_s=f"{rate:.0f}", failed=counts["failed"], refresh=False)

    def _stage_ok(
        self, f: FileResult, tensors: Mapping[str, npt.NDArray[Any]], preds: npt.NDArray[np.float32] | None
    ) -> FileResult:
        try:
            rows, n_rows = self.sink.rows(f, tensors, preds)
        except DataError as err:  # this file's outputs cannot be made (OutputError, a disk problem, stops the run)
            if self.options.strict:
                raise
            return _failed(f, "write", err)
        self.writer.stage_ok(f, rows, n_rows)
        self.counts["done"] += 1
        self.counts["bars"] += f.n_bars
        info, conversion = f.info, self.conversion
        for key in REPORT_FIELDS:
            if key in info:
                conversion[key] += info[key]
        return f

    def summary(self, complete: bool) -> RunSummary:
        counts, elapsed = self.counts, time.perf_counter() - self.start
        n_files = counts["done"] + counts["failed"]
        stages = dict(self.seconds)
        return RunSummary(
            out=str(self.sink.paths.csv),
            files_done=counts["done"],
            files_failed=counts["failed"],
            files_skipped_done=counts["skipped_done"],
            files_skipped_shard=counts["skipped_shard"],
            files_skipped_duplicate=counts["skipped_duplicate"],
            bars=counts["bars"],
            complete=complete,
            elapsed_s=round(elapsed, 3),
            files_per_s=round(n_files / max(elapsed, 1e-9), 2),
            bars_per_s=round(counts["bars"] / max(elapsed, 1e-9), 1),
            failures_by_type=dict(self.failures),
            conversion=dict(self.conversion),
            seconds_by_stage={k: round(v, 3) for k, v in stages.items()},
            total_files=self.writer.state.n_files,
            total_bars=self.writer.state.n_rows,
        )


def run(
    rows: Iterable[SourceRow],
    sink: Sink,
    backend: str,
    *,
    encoders: Mapping[str, Any] | None = None,
    regressor: Regressor | None = None,
    options: RunOptions | None = None,
    prepare: PrepareFn | None = None,
    lock: OutputLock | None = None,
    stop: Callable[[], bool] | None = None,
    skip_unread: SkipUnread | None = None,
    extra_fingerprint: Mapping[str, Any] | None = None,
) -> RunSummary:
    """Run every row through parsing, the backend's representations, the regressor (if any) and `sink`, exactly once.

    Args:
        rows: the files, in a stable order (`midiva.sources`).
        sink: what is written per file (`midiva.annotate.AnnotationSink`, `midiva.encode.TensorSink`, ...).
        backend: the representations to compute (`midiva.representations.recipe`); the regressor's own when given.
        encoders: the loaded encoder of each batched representation, by name (`representations.load_encoders`).
        regressor: predicts valence and arousal per bar from the representations (None: no prediction).
        prepare: per-file parser (default `midiva.prepare.prepare_file`).
        lock: the output's lock, already acquired by the caller (default: acquired and released here).
        stop: polled between files; once True, the files parsed so far are committed and the run
            returns early (`complete` False) — how a signal stops a run cleanly.
        skip_unread: the hook the source of `rows` was built with; set here to what this run skips
            (other shards, committed files), so the source need not read or hash their bytes.
        extra_fingerprint: what else changes the sink's bytes (e.g. the code that computes stored
            features), added to the fingerprint the runner computes.

    Raises:
        OutputError: the outputs cannot be written (read-only, full disk); committed files stay intact.
        OutputLockedError: another live process writes the output.
        ConfigError: resuming outputs made with another model or settings (the message names what differs).
    """
    options = options or RunOptions()
    encoders = dict(encoders or {})
    backend = _check_run(backend, encoders, regressor, options)
    own_lock = lock is None
    if lock is None:
        lock = acquire_output_lock(sink.paths.csv, label=options.lock_label, enabled=options.lock)
    elif lock.target.resolve() != sink.paths.csv.resolve():
        raise ConfigError(f"the lock passed is for {str(lock.target)!r}, not for {str(sink.paths.csv)!r}")
    try:
        full_fingerprint = {**(extra_fingerprint or {}), **fingerprint(backend, encoders, regressor, options)}
        writer = LedgerWriter(
            sink.paths,
            full_fingerprint,
            resume=options.resume,
            commit_interval_s=options.commit_interval_s,
            headers=sink.headers,
        )
    except BaseException:
        if own_lock:
            lock.release()
        raise
    if skip_unread is not None:
        state = writer.state
        skip_unread.test = lambda md5: (
            (options.num_shards > 1 and shard_of(md5, options.num_shards) != options.shard_index)
            or state.is_done(md5, options.retry_failures)
        )  # exactly what `_select` skips before the claim check
    job = _Run(sink, writer, options)
    previous_threads = _set_torch_threads(options.torch_threads)
    blas_limit = limit_threads(options.cpu_threads, blas_only=True)
    try:
        complete = _drive(job, rows, backend, encoders, regressor, prepare, stop)
    finally:
        job.bar.close()
        writer.close()
        if own_lock:
            lock.release()
        _set_torch_threads(previous_threads)
        if blas_limit is not None:
            blas_limit.restore_original_limits()
    sink.finish(complete)
    summary = job.summary(complete)
    write_json_atomic(sink.paths.summary, summary.to_json(), hint="the outputs are intact", indent=2, default=str)
    log.info(
        "%s: %d files (%d bars), %d failed; skipped %d done, %d other shards, %d duplicates; %.1f s",
        sink.label,
        summary.files_done,
        summary.bars,
        summary.files_failed,
        summary.files_skipped_done,
        summary.files_skipped_shard,
        summary.files_skipped_duplicate,
        summary.elapsed_s,
    )
    return summary


def _check_run(backend: str, encoders: Mapping[str, Any], regressor: Regressor | None, options: RunOptions) -> str:
    """The backend to run, once the shard and the encoders it needs are checked."""
    if regressor is not None:
        backend = check_backend(regressor, backend)
    if not 0 <= options.shard_index < options.num_shards:
        raise ConfigError(f"shard index {options.shard_index} must be in [0, {options.num_shards})")
    for rep in representations.recipe(backend):
        if rep.batched and encoders.get(rep.name) is None:
            raise ConfigError(f"the {backend!r} backend needs the {rep.name} encoder; pass --checkpoint")
    return backend


def _drive(
    job: _Run,
    rows: Iterable[SourceRow],
    backend: str,
    encoders: Mapping[str, Any],
    regressor: Regressor | None,
    prepare: PrepareFn | None,
    stop: Callable[[], bool] | None,
) -> bool:
    """Stream every selected row into the sink and commit; True when the source was read to its end."""
    options, counts, writer = job.options, job.counts, job.writer
    try:
        selected = _select(rows, writer.state, options, counts)
        for f, tensors, preds in stream(
            selected,
            backend,
            encoders=encoders,
            regressor=regressor,
            options=options,
            prepare=prepare,
            stop=stop,
            counts=counts,
            seconds=job.seconds,
            format_rows=getattr(job.sink, "format_rows", None),
        ):
            job.stage(f, tensors, preds)
        job.show()
        complete = not (counts["limited"] or counts["stopped"])
        t0 = time.perf_counter()
        writer.commit()
        if complete:
            writer.mark_complete()
        job.seconds["write"] += time.perf_counter() - t0
    except (MidivaError, KeyboardInterrupt) as err:
        if not isinstance(err, OutputError):  # keep what is finished
            with suppress(MidivaError):
                writer.commit()
        raise
    return complete

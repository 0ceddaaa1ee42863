"""Stage 7: annotate a corpus — valence and arousal for every bar of every file, exactly once.

Input: `SourceRow`s (`midiva.sources`: the GigaMIDI hub data set, local parquet, or MIDI files)
and a trained regressor (plus the MuseTok encoder for the musetok/hybrid backends).
Output, beside `--out annotations.csv`:
  annotations.csv           md5,bar_number,valence,arousal — one row per bar, bar_number from 0
                            (MuseTok's bar 0 = the bar of the first note), valence and arousal in
                            [-1, 1] with 4 decimals; the rows of one file are contiguous
  annotations.meta.csv      one row per file (annotated or failed): split, title, artist, genre
                            fields (lists joined with '|'), bars, what the conversion dropped
  annotations.failures.csv  md5,name,stage,error_type,message
  annotations.csv.done      the ledger: one commit record per file
  annotations.summary.json  the last run's `RunSummary`

Exactly once: the tables are append-only. A file counts as done only once its ledger record
(md5, status, n_rows, the byte length of each table after its rows, the crc32 of those rows and
of the record) is written and fsynced, after the table bytes were. On resume every table is truncated back to the lengths in the last
intact record — rows of uncommitted files and torn lines vanish — and committed md5s are skipped
before their bytes are parsed. Files are committed in source order, so an interrupted and
resumed run writes the same bytes as an uninterrupted one. Resume state is 16 bytes per file.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import numpy.typing as npt

from midiva.config import BACKENDS
from midiva.errors import ConfigError, DataError, MidivaError, OutputError, SourceError
from midiva.lock import OutputLock, acquire_output_lock, lock_path_for, read_holder
from midiva.sources import (
    COMPLETE_LINE,
    LEDGER_MAGIC,
    LEDGER_VERSION,
    META_FIELDS,
    REPORT_FIELDS,
    TABLE_HEADERS,
    FileResult,
    LedgerEntry,
    LedgerState,
    Md5Set,
    OutputPaths,
    PrepareFn,
    PrepareOptions,
    SkipUnread,
    SourceRow,
    check_rows,
    csv_line,
    export_parquet,
    iter_ledger,
    ledger_entries,
    ledger_line,
    limit_threads,
    output_paths,
    parse_in_order,
    prepare_file,
    read_ledger_header,
    scan_ledger,
    shard_of,
    table_crc,
)

log = logging.getLogger(__name__)

MAX_BUFFER_BYTES = 32 << 20


class Regressor(Protocol):
    """What annotation needs from `midiva.model.Regressor`."""

    @property
    def backend(self) -> str: ...

    def make_inputs(self, features: Any = None, latents: Any = None) -> npt.NDArray[np.float32]: ...

    def predict(self, inputs: Any, *, batch_size: int = ..., device: Any = ...) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True)
class AnnotateOptions:
    """How a run is carried out.

    Attributes:
        batch_size: bars per encoder/regressor call (bars of many files are batched together).
        num_workers: MIDI-parsing processes (0: parse in this process).
        num_shards / shard_index: annotate only files with `shard_of(md5, num_shards) == shard_index`.
        resume: skip committed files (False: start over, discarding the previous outputs at `out`).
        retry_failures: on resume, try files recorded as failed again.
        strict: re-raise the first per-file error (parses in-process, for debugging).
        include_drums: keep drum notes in the bars (MuseTok's reference does).
        limit: annotate at most this many new files, then stop.
        parquet: also export the tables as Parquet at the end.
        commit_interval_s: fsync and commit at most this often (a kill loses at most this much work).
        progress: show a tqdm bar on stderr (only when stderr is a terminal).
        device: torch device for the encoder and the regressor.
        torch_threads: intra-op threads for torch in this process during the run (None: leave as is);
            1 suits the features MLP, whose batches are small next to the parsing workers' CPU use.
        autocast: 'bf16' or 'fp16' runs the MuseTok encoder in reduced precision on CUDA (faster;
            latents differ slightly, so it is part of the resume fingerprint).
        total_files: rows the source will yield, when known: the progress bar's total (skipped rows count).
        lock: take the output's exclusive lock (`midiva.lock`); False only where the filesystem has
            no working locks and one writer is ensured otherwise.
        lock_label: what this run is (e.g. its Slurm task), shown to a run refused by the lock.
        cpu_threads: BLAS threads in this process, and BLAS/OpenMP/torch threads in each parsing
            worker (0: the libraries' defaults, one per core, which oversubscribes with workers).
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
    parquet: bool = False
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
    """What one `annotate_stream` call did (also written to `<stem>.summary.json`).

    Attributes:
        files_done / files_failed / bars: committed by this run.
        files_skipped_done / _shard / _duplicate: committed earlier, other shards, repeats of an md5.
        complete: the source was read to its end (not stopped by `limit`).
        failures_by_type: error type -> count, this run.
        conversion: ConversionReport totals over this run's annotated files.
        seconds_by_stage: where the time went (worker stages summed over workers).
        total_files / total_bars: everything committed at `out`, all runs together.
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


# ---------------------------------------------------------------- output files and the ledger


def _write_all(handle: BinaryIO, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = handle.write(view)
        view = view[written or 0 :]


def _os_message(err: OSError) -> str:
    return err.strerror or str(err)


_MAX_LOOKUP_BARS = 100_000  # midiva.events.MAX_BARS: every bar_number a file can have


@functools.cache
def _row_pieces() -> tuple[npt.NDArray[np.bytes_], npt.NDArray[np.bytes_]]:
    """b",<bar_number>," for every bar number, and the text of every 4-decimal value in [-1, 1]
    ("-1.0000" .. "1.0000", indexed by 10^4·value + 10^4)."""
    numbers = np.array([f",{i},".encode() for i in range(_MAX_LOOKUP_BARS)])
    values = np.array([f"{k / 1e4:.4f}".encode() for k in range(-10_000, 10_001)])
    return numbers, values


def format_rows(md5: str, predictions: npt.NDArray[np.floating]) -> bytes:
    """CSV rows `md5,bar_number,valence,arousal` of one file, values rounded to 4 decimals.

    The text is that of `f"{round(v, 4):.4f}"` with -0.0 written as 0.0000. Values in [-1, 1]
    (all of them, for a tanh head) are looked up and joined by numpy's string ufuncs instead
    of formatted row by row, which was the main process's largest per-bar cost.
    """
    rounded = np.round(np.asarray(predictions, dtype=np.float64), 4) + 0.0  # +0.0: no "-0.0000"
    steps = np.rint(rounded * 1e4)
    n = len(rounded)
    if (
        0 < n <= _MAX_LOOKUP_BARS and hasattr(np, "strings")  # numpy >= 2
        and np.isfinite(steps).all() and np.abs(steps).max() <= 10_000
    ):  # fmt: skip
        numbers, values = _row_pieces()
        index = steps.astype(np.intp) + 10_000
        text = np.strings.add(np.strings.add(numbers[:n], values[index[:, 0]]), b",")
        lines = np.strings.add(text, values[index[:, 1]]).tolist()
        prefix = md5.encode()
        return prefix + (b"\n" + prefix).join(lines) + b"\n"
    return "".join([f"{md5},{i},{v:.4f},{a:.4f}\n" for i, (v, a) in enumerate(rounded.tolist())]).encode()


class OutputWriter:
    """Appends files' rows to the three tables and commits them through the ledger."""

    def __init__(
        self, paths: OutputPaths, fingerprint: Mapping[str, Any], *, resume: bool = True, commit_interval_s: float = 1.0
    ) -> None:
        self.paths = paths
        self.fingerprint: dict[str, Any] = json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=str))
        self.commit_interval_s = commit_interval_s
        self._handles: list[BinaryIO] = []
        self._stack = ExitStack()
        if paths.csv.is_dir():
            raise OutputError(f"--out {str(paths.csv)!r} is a directory; give a CSV file path such as "
                              f"{str(paths.csv / 'annotations.csv')!r}")
        try:
            paths.csv.parent.mkdir(parents=True, exist_ok=True)
            state = scan_ledger(paths.ledger) if resume and paths.ledger.exists() else None
            if state is None:
                if resume and self._has_rows():
                    raise OutputError(
                        f"{str(paths.csv)!r} holds rows but its ledger {paths.ledger.name!r} is missing or "
                        "unreadable, so which files are complete is unknown; pass --no-resume to start over "
                        "or choose another --out"
                    )
                state = self._start_fresh()
            else:
                self._check_fingerprint(state.fingerprint)
                state.check_last_record(paths.tables)  # before truncating: an edit must not cost the tail
                self._truncate_to(state)
            self.state = state
            # Unbuffered: after a failed write no hidden buffer can reach the file later.
            targets = (*paths.tables, paths.ledger)
            self._handles = [self._stack.enter_context(open(p, "ab", buffering=0)) for p in targets]  # noqa: SIM115
        except OSError as err:
            self.close()
            raise OutputError(
                f"cannot write the outputs at {str(paths.csv)!r}: {_os_message(err)}; choose a writable --out"
            ) from err
        self._ends = list(state.ends)
        self._buffers = [bytearray(), bytearray(), bytearray(), bytearray()]
        self._staged = [0, 0]
        self._last_commit = time.monotonic()

    def _has_rows(self) -> bool:
        return any(p.exists() and p.stat().st_size > len(h) for p, h in zip(self.paths.tables, TABLE_HEADERS, strict=True))

    def _start_fresh(self) -> LedgerState:
        for path, header in zip(self.paths.tables, TABLE_HEADERS, strict=True):
            with open(path, "wb") as handle:
                handle.write(header)
                handle.flush()
                os.fsync(handle.fileno())
        ends = tuple(len(h) for h in TABLE_HEADERS)
        line = LEDGER_MAGIC + json.dumps({"fingerprint": self.fingerprint, "ends": ends}, sort_keys=True).encode() + b"\n"
        with open(self.paths.ledger, "wb") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.paths.summary.unlink(missing_ok=True)
        return LedgerState(self.fingerprint, (ends[0], ends[1], ends[2]), len(line), Md5Set(), Md5Set())

    def _check_fingerprint(self, previous: Mapping[str, Any]) -> None:
        if dict(previous) == self.fingerprint:
            return
        keys = sorted(set(previous) | set(self.fingerprint))
        diffs = [f"{k}: {previous.get(k)!r} then, {self.fingerprint.get(k)!r} now" for k in keys if previous.get(k) != self.fingerprint.get(k)]
        raise ConfigError(
            f"the outputs at {str(self.paths.csv)!r} were written with other settings ({'; '.join(diffs)}); "
            "rerun with the same settings to resume, pass --no-resume to start over, or choose another --out"
        )

    def _truncate_to(self, state: LedgerState) -> None:
        for path, end in (*zip(self.paths.tables, state.ends, strict=True), (self.paths.ledger, state.ledger_bytes)):
            size = path.stat().st_size if path.exists() else -1
            if size < end:
                raise OutputError(
                    f"{str(path)!r} has {max(size, 0)} bytes but its ledger records {end}: the outputs were modified "
                    "or damaged; pass --no-resume to start over, or choose another --out"
                )
            if size > end:
                log.info("resume: dropping %d uncommitted bytes at the end of %s", size - end, path.name)
                with open(path, "r+b") as handle:
                    handle.truncate(end)
                    os.fsync(handle.fileno())

    def _stage(self, md5: str, status: str, n_rows: int, rows: bytes, meta: bytes, failure: bytes) -> None:
        for i, data in enumerate((rows, meta, failure)):
            self._buffers[i] += data
        ends = [self._ends[i] + len(self._buffers[i]) for i in range(3)]
        self._buffers[3] += ledger_line(md5, status, n_rows, ends, (rows, meta, failure), self.state.version)
        self._staged[0] += 1
        self._staged[1] += n_rows if status == "ok" else 0

    def _meta(self, result: FileResult, status: str, n_bars: int) -> bytes:
        values = {**result.meta, **result.info, "md5": result.md5, "status": status, "split": result.split,
                  "name": result.name, "n_bars": n_bars}  # fmt: skip
        return csv_line([values.get(k, "") for k in META_FIELDS])

    def stage_ok(self, result: FileResult, predictions: npt.NDArray[np.floating]) -> None:
        """Queue a file's rows (predictions (n_bars, 2): valence, arousal) for the next commit."""
        n_rows = len(predictions)
        rows = format_rows(result.md5, predictions)
        self._stage(result.md5, "ok", n_rows, rows, self._meta(result, "ok", n_rows), b"")

    def stage_failed(self, result: FileResult) -> None:
        """Queue a failed file (metadata and failure rows) for the next commit."""
        failure = csv_line([result.md5, result.name, result.stage, result.error_type, result.error])
        self._stage(result.md5, "failed", 0, b"", self._meta(result, "failed", 0), failure)

    def maybe_commit(self) -> None:
        """Commit when the interval has passed or the buffers are large."""
        if time.monotonic() - self._last_commit >= self.commit_interval_s or len(self._buffers[0]) > MAX_BUFFER_BYTES:
            self.commit()

    def commit(self) -> None:
        """Write and fsync the staged table bytes, then their ledger records.

        Raises:
            OutputError: a write failed (e.g. disk full); the tables are rolled back to the last commit.
        """
        if not self._buffers[3]:
            return
        path = self.paths.csv
        try:
            targets = (*self.paths.tables, self.paths.ledger)
            for path, handle, buffer in zip(targets, self._handles, self._buffers, strict=True):  # noqa: B007
                if buffer:
                    _write_all(handle, buffer)
                    os.fsync(handle.fileno())
        except OSError as err:
            self._rollback()
            raise OutputError(
                f"cannot write {str(path)!r}: {_os_message(err)}; the {self.state.n_files} files committed before "
                "are intact — free space or fix the disk, then rerun the same command to resume"
            ) from err
        self._ends = [self._ends[i] + len(self._buffers[i]) for i in range(3)]
        self.state.ledger_bytes += len(self._buffers[3])
        self.state.n_files += self._staged[0]
        self.state.n_rows += self._staged[1]
        self.state.complete = False
        self._buffers = [bytearray(), bytearray(), bytearray(), bytearray()]
        self._staged = [0, 0]
        self._last_commit = time.monotonic()

    def _rollback(self) -> None:
        committed = (*self._ends, self.state.ledger_bytes)
        for path, end in zip((*self.paths.tables, self.paths.ledger), committed, strict=True):
            try:
                os.truncate(path, end)
            except OSError as err:  # resume truncates again; nothing committed is lost either way
                log.warning("could not roll %s back to %d bytes: %s", path, end, err)
        self._buffers = [bytearray(), bytearray(), bytearray(), bytearray()]
        self._staged = [0, 0]

    def mark_complete(self) -> None:
        """Record that the source was read to its end (checked by `merge_outputs`)."""
        self.commit()
        if self.state.complete:
            return
        try:
            _write_all(self._handles[3], COMPLETE_LINE)
            os.fsync(self._handles[3].fileno())
        except OSError as err:
            raise OutputError(f"cannot write {str(self.paths.ledger)!r}: {_os_message(err)}; rerun to resume") from err
        self.state.ledger_bytes += len(COMPLETE_LINE)
        self.state.complete = True

    def close(self) -> None:
        """Close the files (staged but uncommitted rows are dropped; a rerun redoes them)."""
        self._stack.close()
        self._handles = []


# ---------------------------------------------------------------- the model side (main process)


def check_backend(regressor: Regressor, backend: str | None) -> str:
    """The backend to run: the model's own; asking for another one is an error.

    Raises:
        ConfigError: `backend` is given and differs from the model's.
    """
    model_backend = str(getattr(regressor, "backend", ""))
    if model_backend not in BACKENDS:
        raise ConfigError(f"the regressor reports backend {model_backend!r}; expected one of {BACKENDS}")
    if backend is not None and backend != model_backend:
        raise ConfigError(
            f"--backend {backend} does not match the model, which was trained on {model_backend!r} bar inputs; "
            f"pass --backend {model_backend}, or a --model trained for {backend!r}"
        )
    return model_backend


@dataclass(frozen=True)
class AnnotationModel:
    """A loaded regressor, the encoder its backend needs, and what identifies them for resume."""

    regressor: Any
    encoder: Any
    backend: str
    device: str
    fingerprint: dict[str, Any]


def load_annotation_model(
    model: Path | str | None = None,
    *,
    backend: str | None = None,
    checkpoint: Path | str | None = None,
    device: str = "auto",
    storage_dir: Path | str | None = None,
) -> AnnotationModel:
    """Load a regressor (None: the bundled default, offline) and, for musetok/hybrid, the encoder.

    Raises:
        CheckpointError: the model or the MuseTok checkpoint is missing or unreadable.
        ConfigError: `backend` differs from the model's, or the device is unusable.
    """
    from midiva.config import sha256_file
    from midiva.model import check_feature_names, default_model_path, load_regressor

    regressor = load_regressor(model)
    check_feature_names(regressor.recipe, model or default_model_path())
    chosen = check_backend(regressor, backend)
    fingerprint: dict[str, Any] = {"model_sha256": sha256_file(model or default_model_path())}
    encoder, run_device = None, "cpu"  # the features MLP is tiny: CPU beats a transfer to the GPU
    if chosen != "features" or device != "auto":
        from midiva.latents import default_checkpoint_path, load_encoder, resolve_device

        run_device = str(resolve_device(device))
    if chosen != "features":
        path = Path(checkpoint) if checkpoint else default_checkpoint_path(storage_dir)
        encoder = load_encoder(path, device=run_device)
        fingerprint["checkpoint_sha256"] = sha256_file(path)
    return AnnotationModel(regressor, encoder, chosen, run_device, fingerprint)


class _Predictor:
    """Files in, (file, predictions) out, in order: the encoder runs over many files' bars at once,
    inputs are built per piece, and the regressor always sees exactly `batch_size` rows.

    BLAS sums differently for different row counts (~1e-7): with one shape for every call, a bar's
    values do not depend on which files shared its batch, so a resumed run writes the same digits
    as an uninterrupted one. Rows left over carry into the next call; only the last is padded.
    """

    def __init__(self, regressor: Regressor, encoder: Any, encode_fn: Callable[..., Any] | None, options: AnnotateOptions) -> None:
        self.regressor, self.encoder, self.encode_fn, self.options = regressor, encoder, encode_fn, options
        self.backend = check_backend(regressor, None)
        self.needs_latents = self.backend in ("musetok", "hybrid")
        self.needs_features = self.backend in ("features", "hybrid")
        if self.needs_latents and encoder is None:
            raise ConfigError(f"the {self.backend!r} backend needs the MuseTok encoder; pass --checkpoint")
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self._files: deque[FileResult] = deque()
        self._rows: list[npt.NDArray[np.float32]] = []
        self._preds: list[npt.NDArray[np.float32]] = []
        self._n_rows = 0
        self._domain: Callable[[npt.NDArray[np.float32]], float | None] | None = getattr(regressor, "domain_distance", None)

    def add(self, files: list[FileResult]) -> None:
        """Queue files in order (failed ones pass through); predicts every full batch of rows."""
        latents: npt.NDArray[np.float32] | None = None
        ok = [f for f in files if f.ok]
        if self.needs_latents and ok:
            t0 = time.perf_counter()
            encode = self.encode_fn or _default_encode()
            tokens = [bar for f in ok for bar in (f.token_ids or [])]
            extra = {"autocast": self.options.autocast} if self.options.autocast else {}
            encoded = encode(self.encoder, tokens, batch_size=self.options.batch_size, device=self.options.device, **extra)
            latents = np.asarray(encoded.latents, dtype=np.float32)
            self.seconds["encode"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        offset = 0
        for f in files:
            if f.ok:
                piece_latents = None if latents is None else latents[offset : offset + f.n_bars]
                offset += f.n_bars
                try:  # context blocks (piece mean, windows) make inputs a per-piece computation
                    inputs = np.asarray(self.regressor.make_inputs(f.features, piece_latents), np.float32)
                    if inputs.ndim != 2 or len(inputs) != f.n_bars:
                        raise DataError(f"{f.name!r}: the model built {inputs.shape} inputs for {f.n_bars} bars")
                except MidivaError as err:
                    if self.options.strict:
                        raise
                    f = _failed(f, "inputs", err)
                else:
                    self._rows.append(inputs)
                    self._n_rows += len(inputs)
                    if self._domain is not None and len(inputs):
                        distance = self._domain(inputs)
                        if distance is None:  # the model cannot say: say so once per run, not per file
                            log.warning("the model's metadata has no training-domain reference; the domain_distance "
                                        "column stays empty (retrain the model with this midiva version to get it)")
                            self._domain = None
                        else:
                            f.info["domain_distance"] = f"{distance:.4f}"
            self._files.append(f)
        batch = self.options.batch_size
        while self._n_rows >= batch:
            self._run(batch)
        self.seconds["predict"] += time.perf_counter() - t0

    def _run(self, n: int) -> None:
        joined = np.concatenate(self._rows) if len(self._rows) > 1 else self._rows[0]
        self._rows = [joined[n:]] if len(joined) > n else []
        self._n_rows -= n
        batch = self.options.batch_size
        chunk = joined[:n] if n == batch else np.concatenate([joined[:n], np.zeros((batch - n, joined.shape[1]), np.float32)])
        preds = np.asarray(self.regressor.predict(chunk, batch_size=batch, device=self.options.device), np.float32)
        if preds.shape != (batch, 2):
            raise DataError(f"the regressor returned shape {preds.shape} for {batch} rows; expected ({batch}, 2)")
        self._preds.append(preds[:n])

    def ready(self, final: bool = False) -> Iterator[tuple[FileResult, npt.NDArray[np.float32]]]:
        """Files whose predictions are complete, in order; `final` predicts the last partial batch."""
        if final and self._n_rows:
            t0 = time.perf_counter()
            self._run(self._n_rows)
            self.seconds["predict"] += time.perf_counter() - t0
        preds = np.concatenate(self._preds) if self._preds else np.zeros((0, 2), np.float32)
        offset = 0
        while self._files and (not self._files[0].ok or self._files[0].n_bars <= len(preds) - offset):
            f = self._files.popleft()
            n = f.n_bars if f.ok else 0
            yield f, preds[offset : offset + n]
            offset += n
        self._preds = [preds[offset:]] if offset < len(preds) else []


def _default_encode() -> Callable[..., Any]:
    from midiva.latents import encode_bars

    return encode_bars


def _failed(f: FileResult, stage: str, err: BaseException) -> FileResult:
    return FileResult(f.md5, f.name, f.split, f.meta, stage=stage, error_type=type(err).__name__, error=str(err))


# ---------------------------------------------------------------- the run


def _select(
    rows: Iterable[SourceRow], state: LedgerState, options: AnnotateOptions, counts: Counter[str]
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


def _progress_bar(options: AnnotateOptions) -> Any:
    from tqdm import tqdm

    disable = not options.progress or not sys.stderr.isatty()
    desc = "annotate" if options.total_files is not None else "annotate (unknown total)"
    return tqdm(total=options.total_files, unit="file", desc=desc, file=sys.stderr, disable=disable, dynamic_ncols=True)


def annotate_stream(
    rows: Iterable[SourceRow],
    out: Path | str,
    regressor: Regressor,
    *,
    encoder: Any = None,
    options: AnnotateOptions | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    prepare: PrepareFn | None = None,
    encode_fn: Callable[..., Any] | None = None,
    lock: OutputLock | None = None,
    stop: Callable[[], bool] | None = None,
    skip_unread: SkipUnread | None = None,
) -> RunSummary:
    """Annotate every bar of every row into the CSV at `out`, resumably and exactly once.

    Args:
        rows: files to annotate (see `midiva.sources`), in a stable order.
        out: the annotations CSV; the other tables are written beside it.
        regressor: `.backend`, `.make_inputs(features, latents)`, `.predict(inputs, batch_size=, device=)`.
        encoder: the MuseTok encoder (musetok/hybrid backends), called through `encode_fn`.
        fingerprint: identifies the model; a resume with a different one raises ConfigError.
        prepare: per-file parser (default `midiva.sources.prepare_file`).
        lock: the output's lock, already acquired by the caller (default: acquired and released here).
        stop: polled between files; once True, the files parsed so far are committed and the run
            returns early (`complete` False) — how a signal stops a run cleanly.
        skip_unread: the hook the source of `rows` was built with; set here to what this run skips
            (other shards, committed files), so the source need not read or hash their bytes.

    Raises:
        OutputError: the outputs cannot be written (read-only, full disk); committed rows stay intact.
        OutputLockedError: another live process writes `out`.
        ConfigError: resuming outputs made with another model/options.
    """
    options = options or AnnotateOptions()
    if not 0 <= options.shard_index < options.num_shards:
        raise ConfigError(f"shard index {options.shard_index} must be in [0, {options.num_shards})")
    predictor = _Predictor(regressor, encoder, encode_fn, options)
    full_fingerprint = {"backend": predictor.backend, "include_drums": options.include_drums,
                        "num_shards": options.num_shards, "shard_index": options.shard_index, **(fingerprint or {})}  # fmt: skip
    if options.autocast and predictor.needs_latents:
        full_fingerprint["autocast"] = options.autocast
    paths = output_paths(out)
    own_lock = lock is None
    if lock is None:
        lock = acquire_output_lock(paths.csv, label=options.lock_label, enabled=options.lock)
    elif lock.target.resolve() != paths.csv.resolve():
        raise ConfigError(f"the lock passed is for {str(lock.target)!r}, not for {str(paths.csv)!r}")
    try:
        writer = OutputWriter(paths, full_fingerprint, resume=options.resume, commit_interval_s=options.commit_interval_s)
    except BaseException:
        if own_lock:
            lock.release()
        raise
    if skip_unread is not None:
        state = writer.state
        skip_unread.test = lambda md5: (
            options.num_shards > 1 and shard_of(md5, options.num_shards) != options.shard_index
        ) or state.is_done(md5, options.retry_failures)  # exactly what `_select` skips before the claim check
    counts: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    conversion: Counter[str] = Counter()
    seconds: defaultdict[str, float] = defaultdict(float)
    parse = PrepareOptions(options.include_drums, predictor.needs_features, predictor.needs_latents)
    start = time.perf_counter()
    bar = _progress_bar(options)
    pending: list[FileResult] = []

    def flush(final: bool = False) -> None:
        predictor.add(pending)
        pending.clear()
        t0 = time.perf_counter()
        staged = 0
        for f, preds in predictor.ready(final):
            staged += 1
            for stage, spent in f.seconds.items():
                seconds[stage] += spent
            if f.ok:
                writer.stage_ok(f, preds)
                counts["done"] += 1
                counts["bars"] += f.n_bars
                conversion.update({k: v for k, v in f.info.items() if k in REPORT_FIELDS})
            else:
                writer.stage_failed(f)
                counts["failed"] += 1
                failures[f.error_type] += 1
                log.info("failed %s at %s: %s: %s", f.name, f.stage, f.error_type, f.error)
        writer.maybe_commit()
        seconds["write"] += time.perf_counter() - t0
        skipped = counts["skipped_done"] + counts["skipped_shard"] + counts["skipped_duplicate"]
        bar.update(staged + skipped - counts["skipped_shown"])  # skipped rows count towards the total
        counts["skipped_shown"] = skipped
        rate = counts["bars"] / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(bars_s=f"{rate:.0f}", failed=counts["failed"], refresh=False)

    previous_threads = _set_torch_threads(options.torch_threads)
    blas_limit = limit_threads(options.cpu_threads, blas_only=True)
    try:
        selected = _select(rows, writer.state, options, counts)
        pending_bars = 0
        num_workers = 0 if options.strict else options.num_workers
        results = parse_in_order(selected, prepare or prepare_file, parse, num_workers, options.strict,
                                 threads=options.cpu_threads)  # fmt: skip
        for result in results:
            if stop is not None and stop():  # in-flight files are dropped; the next run redoes them
                counts["stopped"] = 1
                log.info("stop requested: committing the files parsed so far")
                if hasattr(results, "close"):
                    results.close()  # ends the worker pool now
                break
            pending.append(result)
            pending_bars += result.n_bars
            if pending_bars >= options.batch_size or len(pending) >= 4096:
                flush()
                pending_bars = 0
        flush(final=True)
        complete = not (counts["limited"] or counts["stopped"])
        t0 = time.perf_counter()
        writer.commit()
        if complete:
            writer.mark_complete()
        seconds["write"] += time.perf_counter() - t0
    except (MidivaError, KeyboardInterrupt) as err:
        if not isinstance(err, OutputError):  # e.g. the hub stream broke: keep what is finished
            with suppress(MidivaError):
                if isinstance(err, (SourceError, KeyboardInterrupt)):
                    flush(final=True)
                writer.commit()
        raise
    finally:
        bar.close()
        writer.close()
        if own_lock:
            lock.release()
        _set_torch_threads(previous_threads)
        if blas_limit is not None:
            blas_limit.restore_original_limits()
    if options.parquet:
        export_parquet(paths)
    elapsed = time.perf_counter() - start
    n_files = counts["done"] + counts["failed"]
    summary = RunSummary(
        out=str(paths.csv), files_done=counts["done"], files_failed=counts["failed"],
        files_skipped_done=counts["skipped_done"], files_skipped_shard=counts["skipped_shard"],
        files_skipped_duplicate=counts["skipped_duplicate"], bars=counts["bars"], complete=complete,
        elapsed_s=round(elapsed, 3), files_per_s=round(n_files / max(elapsed, 1e-9), 2),
        bars_per_s=round(counts["bars"] / max(elapsed, 1e-9), 1), failures_by_type=dict(failures),
        conversion=dict(conversion), seconds_by_stage={k: round(v, 3) for k, v in (*seconds.items(), *predictor.seconds.items())},
        total_files=writer.state.n_files, total_bars=writer.state.n_rows,
    )  # fmt: skip
    _write_json(paths.summary, summary.to_json())
    log.info(
        "annotated %d files (%d bars), %d failed; skipped %d done, %d other shards, %d duplicates; %.1f s",
        summary.files_done, summary.bars, summary.files_failed, summary.files_skipped_done,
        summary.files_skipped_shard, summary.files_skipped_duplicate, summary.elapsed_s,
    )  # fmt: skip
    return summary


def _write_json(path: Path, record: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(f"cannot write {str(path)!r}: {_os_message(err)}; the annotations are intact") from err


# ---------------------------------------------------------------- merging shards


@dataclass(frozen=True)
class MergeReport:
    """What `merge_outputs` combined."""

    out: str
    inputs: int
    files: int
    failed: int
    bars: int
    complete: bool


def merge_outputs(inputs: Sequence[Path | str], out: Path | str, *, allow_incomplete: bool = False) -> MergeReport:
    """Combine shard outputs into one, checking completeness and uniqueness.

    Checks: same model and options; with sharded runs, every shard index exactly once; each run
    read its source to the end; no md5 in two inputs; each ledger md5 has rows 0..n-1, contiguous.

    Raises:
        DataError: any check fails (nothing is written then).
        OutputError: the merged files cannot be written.
    """
    parts = [output_paths(p) for p in inputs]
    target = output_paths(out)
    if any(p.csv.resolve() == target.csv.resolve() for p in parts):
        raise DataError(f"--out {str(target.csv)!r} is also an input; choose another output path")
    seen_paths: dict[Path, Path] = {}
    for part in parts:
        first = seen_paths.setdefault(part.csv.resolve(), part.csv)
        if first is not part.csv:
            also = "" if str(first) == str(part.csv) else f" (also as {str(first)!r})"
            raise DataError(f"{str(part.csv)!r} is given twice{also}; give each shard once")
        holder, _ = read_holder(part.csv)
        if holder is not None and holder.is_alive_here() is not False:
            raise DataError(f"{str(part.csv)!r} is being written by {holder.describe()}; merge once it has finished "
                            f"(if that process is gone, delete {lock_path_for(part.csv).name!r} beside it)")  # fmt: skip
    headers = []
    for part in parts:
        if not part.ledger.is_file():
            raise DataError(f"{str(part.csv)!r} has no ledger {part.ledger.name!r}; is it a `midiva annotate` output?")
        with open(part.ledger, "rb") as handle:
            header = read_ledger_header(handle)
        if header is None:
            raise DataError(f"{str(part.ledger)!r} is not a midiva ledger")
        headers.append(header)
    common = [{k: v for k, v in h[0].items() if k != "shard_index"} for h in headers]
    _check_shard_set(parts, [h[0] for h in headers], common)
    # Pass 1: uniqueness across inputs and completion, on sorted md5 keys (16 bytes per file);
    # `repeats` counts retried md5s (failed, then again).
    repeats, complete = Counter[str](), True
    keys: list[npt.NDArray[np.uint64]] = []
    for part, header in zip(parts, headers, strict=True):
        part_keys, part_complete = _ledger_keys(part, header[1], repeats)
        if not (part_complete or allow_incomplete):
            raise DataError(
                f"{str(part.csv)!r} is incomplete (its run stopped early); resume it with the same command, "
                "or pass --allow-incomplete"
            )
        complete &= part_complete
        keys.append(part_keys)
    _check_disjoint(parts, keys)
    # Pass 2: copy each committed file's bytes, checking its rows; write the merged ledger.
    tmp = [p.with_name(p.name + ".tmp") for p in (*target.tables, target.ledger)]
    ends = [len(h) for h in TABLE_HEADERS]
    totals = Counter[str]()
    try:
        target.csv.parent.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            sinks: list[BinaryIO] = [stack.enter_context(open(p, "wb")) for p in tmp]
            for sink, header_bytes in zip(sinks[:3], TABLE_HEADERS, strict=True):
                sink.write(header_bytes)
            fingerprint = {**common[0], "num_shards": 1, "shard_index": 0}
            sinks[3].write(LEDGER_MAGIC + json.dumps({"fingerprint": fingerprint, "ends": ends}, sort_keys=True).encode() + b"\n")
            for part, header in zip(parts, headers, strict=True):
                _copy_part(part, header[1], sinks, ends, repeats, totals)
            if complete:
                sinks[3].write(COMPLETE_LINE)
            for sink in sinks:
                sink.flush()
                os.fsync(sink.fileno())
        for src, dst in zip(tmp, (*target.tables, target.ledger), strict=True):
            os.replace(src, dst)
    except OSError as err:
        raise OutputError(f"cannot write the merged output {str(target.csv)!r}: {_os_message(err)}") from err
    finally:
        for path in tmp:
            with suppress(OSError):  # cleanup must not hide the OutputError above
                path.unlink(missing_ok=True)
    return MergeReport(str(target.csv), len(parts), totals["ok"], totals["failed"], totals["rows"], complete)


def _sorted_keys(md5s: list[str]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
    """md5s as sorted (n, 2) uint64 keys, and where each key equals the one before it."""
    pairs = Md5Set.pairs(md5s) if md5s else np.zeros((0, 2), np.uint64)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    same = np.zeros(len(pairs), bool)
    same[1:] = (pairs[1:] == pairs[:-1]).all(axis=1)
    return pairs, same


def _ledger_keys(part: OutputPaths, ends: tuple[int, int, int], repeats: Counter[str]) -> tuple[npt.NDArray[np.uint64], bool]:
    """An input's distinct md5 keys (sorted) and whether its run completed; counts retried md5s in `repeats`."""
    md5s: list[str] = []
    complete = False
    with open(part.ledger, "rb") as handle:
        header = read_ledger_header(handle)
        for entry, _ in iter_ledger(handle, ends, header[2] if header else LEDGER_VERSION):
            complete = entry is None
            if entry is not None:
                md5s.append(entry.md5)
    pairs, same = _sorted_keys(md5s)
    if same.any():  # rare: files retried after failing; check that at most one attempt succeeded
        repeated = {f"{int(hi):016x}{int(lo):016x}" for hi, lo in pairs[same]}
        statuses: defaultdict[str, list[str]] = defaultdict(list)
        for entry in ledger_entries(part.ledger, ends):
            if entry.md5 in repeated:
                statuses[entry.md5].append(entry.status)
        for md5, seen in statuses.items():
            if "ok" in seen[:-1]:  # only failed attempts are ever retried
                raise DataError(f"md5 {md5} is committed twice in {str(part.csv)!r}; the output is damaged")
            repeats[md5] += len(seen) - 1
    return pairs[~same], complete


def _check_disjoint(parts: list[OutputPaths], keys: list[npt.NDArray[np.uint64]]) -> None:
    """No md5 in two inputs."""
    joined = np.concatenate(keys) if keys else np.zeros((0, 2), np.uint64)
    owner = np.repeat(np.arange(len(keys)), [len(k) for k in keys])
    order = np.lexsort((owner, joined[:, 1], joined[:, 0]))
    joined, owner = joined[order], owner[order]
    clash = np.flatnonzero((joined[1:] == joined[:-1]).all(axis=1))
    if len(clash):
        i = int(clash[np.argmin(owner[clash + 1])])  # name the earliest input that overlaps another
        md5 = f"{int(joined[i, 0]):016x}{int(joined[i, 1]):016x}"
        raise DataError(f"md5 {md5} of {str(parts[owner[i + 1]].csv)!r} also appears in an earlier input "
                        f"({str(parts[owner[i]].csv)!r}); the inputs overlap — merge disjoint runs or shards")  # fmt: skip


def _check_shard_set(parts: list[OutputPaths], fingerprints: list[dict[str, Any]], common: list[dict[str, Any]]) -> None:
    """Same model and settings everywhere; with shards, each index once and one directory per shard."""
    for part, fp in zip(parts, common, strict=True):
        if fp != common[0]:
            diffs = [f"{k}: {common[0].get(k)!r} vs {fp.get(k)!r}" for k in sorted(set(fp) | set(common[0]))
                     if fp.get(k) != common[0].get(k)]  # fmt: skip
            raise DataError(f"{str(part.csv)!r} was annotated with other settings than {str(parts[0].csv)!r} "
                            f"({'; '.join(diffs)}); merge only shards of one run")  # fmt: skip
    num_shards = int(common[0].get("num_shards", 1))
    if num_shards <= 1:
        return
    holders: dict[int, list[Path]] = defaultdict(list)
    for part, fp in zip(parts, fingerprints, strict=True):
        holders[int(fp["shard_index"])].append(part.csv)
    twice = sorted(i for i, paths in holders.items() if len(paths) > 1)
    if twice:
        named = "; ".join(f"shard {i} in {', '.join(repr(str(p)) for p in holders[i])}" for i in twice)
        raise DataError(f"shards of a {num_shards}-shard run given twice {twice}: {named}; give each shard once")
    missing = sorted(set(range(num_shards)) - set(holders))
    if missing:
        raise DataError(f"shards of a {num_shards}-shard run: missing {missing} (given {sorted(holders)}); "
                        "annotate the missing shards (their --shard-index) and merge all of them")  # fmt: skip
    by_dir: dict[Path, tuple[int, Path]] = {}
    for i, (path,) in sorted(holders.items()):
        other = by_dir.setdefault(path.parent.resolve(), (i, path))
        if other[1] is not path:
            raise DataError(
                f"shards {other[0]} ({str(other[1])!r}) and {i} ({str(path)!r}) share the directory "
                f"{str(path.parent)!r}, so their run.json (provenance) is one array task's only; give each "
                "task its own directory (--out giga/shard-$SLURM_ARRAY_TASK_ID/annotations.csv) and rerun one of them"
            )


MERGE_BLOCK_BYTES = 4 << 20  # CSV bytes read, checked and written at once: bounds merge's memory


def _copy_part(
    part: OutputPaths, header_ends: tuple[int, int, int], sinks: list[BinaryIO], ends: list[int],
    repeats: Counter[str], totals: Counter[str],
) -> None:  # fmt: skip
    """Append one input's committed files to the sinks, in blocks of whole files (rows checked per block)."""
    with ExitStack() as stack:
        sources: list[BinaryIO] = [stack.enter_context(open(p, "rb")) for p in part.tables]
        for source, start in zip(sources, header_ends, strict=True):
            source.seek(start)
        block: list[LedgerEntry] = []
        block_start = header_ends
        for entry in ledger_entries(part.ledger, header_ends):
            block.append(entry)
            if entry.ends[0] - block_start[0] >= MERGE_BLOCK_BYTES or len(block) >= 1 << 16:
                _copy_block(part, block, block_start, sources, sinks, ends, repeats, totals)
                block_start, block = entry.ends, []
        if block:
            _copy_block(part, block, block_start, sources, sinks, ends, repeats, totals)


def _copy_block(
    part: OutputPaths, block: list[LedgerEntry], start: tuple[int, int, int], sources: list[BinaryIO],
    sinks: list[BinaryIO], ends: list[int], repeats: Counter[str], totals: Counter[str],
) -> None:  # fmt: skip
    sizes = [e - s for e, s in zip(block[-1].ends, start, strict=True)]
    chunks = [src.read(n) for src, n in zip(sources, sizes, strict=True)]
    if [len(c) for c in chunks] != sizes:
        raise DataError(f"{part.csv} is shorter than its ledger records; the output is damaged")
    bounds = np.array([start, *(e.ends for e in block)], np.int64) - np.array(start, np.int64)  # (n+1, 3)
    if not _rows_look_right(chunks[0], block, bounds[:, 0]):
        for k, entry in enumerate(block):  # find the culprit, for check_rows' message
            check_rows(chunks[0][bounds[k, 0] : bounds[k + 1, 0]], entry, part.csv)
    records: list[bytes] = []
    keep_from = 0
    for k, entry in enumerate(block):
        own = [chunks[i][bounds[k, i] : bounds[k + 1, i]] for i in range(3)]
        if entry.data_crc is not None and table_crc(own) != entry.data_crc:
            raise DataError(f"{part.csv}: the table rows of md5 {entry.md5} differ from what was committed "
                            "(checksum); the output was edited or damaged — rerun that shard with --no-resume")  # fmt: skip
        if repeats[entry.md5] > 0:  # an earlier attempt of a retried file: superseded
            repeats[entry.md5] -= 1
            for i in range(3):
                sinks[i].write(memoryview(chunks[i])[bounds[keep_from, i] : bounds[k, i]])
            keep_from = k + 1
            continue
        for i in range(3):
            ends[i] += int(bounds[k + 1, i] - bounds[k, i])
        records.append(ledger_line(entry.md5, entry.status, entry.n_rows, ends, own, LEDGER_VERSION))
        totals[entry.status] += 1
        totals["rows"] += entry.n_rows
    for i in range(3):
        sinks[i].write(memoryview(chunks[i])[bounds[keep_from, i] :])
    sinks[3].write(b"".join(records))


def _rows_look_right(data: bytes, block: list[LedgerEntry], offsets: npt.NDArray[np.int64]) -> bool:
    """Vectorised `check_rows` over a block of files: each file's bytes are its n_rows lines
    `md5,bar_number,v,a` with bar_numbers 0..n-1 in order. False means: find the culprit with check_rows."""
    arr = np.frombuffer(data, np.uint8)
    n_rows = np.array([e.n_rows for e in block], np.int64)
    newlines = np.flatnonzero(arr == 10)
    total = int(n_rows.sum())
    if len(newlines) != total:
        return False
    if total == 0:
        return len(arr) == 0
    # Each file's bytes end exactly after its last row.
    per_file = np.searchsorted(newlines, offsets[1:], "left") - np.searchsorted(newlines, offsets[:-1], "left")
    if not np.array_equal(per_file, n_rows) or newlines[-1] != len(arr) - 1:
        return False
    line_start = np.concatenate([[0], newlines[:-1] + 1])
    file_of_line = np.repeat(np.arange(len(block)), n_rows)
    bar = np.arange(total) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
    width = np.searchsorted(10 ** np.arange(1, 19), bar, "right") + 1  # digits of each bar_number
    if np.any(line_start + 33 + width + 1 >= newlines + 1):  # too short for md5,bar,...
        return False
    md5s = np.frombuffer(b"".join(e.md5.encode() + b"," for e in block), np.uint8).reshape(len(block), 33)
    for j in range(33):  # column by column: temporaries of one value per line, not 33
        if not np.array_equal(arr[line_start + j], md5s[file_of_line, j]):
            return False
    value = np.zeros(total, np.int64)
    for j in range(int(width.max())):
        digit = arr[np.minimum(line_start + 33 + j, len(arr) - 1)].astype(np.int64) - 48
        inside = j < width
        if np.any(inside & ((digit < 0) | (digit > 9))):
            return False
        value = np.where(inside, value * 10 + digit, value)
    if not np.array_equal(value, bar) or np.any(arr[line_start + 33 + width] != 44):
        return False
    return bool(np.all(np.add.reduceat(arr == 44, line_start, dtype=np.int32) == 3))

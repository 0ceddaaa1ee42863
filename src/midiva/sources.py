"""Stage 7a: where annotation reads its MIDI files from, one code path per kind of source.

Input: the Hugging Face hub data set `Metacreation/GigaMIDI` (gated), local parquet files with
GigaMIDI's columns (read through the same `datasets` streaming path), or MIDI files and
directories. Output: `SourceRow`s — the md5 key (GigaMIDI's: the md5 of the file's bytes),
the raw bytes, the split and the metadata the analysis step groups by. Nothing is parsed here.

Sharding is deterministic by md5: a file belongs to shard `int(md5[:8], 16) % num_shards`.
Parsing (`parse_in_order`) runs in worker processes: MIDI bytes -> bars -> per-bar features
(float32, (n_bars, n_features)) and/or MuseTok token ids, returned in input order.
The read side of annotation's outputs lives here too: their layout, the ledger, whose committed
md5s (16 bytes each in `Md5Set`) decide which rows a resumed run skips, the row check used by
`midiva merge`, and the Parquet export of the committed tables.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from midiva.errors import DataError, EmptyScoreError, MidivaError, OutputError, SourceError
from midiva.midi import MAX_MIDI_BYTES

log = logging.getLogger(__name__)

HUB_DATASET = "Metacreation/GigaMIDI"
DEFAULT_HUB_CONFIG = "v1.0.0"
# v1.0.0 is the original release; the extended release (about 2.1 M files) is published as
# v2.0.0 (earlier revisions of the data set card named it v1.1.0). Any config name is passed on.
KNOWN_HUB_CONFIGS = ("v1.0.0", "v1.1.0", "v2.0.0")
HUB_SPLITS = ("train", "validation", "test")
MIDI_SUFFIXES = (".mid", ".midi", ".kar", ".smf")
CHUNK_FILES = 8  # files per worker task: amortises inter-process overhead, keeps latency low
ACCESS_HELP = (
    "GigaMIDI is gated: log in at https://huggingface.co/datasets/Metacreation/GigaMIDI, accept its "
    "conditions, then pass a token with read access via --hf-token, the HF_TOKEN environment "
    "variable or `huggingface-cli login`"
)

# GigaMIDI columns carried into the metadata table (list-valued ones are joined with '|').
LIST_SEPARATOR = "|"
GENRE_COLUMNS = (
    "music_styles_curated",
    "music_style_scraped",
    "music_style_audio_text_Discogs",
    "music_style_audio_text_Lastfm",
    "music_style_audio_text_Tagtraum",
)
INSTRUMENT_CATEGORY_COLUMN = "instrument_category__drums-only__0__all-instruments-with-drums__1_no-drums__2"
META_SOURCE_COLUMNS = ("title", "artist", *GENRE_COLUMNS, "num_tracks", "NOMML", "tempo")

_MD5_RE = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class SourceRow:
    """One file to annotate, before any parsing.

    Attributes:
        md5: hex md5 of the file's bytes (the key of every output table).
        name: display name (file path, or the title / md5 for data set rows).
        split: data set split ('' for files).
        music: the raw MIDI bytes, or None when they could not be read.
        meta: metadata columns for the metadata table (title, artist, genre fields, ...).
        error_type: set when the row is already known to fail (e.g. missing bytes).
        error: the message for that failure.
    """

    md5: str
    name: str
    split: str = ""
    music: bytes | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    error_type: str | None = None
    error: str | None = None


def shard_of(md5: str, num_shards: int) -> int:
    """The shard a file belongs to: `int(md5[:8], 16) % num_shards` (stable across runs and machines)."""
    return int(md5[:8], 16) % num_shards


def normalize_md5(value: object) -> str | None:
    """Lower-case 32-digit hex md5, or None when `value` is not one."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    return text if _MD5_RE.fullmatch(text) else None


def _text(value: object) -> str:
    """A metadata value as one CSV cell: lists joined with '|' (the analysis stage splits on it), None as ''."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return LIST_SEPARATOR.join(_text(v) for v in value)
    return str(value)


def row_from_record(record: Mapping[str, Any], *, split: str, index: int, origin: str) -> SourceRow:
    """Turn one GigaMIDI record (hub or parquet) into a SourceRow; never raises for bad content."""
    music = record.get("music")
    if isinstance(music, (bytearray, memoryview)):
        music = bytes(music)
    if isinstance(music, dict):  # `datasets` may hand binary columns over as {'bytes': ...}
        music = music.get("bytes")
    md5 = normalize_md5(record.get("md5"))
    if md5 is None and isinstance(music, bytes):
        md5 = hashlib.md5(music).hexdigest()
    label = f"{origin}[{split or 'row'} #{index}]"
    meta = {key: _text(record.get(key)) for key in META_SOURCE_COLUMNS}
    meta["instrument_category"] = _text(record.get(INSTRUMENT_CATEGORY_COLUMN))
    split = _text(record.get("split")) or split
    if md5 is None:  # neither a usable md5 nor bytes: key the failure by the row's position
        md5 = hashlib.md5(label.encode()).hexdigest()
    name = meta["title"] or md5
    if not isinstance(music, bytes) or not music:
        kind = "no" if music is None else "empty" if isinstance(music, bytes) else f"non-bytes ({type(music).__name__})"
        return SourceRow(
            md5, name, split, None, meta, "DataError",
            f"{label} (md5 {md5}) has {kind} 'music' bytes; recorded as failed, the run goes on",
        )
    return SourceRow(md5, name, split, music, meta)


# ---------------------------------------------------------------- files and directories


def list_midi_files(inputs: Sequence[Path | str]) -> list[Path]:
    """Expand files and directories (recursively, sorted) into MIDI file paths, in input order.

    Raises:
        SourceError: an input does not exist, or a directory holds no MIDI files.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file())
            if not files:
                raise SourceError(f"directory {str(path)!r} holds no MIDI files ({', '.join(MIDI_SUFFIXES)})")
            found.extend(files)
        elif path.exists():
            found.append(path)
        else:
            raise SourceError(f"input {str(path)!r} does not exist; pass MIDI files or directories")
    return found


def _md5_of_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def iter_files(paths: Iterable[Path]) -> Iterator[SourceRow]:
    """Read MIDI files into SourceRows (md5 of the bytes, as GigaMIDI computes it).

    Unreadable or oversized files become rows with an error, so the batch records them and goes on.
    """
    for path in paths:
        name = str(path)
        try:
            size = path.stat().st_size
            if size > MAX_MIDI_BYTES:
                yield SourceRow(
                    _md5_of_file(path), name, "", None, {"title": path.stem}, "MidiReadError",
                    f"{name!r} is {size / 2**20:.1f} MiB, above the {MAX_MIDI_BYTES // 2**20} MiB limit "
                    "for one MIDI file; skipped",
                )
                continue
            data = path.read_bytes()
        except OSError as err:
            # No bytes, so no content md5: the failure is keyed by the md5 of the path instead.
            yield SourceRow(
                hashlib.md5(name.encode()).hexdigest(), name, "", None, {"title": path.stem},
                "MidiReadError", f"cannot read {name!r}: {err.strerror or err}; skipped",
            )
            continue
        yield SourceRow(hashlib.md5(data).hexdigest(), name, "", data, {"title": path.stem})


# ---------------------------------------------------------------- parquet and the hub


def _split_from_path(path: Path) -> str:
    for part in reversed(path.with_suffix("").parts):
        for split in HUB_SPLITS:
            if part == split or part.startswith(f"{split}-") or part.startswith(f"{split}_"):
                return split
    return "train"


def parquet_files_by_split(path: Path | str) -> dict[str, list[str]]:
    """Group a parquet file or a directory of them by split (from names like `train/…`, `test.parquet`).

    Raises:
        SourceError: the path is missing or holds no parquet files.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    elif path.is_file():
        files = [path]
    else:
        raise SourceError(f"{str(path)!r} is neither a parquet file, a directory, nor a hub data set name")
    if not files:
        raise SourceError(f"directory {str(path)!r} holds no .parquet files")
    groups: dict[str, list[str]] = {}
    for file in files:
        groups.setdefault(_split_from_path(file.relative_to(path) if path.is_dir() else Path(file.name)), []).append(str(file))
    return groups


def _is_access_error(err: BaseException) -> bool:
    """True for the ways `datasets`/`huggingface_hub` report a gated, unauthorised or forbidden repo."""
    names = {type(e).__name__ for e in _chain(err)}
    if names & {"GatedRepoError", "LocalTokenNotFoundError"}:
        return True
    for e in _chain(err):
        response = getattr(e, "response", None)
        if getattr(response, "status_code", None) in (401, 403):
            return True
        text = str(e).lower()
        if "gated" in text or "401" in text or "403" in text or "unauthorized" in text or "authenticated" in text:
            return True
    return False


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def hub_error(err: BaseException, dataset: str, config: str) -> SourceError:
    """Map an error from `datasets` / `huggingface_hub` to a SourceError that says what to do."""
    if _is_access_error(err):
        return SourceError(f"access to {dataset!r} (config {config!r}) was denied: {err}. {ACCESS_HELP}")
    names = {type(e).__name__ for e in _chain(err)}
    if names & {"ConnectionError", "ConnectTimeout", "ReadTimeout", "OfflineModeIsEnabled", "MaxRetryError"}:
        return SourceError(
            f"cannot reach the Hugging Face hub for {dataset!r}: {err}. Check the network, or download the "
            "parquet files once and pass their directory to --dataset"
        )
    if "config" in str(err).lower() or "builderconfig" in str(err).lower():
        return SourceError(
            f"{dataset!r} has no config {config!r} ({err}); known GigaMIDI configs: {', '.join(KNOWN_HUB_CONFIGS)}"
        )
    return SourceError(f"reading {dataset!r} (config {config!r}) failed: {type(err).__name__}: {err}")


def _iter_records(
    open_split: Any, splits: Sequence[str], *, origin: str, config: str
) -> Iterator[SourceRow]:
    """The one iteration path shared by hub and parquet sources (errors mapped to SourceError)."""
    for split in splits:
        try:
            dataset = open_split(split)
            for index, record in enumerate(dataset):
                yield row_from_record(record, split=split, index=index, origin=origin)
        except SourceError:
            raise
        except Exception as err:  # datasets raises many unrelated types, lazily, while streaming
            raise hub_error(err, origin, config) from err


def iter_parquet(path: Path | str, *, splits: Sequence[str] | None = None, streaming: bool = True) -> Iterator[SourceRow]:
    """Rows of local parquet files with GigaMIDI's columns, read through `datasets`.

    Args:
        path: one parquet file or a directory of them (split taken from the file/folder names).
        splits: only these splits (None: all found).
        streaming: stream rows instead of building an Arrow cache first.

    Raises:
        SourceError: no parquet files, an unknown split, or unreadable files.
    """
    groups = parquet_files_by_split(path)
    chosen = list(groups) if not splits else list(splits)
    missing = [s for s in chosen if s not in groups]
    if missing:
        raise SourceError(f"{str(path)!r} has no parquet files for split(s) {missing}; found {sorted(groups)}")

    def open_split(split: str) -> Any:
        from datasets import load_dataset

        return load_dataset("parquet", data_files=groups[split], split="train", streaming=streaming)

    return _iter_records(open_split, chosen, origin=str(path), config="parquet")


def iter_hub(
    dataset: str = HUB_DATASET,
    *,
    config: str = DEFAULT_HUB_CONFIG,
    splits: Sequence[str] = HUB_SPLITS,
    streaming: bool = True,
    token: str | None = None,
) -> Iterator[SourceRow]:
    """Rows of a hub data set (GigaMIDI by default), streamed unless told otherwise.

    Args:
        token: Hugging Face token; None lets `huggingface_hub` use a stored login.

    Raises:
        SourceError: access denied (with how to request it), unknown config, no network.
    """

    def open_split(split: str) -> Any:
        from datasets import load_dataset

        return load_dataset(dataset, name=config, split=split, streaming=streaming, token=token)

    return _iter_records(open_split, list(splits), origin=dataset, config=config)


def open_dataset(
    name_or_path: str,
    *,
    config: str = DEFAULT_HUB_CONFIG,
    splits: Sequence[str] | None = None,
    streaming: bool = True,
    token: str | None = None,
) -> Iterator[SourceRow]:
    """A local parquet file/directory when `name_or_path` exists on disk, else a hub data set name."""
    if Path(name_or_path).exists():
        return iter_parquet(name_or_path, splits=splits, streaming=streaming)
    if "/" not in name_or_path:
        raise SourceError(
            f"--dataset {name_or_path!r} is neither an existing parquet file/directory nor a hub name "
            f"like {HUB_DATASET!r}"
        )
    return iter_hub(name_or_path, config=config, splits=splits or HUB_SPLITS, streaming=streaming, token=token)


# ---------------------------------------------------------------- parsing in worker processes


@dataclass(frozen=True)
class PrepareOptions:
    """What a worker computes for each file."""

    include_drums: bool = True
    features: bool = True
    tokens: bool = False


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
            row.md5, row.name, row.split, row.meta, stage="source",
            error_type=row.error_type or "DataError", error=row.error or "no MIDI bytes",
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
    except Exception as err:  # one bad file must not stop the batch; --strict re-raises
        return _fail(row, stage, err, strict)
    report = bars.report.to_dict()
    info = {
        "n_bytes": midi.n_bytes,
        "ticks_per_quarter": bars.ticks_per_quarter,
        "time_signature": "{}/{}".format(*bars.time_signature),
        "leading_bars_dropped": bars.leading_bars_dropped,
        **{k: int(v) for k, v in report.items() if isinstance(v, (int, np.integer))},
    }
    return FileResult(row.md5, row.name, row.split, row.meta, bars.n_bars, features, token_ids, info, seconds=seconds)


PrepareFn = Callable[[SourceRow, PrepareOptions, bool], FileResult]
_worker_state: dict[str, Any] = {}


def _init_worker(prepare: PrepareFn, options: PrepareOptions) -> None:
    _worker_state["prepare"] = prepare
    _worker_state["options"] = options


def _run_chunk(rows: list[SourceRow]) -> list[FileResult]:
    prepare, options = _worker_state["prepare"], _worker_state["options"]
    return [prepare(row, options, False) for row in rows]


def _crashed(row: SourceRow) -> FileResult:
    return FileResult(
        row.md5, row.name, row.split, row.meta, stage="read", error_type="WorkerCrash",
        error=f"{row.name!r} crashed the parsing worker process (e.g. a segfault in the MIDI parser); skipped",
    )


def parse_in_order(
    rows: Iterator[SourceRow], prepare: PrepareFn, options: PrepareOptions, num_workers: int, strict: bool
) -> Iterator[FileResult]:
    """Results in input order; in-flight work is bounded; a crashed worker costs only its file."""
    if num_workers == 0:
        for row in rows:
            yield prepare(row, options, strict)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker, initargs=(prepare, options))

    pool = new_pool()
    pending: deque[tuple[list[SourceRow], Future[list[FileResult]]]] = deque()
    max_in_flight = 4 * num_workers
    try:
        while True:
            while len(pending) < max_in_flight:
                chunk = list(islice(rows, CHUNK_FILES))
                if not chunk:
                    break
                pending.append((chunk, pool.submit(_run_chunk, chunk)))
            if not pending:
                return
            chunk, future = pending.popleft()
            try:
                results = future.result()
            except BrokenProcessPool:
                # Every future of the broken pool fails; redo each of their files alone to find the culprit.
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
                results = []
                for row in chunk:
                    try:
                        results.extend(pool.submit(_run_chunk, [row]).result())
                    except BrokenProcessPool:
                        pool.shutdown(wait=False, cancel_futures=True)
                        pool = new_pool()
                        results.append(_crashed(row))
                pending = deque((c, pool.submit(_run_chunk, c)) for c, _ in pending)
            yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- output layout and the ledger (read side)


CSV_HEADER = "md5,bar_number,valence,arousal\n"
REPORT_FIELDS = (
    "n_notes", "drum_notes", "dropped_drum_notes", "dropped_out_of_range_pitches", "extra_time_signatures",
    "truncated_bars", "truncated_tokens", "oov_events",
)  # fmt: skip
META_FIELDS = (
    "md5", "status", "split", "name", "title", "artist", *GENRE_COLUMNS, "instrument_category", "num_tracks",
    "NOMML", "tempo", "n_bytes", "ticks_per_quarter", "time_signature", "n_bars", "leading_bars_dropped",
    *REPORT_FIELDS,
)  # fmt: skip
FAILURE_FIELDS = ("md5", "name", "stage", "error_type", "message")
LEDGER_MAGIC = b"#midiva-ledger 1 "
COMPLETE_LINE = b"#complete\n"


@dataclass(frozen=True)
class OutputPaths:
    """Every file of one output, named after the annotations CSV."""

    csv: Path
    meta: Path
    failures: Path
    ledger: Path
    summary: Path

    @property
    def tables(self) -> tuple[Path, Path, Path]:
        """The three append-only tables, in ledger offset order."""
        return self.csv, self.meta, self.failures


def output_paths(out: Path | str) -> OutputPaths:
    """`annotations.csv` -> its meta, failures, ledger (`.csv.done`) and summary paths."""
    csv_path = Path(out)
    stem = csv_path.with_suffix("") if csv_path.suffix.lower() == ".csv" else csv_path
    return OutputPaths(
        csv_path,
        stem.with_name(stem.name + ".meta.csv"),
        stem.with_name(stem.name + ".failures.csv"),
        csv_path.with_name(csv_path.name + ".done"),
        stem.with_name(stem.name + ".summary.json"),
    )


def csv_line(values: Sequence[Any]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue().encode("utf-8")




class Md5Set:
    """A set of hex md5s in 16 bytes each (sorted uint64 pairs plus a small recent set)."""

    _MERGE_AT = 1 << 16

    def __init__(self) -> None:
        self._hi = np.empty(0, np.uint64)
        self._lo = np.empty(0, np.uint64)
        self._recent: set[tuple[int, int]] = set()

    @staticmethod
    def _key(md5: str) -> tuple[int, int]:
        return int(md5[:16], 16), int(md5[16:32], 16)

    def __contains__(self, md5: object) -> bool:
        if not isinstance(md5, str):
            return False
        key = self._key(md5)
        if key in self._recent:
            return True
        hi = np.uint64(key[0])
        i, j = np.searchsorted(self._hi, hi, "left"), np.searchsorted(self._hi, hi, "right")
        return bool((self._lo[i:j] == np.uint64(key[1])).any())

    def add(self, md5: str) -> bool:
        """Add `md5`; False when it was already present."""
        if md5 in self:
            return False
        self._recent.add(self._key(md5))
        if len(self._recent) >= self._MERGE_AT:
            self._merge()
        return True

    def _merge(self) -> None:
        pairs = np.array(sorted(self._recent), dtype=np.uint64).reshape(-1, 2)
        self._set_sorted(np.concatenate([self._hi, pairs[:, 0]]), np.concatenate([self._lo, pairs[:, 1]]))
        self._recent.clear()

    def _set_sorted(self, hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]) -> None:
        order = np.lexsort((lo, hi))
        hi, lo = hi[order], lo[order]
        keep = np.ones(len(hi), bool)
        keep[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        self._hi, self._lo = hi[keep], lo[keep]

    @staticmethod
    def pairs(md5s: Sequence[str]) -> npt.NDArray[np.uint64]:
        """(n, 2) uint64 keys of hex md5s, converted in bulk."""
        return np.frombuffer(bytes.fromhex("".join(md5s)), dtype=">u8").astype(np.uint64).reshape(-1, 2)

    @classmethod
    def from_pairs(cls, chunks: Sequence[npt.NDArray[np.uint64]]) -> Md5Set:
        """Build from `pairs` chunks with one sort (a 2 M-file resume state in about a second)."""
        found = cls()
        if chunks:
            joined = np.concatenate(chunks)
            found._set_sorted(joined[:, 0].copy(), joined[:, 1].copy())
        return found

    def __len__(self) -> int:
        return len(self._hi) + len(self._recent)


@dataclass(frozen=True)
class LedgerEntry:
    """One commit record: a file, its status, its row count, and each table's length after it."""

    md5: str
    status: str
    n_rows: int
    ends: tuple[int, int, int]


def read_ledger_header(handle: BinaryIO) -> tuple[dict[str, Any], tuple[int, int, int]] | None:
    line = handle.readline()
    if not line.startswith(LEDGER_MAGIC) or not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line[len(LEDGER_MAGIC) :])
        a, b, c = (int(x) for x in record["ends"])
        return dict(record["fingerprint"]), (a, b, c)
    except (ValueError, KeyError, TypeError):
        return None


def iter_ledger(handle: BinaryIO, ends: tuple[int, int, int]) -> Iterator[tuple[LedgerEntry | None, int]]:
    """(entry, or None for a completion mark; ledger bytes up to here) until the first torn or bad line."""
    for line in handle:
        if not line.endswith(b"\n"):
            return
        if line == COMPLETE_LINE:
            yield None, handle.tell()
            continue
        try:
            md5, status, n_rows, a, b, c = line.decode("ascii").rstrip("\n").split(",")
            entry = LedgerEntry(md5, status, int(n_rows), (int(a), int(b), int(c)))
        except ValueError:
            return
        if status not in ("ok", "failed") or len(md5) != 32 or any(e < p for e, p in zip(entry.ends, ends, strict=True)):
            return
        ends = entry.ends
        yield entry, handle.tell()


@dataclass
class LedgerState:
    """What the ledger says has been committed (the resume state)."""

    fingerprint: dict[str, Any]
    ends: tuple[int, int, int]
    ledger_bytes: int
    ok_keys: Md5Set
    failed_keys: Md5Set
    n_files: int = 0
    n_rows: int = 0
    complete: bool = False

    def is_done(self, md5: str, retry_failures: bool = False) -> bool:
        """Whether `md5` is committed (as failed too, unless failures are retried)."""
        return md5 in self.ok_keys or (not retry_failures and md5 in self.failed_keys)


def scan_ledger(path: Path) -> LedgerState | None:
    """Read a ledger up to its last intact record; None when it has no valid header."""
    with open(path, "rb") as handle:
        header = read_ledger_header(handle)
        if header is None:
            return None
        state = LedgerState(header[0], header[1], handle.tell(), Md5Set(), Md5Set())
        chunks, batch, failed = [], [], set()
        for entry, position in iter_ledger(handle, header[1]):
            state.ledger_bytes = position
            state.complete = entry is None
            if entry is None:
                continue
            state.ends = entry.ends
            if entry.status == "ok":
                batch.append(entry.md5)
                state.n_rows += entry.n_rows
                if len(batch) >= 1 << 16:  # bulk conversion: 16 bytes per key, no per-key objects
                    chunks.append(Md5Set.pairs(batch))
                    batch.clear()
            else:
                failed.add(entry.md5)
        chunks.append(Md5Set.pairs(batch))
    ok_keys = Md5Set.from_pairs(chunks)
    state.ok_keys, state.failed_keys = ok_keys, Md5Set.from_pairs([Md5Set.pairs(sorted(failed))])
    state.n_files = len(ok_keys) + sum(md5 not in ok_keys for md5 in failed)
    return state


TABLE_HEADERS = (CSV_HEADER.encode(), csv_line(META_FIELDS), csv_line(FAILURE_FIELDS))


def ledger_entries(path: Path, ends: tuple[int, int, int]) -> Iterator[LedgerEntry]:
    with open(path, "rb") as handle:
        handle.readline()
        for entry, _ in iter_ledger(handle, ends):
            if entry is not None:
                yield entry


def check_rows(rows: bytes, entry: LedgerEntry, origin: Path) -> None:
    """Check one committed file's CSV bytes: n_rows rows of its md5, bar_numbers 0..n-1 in order.

    Raises:
        DataError: the rows do not match the ledger record.
    """
    lines = rows.split(b"\n")
    if lines.pop() != b"" or len(lines) != entry.n_rows:
        raise DataError(f"{origin}: md5 {entry.md5} has {len(lines)} rows but its ledger record says {entry.n_rows}")
    prefix = entry.md5.encode() + b","
    for i, line in enumerate(lines):
        parts = line.split(b",")
        if len(parts) != 4 or not line.startswith(prefix) or parts[1] != str(i).encode():
            raise DataError(
                f"{origin}: rows of md5 {entry.md5} are not bar_numbers 0..{entry.n_rows - 1} in order "
                f"(row {i}: {line[:80]!r}); the output is damaged — rerun that shard with --no-resume"
            )


def export_parquet(paths: OutputPaths) -> list[Path]:
    """Write `<stem>.parquet` and `<stem>.meta.parquet` from the committed CSV tables.

    Raises:
        OutputError: a Parquet file cannot be written (the CSV outputs are untouched).
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    types = {"md5": pa.string(), "bar_number": pa.int32(), "valence": pa.float32(), "arousal": pa.float32()}
    meta_types = dict.fromkeys(("md5", "status", "split", "name", "title", "artist", *GENRE_COLUMNS, "NOMML", "tempo"), pa.string())
    written = []
    for source, column_types in ((paths.csv, types), (paths.meta, meta_types)):
        target = source.with_suffix(".parquet")
        tmp = target.with_name(target.name + ".tmp")
        try:
            reader = pacsv.open_csv(
                source,
                read_options=pacsv.ReadOptions(block_size=1 << 24),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=False),
            )
            with pq.ParquetWriter(tmp, reader.schema) as sink:
                for batch in reader:
                    sink.write_batch(batch)
            os.replace(tmp, target)
        except (OSError, pa.ArrowInvalid) as err:
            raise OutputError(f"cannot write {str(target)!r}: {err}; the CSV outputs are intact") from err
        written.append(target)
    return written

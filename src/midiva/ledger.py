"""The one commit mechanism of every batch job: append-only tables and the fsynced ledger beside them.

Input: what a sink stages per file — its bytes for each of three append-only tables (for annotation:
the per-bar CSV, the per-file metadata table, the failures table) and its status. Output: the tables
and the ledger `<first table>.done`: a header line (`#midiva-ledger 2 {"fingerprint": ..., "ends": ...}`)
then one commit record per file (md5, status, n_rows, the byte length of each table after its bytes,
the crc32 of those bytes and of the record itself).

A file counts as done only once its record is written and fsynced, after its table bytes were. On
resume every table is truncated back to the lengths of the last intact record (rows of uncommitted
files and torn lines vanish), committed md5s (16 bytes each in `Md5Set`) are skipped before their
bytes are parsed, and a resume with another fingerprint is refused, naming what differs. Both halves
live here: `LedgerWriter` writes, `scan_ledger` / `iter_ledger` / `check_rows` read (resume, merge,
status).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from midiva.errors import ConfigError, DataError, OutputError
from midiva.sources import GENRE_COLUMNS, normalize_md5

log = logging.getLogger(__name__)

MAX_BUFFER_BYTES = 32 << 20

CSV_HEADER = "md5,bar_number,valence,arousal\n"
REPORT_FIELDS = (
    "n_notes",
    "drum_notes",
    "dropped_drum_notes",
    "dropped_out_of_range_pitches",
    "extra_time_signatures",
    "truncated_bars",
    "truncated_tokens",
    "oov_events",
)
META_FIELDS = (
    "md5",
    "status",
    "split",
    "name",
    "title",
    "artist",
    *GENRE_COLUMNS,
    "instrument_category",
    "num_tracks",
    "NOMML",
    "tempo",
    "n_bytes",
    "ticks_per_quarter",
    "time_signature",
    "n_bars",
    "leading_bars_dropped",
    *REPORT_FIELDS,
    "domain_distance",
)
FAILURE_FIELDS = ("md5", "name", "stage", "error_type", "message")
LEDGER_MAGICS = (b"#midiva-ledger 1 ", b"#midiva-ledger 2 ")  # format n is LEDGER_MAGICS[n - 1]
LEDGER_VERSION = 2  # what new ledgers are written in; format 1 ledgers are still read and resumed
LEDGER_MAGIC = LEDGER_MAGICS[LEDGER_VERSION - 1]
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

    @property
    def run(self) -> Path:
        """Provenance, named after the output: `annotations.run.json` (settings and their sources, versions)."""
        return self.summary.with_name(self.summary.name.removesuffix(".summary.json") + ".run.json")


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
    return buffer.getvalue().encode("utf-8", "backslashreplace")  # a lone surrogate must not stop a run


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
        sorted_hi = self._hi
        if not len(sorted_hi):
            return False
        i, n = int(sorted_hi.searchsorted(np.uint64(key[0]))), len(sorted_hi)
        while i < n and int(sorted_hi[i]) == key[0]:  # the rare equal high halves, one by one
            if int(self._lo[i]) == key[1]:
                return True
            i += 1
        return False

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
    """One commit record: a file, its status, its row count, each table's length after it, and
    (ledger format 2) the crc32 of the file's bytes in the three tables."""

    md5: str
    status: str
    n_rows: int
    ends: tuple[int, int, int]
    data_crc: int | None = None


def ledger_line(md5: str, status: str, n_rows: int, ends: Sequence[int], data: Sequence[bytes], version: int) -> bytes:
    """One ledger record. Format 2 adds the crc32 of the file's table bytes and a crc32 of the record
    itself, so a changed digit is found on resume instead of re-annotating the file a second time."""
    record = f"{md5},{status},{n_rows},{ends[0]},{ends[1]},{ends[2]}"
    if version >= 2:
        record = f"{record},{table_crc(data):08x}"
        record = f"{record},{zlib.crc32(record.encode()):08x}"
    return record.encode() + b"\n"


def table_crc(data: Sequence[bytes]) -> int:
    """crc32 of one file's bytes in the three tables, in order (what a format-2 record stores)."""
    crc = 0
    for chunk in data:
        crc = zlib.crc32(chunk, crc)
    return crc


def read_ledger_header(handle: BinaryIO) -> tuple[dict[str, Any], tuple[int, int, int], int] | None:
    """(fingerprint, table ends, format version) from a ledger's first line; None when it is not one."""
    line = handle.readline()
    magic = next((m for m in LEDGER_MAGICS if line.startswith(m)), None)
    if magic is None or not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line[len(magic) :])
        a, b, c = (int(x) for x in record["ends"])
        return dict(record["fingerprint"]), (a, b, c), LEDGER_MAGICS.index(magic) + 1
    except (ValueError, KeyError, TypeError):
        return None


def _parse_record(line: bytes, version: int) -> LedgerEntry | None:
    try:
        fields = line.decode("ascii").rstrip("\n").split(",")
        if version >= 2:
            *fields, line_crc = fields
            if len(line_crc) != 8 or int(line_crc, 16) != zlib.crc32(",".join(fields).encode()):
                return None
            *fields, data_crc = fields
        md5, status, n_rows, a, b, c = fields
        entry = LedgerEntry(
            md5, status, int(n_rows), (int(a), int(b), int(c)), int(data_crc, 16) if version >= 2 else None
        )
    except ValueError:
        return None
    if status not in ("ok", "failed") or normalize_md5(md5) != md5:
        return None
    return entry


def iter_ledger(
    handle: BinaryIO, ends: tuple[int, int, int], version: int = LEDGER_VERSION
) -> Iterator[tuple[LedgerEntry | None, int]]:
    """(entry, or None for a completion mark; ledger bytes up to here) until the end or a torn last line.

    Raises:
        OutputError: (format 2) a damaged record with intact records after it — the ledger was edited.
    """
    for line in handle:
        if not line.endswith(b"\n"):
            return
        if line == COMPLETE_LINE:
            yield None, handle.tell()
            continue
        entry = _parse_record(line, version)
        if entry is None or any(e < p for e, p in zip(entry.ends, ends, strict=True)):
            if version >= 2 and handle.read().strip(b"\0"):
                raise OutputError(
                    f"a record of the ledger {getattr(handle, 'name', '')!r} is damaged ({line[:80]!r}) and records "
                    "follow it: the ledger was edited or corrupted; pass --no-resume to start over, or choose another --out"
                )
            return  # a torn last record: its file is redone
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
    version: int = LEDGER_VERSION
    last: tuple[tuple[int, int, int], LedgerEntry] | None = None  # the last record and where its bytes start

    def check_last_record(self, tables: Sequence[Path]) -> None:
        """Compare the last committed file's table bytes with its record's checksum (a few kB read).

        A hand edit that changed a table's length shifts these bytes, so it is found here, at resume;
        an edit that kept the length is found by `midiva merge`, which checks every record.

        Raises:
            OutputError: the bytes differ from what was committed.
        """
        if self.last is None or self.last[1].data_crc is None:
            return
        starts, entry = self.last
        chunks = []
        for path, start, end in zip(tables, starts, entry.ends, strict=True):
            with open(path, "rb") as handle:
                handle.seek(start)
                chunks.append(handle.read(end - start))
        if table_crc(chunks) != entry.data_crc:
            raise OutputError(
                f"the committed rows of md5 {entry.md5} in {str(tables[0])!r} and beside it differ from their ledger "
                "checksum: the outputs were edited or damaged; pass --no-resume to start over, or choose another --out"
            )

    def is_done(self, md5: str, retry_failures: bool = False) -> bool:
        """Whether `md5` is committed (as failed too, unless failures are retried)."""
        return md5 in self.ok_keys or (not retry_failures and md5 in self.failed_keys)


def scan_ledger(path: Path) -> LedgerState | None:
    """Read a ledger up to its last intact record; None when it has no valid header."""
    with open(path, "rb") as handle:
        header = read_ledger_header(handle)
        if header is None:
            return None
        state = LedgerState(header[0], header[1], handle.tell(), Md5Set(), Md5Set(), version=header[2])
        chunks, batch, failed = [], [], set()
        for entry, position in iter_ledger(handle, header[1], header[2]):
            state.ledger_bytes = position
            state.complete = entry is None
            if entry is None:
                continue
            state.last = (state.ends, entry)
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
        header = read_ledger_header(handle)
        for entry, _ in iter_ledger(handle, ends, header[2] if header else LEDGER_VERSION):
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


def _write_all(handle: BinaryIO, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = handle.write(view)
        view = view[written or 0 :]


def _os_message(err: OSError) -> str:
    return err.strerror or str(err)


def meta_line(result: Any, status: str, n_bars: int) -> bytes:
    """A file's row of the metadata table (`META_FIELDS`), from a `midiva.prepare.FileResult`."""
    values = {
        **result.meta,
        **result.info,
        "md5": result.md5,
        "status": status,
        "split": result.split,
        "name": result.name,
        "n_bars": n_bars,
    }
    return csv_line([values.get(k, "") for k in META_FIELDS])


def failure_line(result: Any) -> bytes:
    """A failed file's row of the failures table (`FAILURE_FIELDS`, the one schema of every command)."""
    return csv_line([result.md5, result.name, result.stage, result.error_type, result.error])


class LedgerWriter:
    """Appends files' bytes to the three tables and commits them through the ledger.

    Args:
        paths: the output's files; `paths.tables` are written in ledger offset order.
        fingerprint: everything that changes the output's bytes; a resume with another one is refused.
        resume: continue from the ledger (False: start over, discarding the previous outputs).
        commit_interval_s: `maybe_commit` fsyncs and commits at most this often.
        headers: the first line of each table (default: annotation's `TABLE_HEADERS`).
    """

    def __init__(
        self,
        paths: OutputPaths,
        fingerprint: Mapping[str, Any],
        *,
        resume: bool = True,
        commit_interval_s: float = 1.0,
        headers: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        self.paths = paths
        self.headers = headers or TABLE_HEADERS
        self.fingerprint: dict[str, Any] = json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=str))
        self.commit_interval_s = commit_interval_s
        self._handles: list[BinaryIO] = []
        self._stack = ExitStack()
        if paths.csv.is_dir():
            raise OutputError(
                f"--out {str(paths.csv)!r} is a directory; give a CSV file path such as "
                f"{str(paths.csv / 'annotations.csv')!r}"
            )
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
        return any(
            p.exists() and p.stat().st_size > len(h) for p, h in zip(self.paths.tables, self.headers, strict=True)
        )

    def _start_fresh(self) -> LedgerState:
        for path, header in zip(self.paths.tables, self.headers, strict=True):
            with open(path, "wb") as handle:
                handle.write(header)
                handle.flush()
                os.fsync(handle.fileno())
        ends = tuple(len(h) for h in self.headers)
        line = (
            LEDGER_MAGIC + json.dumps({"fingerprint": self.fingerprint, "ends": ends}, sort_keys=True).encode() + b"\n"
        )
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
        diffs = [
            f"{k}: {previous.get(k)!r} then, {self.fingerprint.get(k)!r} now"
            for k in keys
            if previous.get(k) != self.fingerprint.get(k)
        ]
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

    def stage(self, md5: str, status: str, n_rows: int, rows: bytes, meta: bytes, failure: bytes) -> None:
        """Queue one file's bytes for the three tables and its commit record (written by the next commit)."""
        for i, data in enumerate((rows, meta, failure)):
            self._buffers[i] += data
        ends = [self._ends[i] + len(self._buffers[i]) for i in range(3)]
        self._buffers[3] += ledger_line(md5, status, n_rows, ends, (rows, meta, failure), self.state.version)
        self._staged[0] += 1
        self._staged[1] += n_rows if status == "ok" else 0

    def stage_ok(self, result: Any, rows: bytes, n_rows: int) -> None:
        """Queue a finished file: its `rows` (n_rows lines of the first table) and its metadata row."""
        self.stage(result.md5, "ok", n_rows, rows, meta_line(result, "ok", n_rows), b"")

    def stage_failed(self, result: Any) -> None:
        """Queue a failed file: its metadata and failure rows."""
        self.stage(result.md5, "failed", 0, b"", meta_line(result, "failed", 0), failure_line(result))

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

"""Combine the outputs of sharded runs (Slurm array tasks, several machines) into one, checked.

Input: the annotation outputs of every shard (`annotations.csv` and the tables and ledger beside
it, `midiva.ledger`). Output: one output with the same layout, whose ledger is a valid resume state.
Every check runs before anything is written: one fingerprint for all shards (same model and
settings: shards with different fingerprints are refused, naming what differs), every shard index
once, every run read its source to its end, no md5 in two shards, and every committed file's rows
are bar_numbers 0..n-1 with their checksum intact. Tables are streamed in blocks (bounded memory).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from midiva.atomic import atomic_output
from midiva.errors import DataError, OutputError
from midiva.ledger import (
    COMPLETE_LINE,
    LEDGER_MAGIC,
    LEDGER_VERSION,
    TABLE_HEADERS,
    LedgerEntry,
    Md5Set,
    OutputPaths,
    check_rows,
    iter_ledger,
    ledger_entries,
    ledger_line,
    output_paths,
    read_ledger_header,
    table_crc,
)
from midiva.lock import lock_path_for, read_holder

log = logging.getLogger(__name__)


def _os_message(err: OSError) -> str:
    return err.strerror or str(err)


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
    _check_inputs(parts, target)
    headers = [_ledger_header(part) for part in parts]
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
    fingerprint = {**common[0], "num_shards": 1, "shard_index": 0}
    totals = _write_merged(parts, [h[1] for h in headers], target, fingerprint, repeats, complete)
    return MergeReport(str(target.csv), len(parts), totals["ok"], totals["failed"], totals["rows"], complete)


def _check_inputs(parts: list[OutputPaths], target: OutputPaths) -> None:
    """Each input once, none of them the output, none still being written."""
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
            raise DataError(
                f"{str(part.csv)!r} is being written by {holder.describe()}; merge once it has finished "
                f"(if that process is gone, delete {lock_path_for(part.csv).name!r} beside it)"
            )


def _ledger_header(part: OutputPaths) -> tuple[dict[str, Any], tuple[int, int, int], int]:
    """(fingerprint, table ends, format) of an input's ledger."""
    if not part.ledger.is_file():
        raise DataError(f"{str(part.csv)!r} has no ledger {part.ledger.name!r}; is it a `midiva annotate` output?")
    with open(part.ledger, "rb") as handle:
        header = read_ledger_header(handle)
    if header is None:
        raise DataError(f"{str(part.ledger)!r} is not a midiva ledger")
    return header


def _write_merged(
    parts: list[OutputPaths],
    header_ends: list[tuple[int, int, int]],
    target: OutputPaths,
    fingerprint: dict[str, Any],
    repeats: Counter[str],
    complete: bool,
) -> Counter[str]:
    """Write the merged tables and ledger beside `target` as temporary files, then move them into place."""
    ends = [len(h) for h in TABLE_HEADERS]
    totals = Counter[str]()
    hint = "the inputs are intact; free space or choose another --out"
    with ExitStack() as stack:  # every file is moved into place only once all are written; the ledger last
        tmp = [
            stack.enter_context(atomic_output(p, what="the merged output", hint=hint))
            for p in (target.ledger, *target.tables)
        ]
        tmp = [*tmp[1:], tmp[0]]
        try:
            sinks: list[BinaryIO] = [stack.enter_context(open(p, "wb")) for p in tmp]
        except OSError as err:
            raise OutputError(
                f"cannot write the merged output {str(target.csv)!r}: {_os_message(err)}; {hint}"
            ) from err
        for sink, header_bytes in zip(sinks[:3], TABLE_HEADERS, strict=True):
            sink.write(header_bytes)
        sinks[3].write(
            LEDGER_MAGIC + json.dumps({"fingerprint": fingerprint, "ends": ends}, sort_keys=True).encode() + b"\n"
        )
        for part, part_ends in zip(parts, header_ends, strict=True):
            _copy_part(part, part_ends, sinks, ends, repeats, totals)
        if complete:
            sinks[3].write(COMPLETE_LINE)
    return totals


def _sorted_keys(md5s: list[str]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
    """md5s as sorted (n, 2) uint64 keys, and where each key equals the one before it."""
    pairs = Md5Set.pairs(md5s) if md5s else np.zeros((0, 2), np.uint64)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    same = np.zeros(len(pairs), bool)
    same[1:] = (pairs[1:] == pairs[:-1]).all(axis=1)
    return pairs, same


def _ledger_keys(
    part: OutputPaths, ends: tuple[int, int, int], repeats: Counter[str]
) -> tuple[npt.NDArray[np.uint64], bool]:
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
        raise DataError(
            f"md5 {md5} of {str(parts[owner[i + 1]].csv)!r} also appears in an earlier input "
            f"({str(parts[owner[i]].csv)!r}); the inputs overlap — merge disjoint runs or shards"
        )


def _check_shard_set(
    parts: list[OutputPaths], fingerprints: list[dict[str, Any]], common: list[dict[str, Any]]
) -> None:
    """Same model and settings everywhere; with shards, each index once and one directory per shard."""
    for part, fp in zip(parts, common, strict=True):
        if fp != common[0]:
            diffs = [
                f"{k}: {common[0].get(k)!r} vs {fp.get(k)!r}"
                for k in sorted(set(fp) | set(common[0]))
                if fp.get(k) != common[0].get(k)
            ]
            raise DataError(
                f"{str(part.csv)!r} was annotated with other settings than {str(parts[0].csv)!r} "
                f"({'; '.join(diffs)}); merge only shards of one run"
            )
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
        raise DataError(
            f"shards of a {num_shards}-shard run: missing {missing} (given {sorted(holders)}); "
            "annotate the missing shards (their --shard-index) and merge all of them"
        )
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
    part: OutputPaths,
    header_ends: tuple[int, int, int],
    sinks: list[BinaryIO],
    ends: list[int],
    repeats: Counter[str],
    totals: Counter[str],
) -> None:
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
    part: OutputPaths,
    block: list[LedgerEntry],
    start: tuple[int, int, int],
    sources: list[BinaryIO],
    sinks: list[BinaryIO],
    ends: list[int],
    repeats: Counter[str],
    totals: Counter[str],
) -> None:
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
            raise DataError(
                f"{part.csv}: the table rows of md5 {entry.md5} differ from what was committed "
                "(checksum); the output was edited or damaged — rerun that shard with --no-resume"
            )
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

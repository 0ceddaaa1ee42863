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
import glob
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from midiva.errors import DataError, EmptyScoreError, MidivaError, OutputError, SourceError
from midiva.midi import MAX_MIDI_BYTES, read_regular_file
from midiva.workers import map_in_order

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
    claimed = md5
    if isinstance(music, bytes) and music:
        md5 = hashlib.md5(music).hexdigest()  # the md5 is the key: verified, as it costs little next to parsing
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
    if claimed is not None and claimed != md5:
        return SourceRow(
            md5, name, split, None, meta, "DataError",
            f"{label}: its md5 column says {claimed} but its 'music' bytes hash to {md5}; recorded as failed "
            "under the bytes' md5, the run goes on",
        )
    return SourceRow(md5, name, split, music, meta)


# ---------------------------------------------------------------- files and directories


def list_midi_files(inputs: Sequence[Path | str]) -> list[Path]:
    """Expand files, directories (recursively, sorted) and glob patterns into MIDI file paths, in input order.

    A file named explicitly is kept whatever its suffix; directories and patterns (`*`, `?`, `[`,
    `**` recursive) contribute files with a MIDI suffix only.

    Raises:
        SourceError: an input does not exist, or a directory or pattern holds no MIDI files.
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
        elif any(c in str(item) for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(str(item), recursive=True))]
            files = [p for p in matches if p.is_file() and p.suffix.lower() in MIDI_SUFFIXES]
            for directory in (p for p in matches if p.is_dir()):
                files.extend(sorted(p for p in directory.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file()))
            if not files:
                raise SourceError(f"pattern {str(item)!r} matches no MIDI files ({', '.join(MIDI_SUFFIXES)})")
            found.extend(files)
        else:
            raise SourceError(f"input {str(path)!r} does not exist; pass MIDI files, directories or glob patterns")
    return found


def _md5_of_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


MD5_CACHE_MAGIC = "#midiva-md5-cache 1\n"


class SkipUnread:
    """md5 -> True when the run will skip that file: a source given one does not read such files.

    It skips nothing until `test` is set; `annotate_stream(..., skip_unread=)` sets it from the
    resume state and the shard, once the outputs are open, so the source can be built first.
    """

    def __init__(self) -> None:
        self.test: Callable[[str], bool] | None = None

    def __call__(self, md5: str) -> bool:
        return self.test is not None and self.test(md5)


def md5_cache_path(out: Path | str) -> Path:
    """Where annotate keeps the md5s of input files for the output `out` (`<out>.md5cache`)."""
    out = Path(out)
    return out.with_name(out.name + ".md5cache")


class FileMd5Cache:
    """md5s of MIDI files by path, trusted while a file's size and mtime (ns) are unchanged.

    A resumed run looks a file up before reading it: a hit whose md5 is already done is skipped
    unread; a file whose size or mtime changed is read and hashed again. The cache only saves
    work: a missing or damaged one costs a re-read, never a wrong skip of a changed file.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._entries: dict[str, tuple[int, int, str]] = {}
        self._changed = False

    @classmethod
    def load(cls, path: Path | str) -> FileMd5Cache:
        """Read the cache at `path` (absent or unreadable: empty)."""
        cache = cls(Path(path))
        try:
            with open(path, encoding="utf-8") as handle:
                if handle.readline() != MD5_CACHE_MAGIC:
                    return cache
                for line in handle:
                    parts = line.rstrip("\n").split("\t", 3)
                    if len(parts) == 4 and _MD5_RE.fullmatch(parts[0]) and parts[1].isdigit() and parts[2].isdigit():
                        cache._entries[parts[3]] = (int(parts[1]), int(parts[2]), parts[0])
        except (OSError, UnicodeDecodeError) as err:
            log.debug("md5 cache %s not used: %s", path, err)
        return cache

    def lookup(self, name: str, size: int, mtime_ns: int) -> str | None:
        """The cached md5 of `name`, or None when unknown or the file changed."""
        entry = self._entries.get(name)
        return entry[2] if entry is not None and entry[:2] == (size, mtime_ns) else None

    def record(self, name: str, size: int, mtime_ns: int, md5: str) -> None:
        """Remember the md5 of `name` at this size and mtime."""
        if "\n" not in name and "\t" not in name and self._entries.get(name) != (size, mtime_ns, md5):
            self._entries[name] = (size, mtime_ns, md5)
            self._changed = True

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> None:
        """Write the cache atomically when it changed (to its own path); a failure is only logged,
        since a run without the cache is merely slower to resume (and must not hide the run's own error)."""
        if self.path is None or not self._changed:
            return
        from midiva.model import write_text_atomic  # the main process has the model loaded already

        lines = [f"{md5}\t{size}\t{mtime}\t{name}\n" for name, (size, mtime, md5) in self._entries.items()]
        try:
            write_text_atomic(self.path, MD5_CACHE_MAGIC + "".join(lines))
        except OutputError as err:
            log.warning("md5 cache not saved (a resume will re-read the files): %s", err)
            return
        self._changed = False


def iter_files(
    paths: Iterable[Path], skip: Callable[[str], bool] | None = None, *, md5_cache: FileMd5Cache | None = None
) -> Iterator[SourceRow]:
    """Read MIDI files into SourceRows (md5 of the bytes, as GigaMIDI computes it).

    Unreadable or oversized files become rows with an error, so the batch records them and goes on.
    With `md5_cache` and `skip` (md5 -> True when the run will skip it), a file whose cached md5
    is to be skipped is not read: its row carries the md5 and no bytes.
    """
    for path in paths:
        name = display_name(path)
        try:
            stat = path.stat()
            if md5_cache is not None and skip is not None:
                known = md5_cache.lookup(name, stat.st_size, stat.st_mtime_ns)
                if known is not None and skip(known):
                    yield SourceRow(known, name, "", None, {"title": display_name(path.stem)})
                    continue
            data = read_regular_file(path, MAX_MIDI_BYTES)
            if data is None:
                size = stat.st_size
                yield SourceRow(
                    _md5_of_file(path), name, "", None, {"title": display_name(path.stem)}, "MidiReadError",
                    f"{name!r} is {size / 2**20:.1f} MiB, above the {MAX_MIDI_BYTES // 2**20} MiB limit "
                    "for one MIDI file; skipped",
                )
                continue
        except OSError as err:
            # No bytes, so no content md5: the failure is keyed by the md5 of the path instead.
            yield SourceRow(
                hashlib.md5(os.fsencode(path)).hexdigest(), name, "", None, {"title": display_name(path.stem)},
                "MidiReadError", f"cannot read {name!r}: {err.strerror or err}; skipped",
            )
            continue
        md5 = hashlib.md5(data).hexdigest()
        if md5_cache is not None:
            md5_cache.record(name, stat.st_size, stat.st_mtime_ns, md5)
        yield SourceRow(md5, name, "", data, {"title": display_name(path.stem)})


def display_name(path: Path | str) -> str:
    """`path` as text that can be written as UTF-8: bytes of a non-UTF-8 file name become `\\xNN` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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
    open_split: Any, splits: Sequence[str], *, origin: str, config: str, skip: Callable[[str], bool] | None = None
) -> Iterator[SourceRow]:
    """The one iteration path shared by hub and parquet sources (errors mapped to SourceError).

    A row whose md5 column `skip` accepts becomes a bare row (md5 only): its bytes are neither
    copied nor hashed nor checked.
    """
    for split in splits:
        try:
            dataset = open_split(split)
            for index, record in enumerate(dataset):
                if skip is not None and (md5 := normalize_md5(record.get("md5"))) is not None and skip(md5):
                    yield SourceRow(md5, md5, _text(record.get("split")) or split)
                    continue
                yield row_from_record(record, split=split, index=index, origin=origin)
        except SourceError:
            raise
        except Exception as err:  # datasets raises many unrelated types, lazily, while streaming
            raise hub_error(err, origin, config) from err


def _nonempty_parquet(files: Sequence[str]) -> list[str]:
    """The files that hold rows, after checking each has a 'music' column (read from the footers only).

    Raises:
        SourceError: a file is not parquet, or has no 'music' column (every row would fail).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    kept = []
    for file in files:
        try:
            footer = pq.ParquetFile(file)
        except (OSError, pa.ArrowException) as err:
            raise SourceError(f"{file!r} is not a readable parquet file: {err}") from err
        names = footer.schema_arrow.names
        if "music" not in names:
            raise SourceError(
                f"{file!r} has no 'music' column (columns: {', '.join(names[:12])}); GigaMIDI parquet holds the MIDI "
                "bytes in 'music' — pass files with GigaMIDI's columns"
            )
        if footer.metadata.num_rows > 0:
            kept.append(file)
        else:
            log.info("%s holds no rows; skipped", file)
    return kept


def iter_parquet(
    path: Path | str, *, splits: Sequence[str] | None = None, streaming: bool = True,
    skip: Callable[[str], bool] | None = None,
) -> Iterator[SourceRow]:
    """Rows of local parquet files with GigaMIDI's columns, read through `datasets`.

    Args:
        path: one parquet file or a directory of them (split taken from the file/folder names).
        splits: only these splits (None: all found).
        streaming: stream rows instead of building an Arrow cache first.
        skip: md5 -> True for rows to pass on bare (see `SkipUnread`).

    Raises:
        SourceError: no parquet files, an unknown split, or unreadable files.
    """
    groups = parquet_files_by_split(path)
    chosen = list(groups) if not splits else list(splits)
    missing = [s for s in chosen if s not in groups]
    if missing:
        raise SourceError(f"{str(path)!r} has no parquet files for split(s) {missing}; found {sorted(groups)}")
    groups = {split: _nonempty_parquet(groups[split]) for split in chosen}
    chosen = [split for split in chosen if groups[split]]

    def open_split(split: str) -> Any:
        from datasets import load_dataset

        return load_dataset("parquet", data_files=groups[split], split="train", streaming=streaming)

    return _iter_records(open_split, chosen, origin=str(path), config="parquet", skip=skip)


def iter_hub(
    dataset: str = HUB_DATASET,
    *,
    config: str = DEFAULT_HUB_CONFIG,
    splits: Sequence[str] = HUB_SPLITS,
    streaming: bool = True,
    token: str | None = None,
    skip: Callable[[str], bool] | None = None,
) -> Iterator[SourceRow]:
    """Rows of a hub data set (GigaMIDI by default), streamed unless told otherwise.

    Args:
        token: Hugging Face token; None lets `huggingface_hub` use a stored login.
        skip: md5 -> True for rows to pass on bare (see `SkipUnread`).

    Raises:
        SourceError: access denied (with how to request it), unknown config, no network.
    """

    def open_split(split: str) -> Any:
        from datasets import load_dataset

        return load_dataset(dataset, name=config, split=split, streaming=streaming, token=token)

    return _iter_records(open_split, list(splits), origin=dataset, config=config, skip=skip)


def open_dataset(
    name_or_path: str,
    *,
    config: str = DEFAULT_HUB_CONFIG,
    splits: Sequence[str] | None = None,
    streaming: bool = True,
    token: str | None = None,
    skip: Callable[[str], bool] | None = None,
) -> Iterator[SourceRow]:
    """A local parquet file/directory when `name_or_path` exists on disk, else a hub data set name."""
    if Path(name_or_path).exists():
        return iter_parquet(name_or_path, splits=splits, streaming=streaming, skip=skip)
    if "/" not in name_or_path:
        raise SourceError(
            f"--dataset {name_or_path!r} is neither an existing parquet file/directory nor a hub name "
            f"like {HUB_DATASET!r}"
        )
    return iter_hub(name_or_path, config=config, splits=splits or HUB_SPLITS, streaming=streaming, token=token, skip=skip)


def count_dataset_rows(
    name_or_path: str, *, config: str = DEFAULT_HUB_CONFIG, splits: Sequence[str] | None = None, token: str | None = None
) -> int | None:
    """Rows `open_dataset` will yield, for a progress bar's total: parquet footers, or the hub's split sizes.

    Returns None when the number is not known cheaply (the hub card lists no sizes, or it cannot be reached).
    """
    try:
        if Path(name_or_path).exists():
            import pyarrow.parquet as pq

            groups = parquet_files_by_split(name_or_path)
            chosen = list(splits) if splits else list(groups)
            return sum(pq.ParquetFile(f).metadata.num_rows for s in chosen for f in groups.get(s, []))
        from datasets import load_dataset_builder

        info = load_dataset_builder(name_or_path, name=config, token=token).info.splits or {}
        sizes = [info[s].num_examples for s in (splits or HUB_SPLITS) if s in info]
        return sum(sizes) if sizes and all(sizes) else None
    except Exception as err:  # only a progress total: never fail a run over it
        log.debug("row count of %s unknown: %s", name_or_path, err)
        return None


# ---------------------------------------------------------------- parsing in worker processes


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
        row.md5, row.name, row.split, row.meta, stage="read", error_type="WorkerCrash",
        error=f"{row.name!r} crashed the parsing worker process (e.g. a segfault in the MIDI parser); skipped",
    )


def parse_in_order(
    rows: Iterator[SourceRow], prepare: PrepareFn, options: PrepareOptions, num_workers: int, strict: bool,
    threads: int = 0,
) -> Iterator[FileResult]:
    """Results in input order; in-flight work is bounded; a crashed worker costs only its file.

    `threads` caps BLAS and torch threads in each worker (`limit_threads`; 0: library defaults).
    """
    if num_workers == 0:
        for row in rows:
            yield prepare(row, options, strict)
        return
    yield from map_in_order(_PrepareCall(prepare, options, threads), rows, num_workers, _crashed, chunk_size=CHUNK_FILES)


# ---------------------------------------------------------------- output layout and the ledger (read side)


CSV_HEADER = "md5,bar_number,valence,arousal\n"
REPORT_FIELDS = (
    "n_notes", "drum_notes", "dropped_drum_notes", "dropped_out_of_range_pitches", "extra_time_signatures",
    "truncated_bars", "truncated_tokens", "oov_events",
)  # fmt: skip
META_FIELDS = (
    "md5", "status", "split", "name", "title", "artist", *GENRE_COLUMNS, "instrument_category", "num_tracks",
    "NOMML", "tempo", "n_bytes", "ticks_per_quarter", "time_signature", "n_bars", "leading_bars_dropped",
    *REPORT_FIELDS, "domain_distance",
)  # fmt: skip
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
        entry = LedgerEntry(md5, status, int(n_rows), (int(a), int(b), int(c)), int(data_crc, 16) if version >= 2 else None)
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

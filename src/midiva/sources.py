"""Stage 7a: where annotation reads its MIDI files from, one code path per kind of source.

Input: the Hugging Face hub data set `Metacreation/GigaMIDI` (gated), local parquet files with
GigaMIDI's columns (read through the same `datasets` streaming path), or MIDI files and
directories. Output: `SourceRow`s — the md5 key (GigaMIDI's: the md5 of the file's bytes),
the raw bytes, the split and the metadata the analysis step groups by. Nothing is parsed here.

Sharding is deterministic by md5: a file belongs to shard `int(md5[:8], 16) % num_shards`.
Parsing happens in `midiva.prepare`, the outputs' ledger in `midiva.ledger`.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from midiva.errors import OutputError, SourceError
from midiva.midi import MAX_MIDI_BYTES, read_regular_file

log = logging.getLogger(__name__)

HUB_DATASET = "Metacreation/GigaMIDI"
DEFAULT_HUB_CONFIG = "v1.0.0"
# v1.0.0 is the original release; the extended release (about 2.1 M files) is published as
# v2.0.0 (earlier revisions of the data set card named it v1.1.0). Any config name is passed on.
KNOWN_HUB_CONFIGS = ("v1.0.0", "v1.1.0", "v2.0.0")
HUB_SPLITS = ("train", "validation", "test")
MIDI_SUFFIXES = (".mid", ".midi", ".kar", ".smf")
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
            md5,
            name,
            split,
            None,
            meta,
            "DataError",
            f"{label} (md5 {md5}) has {kind} 'music' bytes; recorded as failed, the run goes on",
        )
    if claimed is not None and claimed != md5:
        return SourceRow(
            md5,
            name,
            split,
            None,
            meta,
            "DataError",
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
                files.extend(
                    sorted(p for p in directory.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file())
                )
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
        from midiva.atomic import write_text_atomic

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
                    _md5_of_file(path),
                    name,
                    "",
                    None,
                    {"title": display_name(path.stem)},
                    "MidiReadError",
                    f"{name!r} is {size / 2**20:.1f} MiB, above the {MAX_MIDI_BYTES // 2**20} MiB limit "
                    "for one MIDI file; skipped",
                )
                continue
        except OSError as err:
            # No bytes, so no content md5: the failure is keyed by the md5 of the path instead.
            yield SourceRow(
                hashlib.md5(os.fsencode(path)).hexdigest(),
                name,
                "",
                None,
                {"title": display_name(path.stem)},
                "MidiReadError",
                f"cannot read {name!r}: {err.strerror or err}; skipped",
            )
            continue
        md5 = hashlib.md5(data).hexdigest()
        if md5_cache is not None:
            md5_cache.record(name, stat.st_size, stat.st_mtime_ns, md5)
        yield SourceRow(md5, name, "", data, {"title": display_name(path.stem)})


MidiSource = Path | str | bytes | tuple[str, bytes]


def rows_from_midi(sources: Iterable[MidiSource]) -> Iterator[SourceRow]:
    """SourceRows of paths (read as `iter_files` does), raw bytes (named by their md5) or (name, bytes) pairs."""
    for source in sources:
        if isinstance(source, tuple):
            name, data = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            name = hashlib.md5(data).hexdigest()  # nameless bytes are shown by their md5
        else:
            yield from iter_files([Path(source)])  # an unreadable path becomes a failed row
            continue
        md5 = hashlib.md5(data).hexdigest()
        yield SourceRow(md5, name, "", data, {"title": Path(name).stem if name != md5 else ""})


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
        groups.setdefault(_split_from_path(file.relative_to(path) if path.is_dir() else Path(file.name)), []).append(
            str(file)
        )
    return groups


# How the hub's and requests' messages say "denied", as whole words: a file name such as 'song_401.mid'
# or 'aggregated.mid' inside another error's message must not read as access denied.
_ACCESS_DENIED = re.compile(
    r"\b40[13] client error\b|\bunauthori[sz]ed\b|\bgated (?:repo|dataset)\b|\bis a gated\b|\bmust be authenticated\b"
    r"|\bnot authenticated\b|\binvalid (?:user )?token\b",
    re.IGNORECASE,
)


def _is_access_error(err: BaseException) -> bool:
    """True for the ways `datasets`/`huggingface_hub` report a gated, unauthorised or forbidden repo.

    The HTTP status on the exception (`response.status_code` of huggingface_hub's and requests'
    HTTP errors) decides where there is one; otherwise only word-bounded phrases count.
    """
    names = {type(e).__name__ for e in _chain(err)}
    if names & {"GatedRepoError", "LocalTokenNotFoundError"}:
        return True
    for e in _chain(err):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            if status in (401, 403):
                return True
            continue  # another status (404, 500, ...) is not a denial, whatever the message quotes
        if _ACCESS_DENIED.search(str(e)):
            return True
    return False


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_missing_config(err: BaseException, config: str) -> bool:
    """Whether `datasets` says the config does not exist ("BuilderConfig 'x' not found", or a message that
    names the config as a config) — not any message that happens to contain the word 'config'."""
    for e in _chain(err):
        text = str(e)
        if re.search(r"BuilderConfig\b", text) or re.search(
            rf"\bconfig(?:uration)?(?: name)?\s*[:=]?\s*['\"]{re.escape(config)}['\"]", text, re.I
        ):
            return True
    return False


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
    if _is_missing_config(err, config):
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
    path: Path | str,
    *,
    splits: Sequence[str] | None = None,
    streaming: bool = True,
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
    return iter_hub(
        name_or_path, config=config, splits=splits or HUB_SPLITS, streaming=streaming, token=token, skip=skip
    )


def count_dataset_rows(
    name_or_path: str,
    *,
    config: str = DEFAULT_HUB_CONFIG,
    splits: Sequence[str] | None = None,
    token: str | None = None,
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

"""Input tables of the analysis stage: read and validate them before any statistic is computed.

Input: the annotation stage's CSV, one row per bar (`md5,bar_number,valence,arousal`; valence
and arousal unitless in [-1, 1]), its metadata table (`X.meta.csv`: `md5`,
`music_styles_curated` genres joined by `|`, `tempo` in bpm, ...) and failures ledger
(`X.failures.csv`: `md5,stage,error_type,message`). Output: validated lazy frames of the CSV
(one md5-hash bucket at a time, compact dtypes, a status byte per row saying which checks it
failed), `Metadata` (genres as lists, numeric columns parsed) and `FailureCounts`, plus the
`DataQuality` record in which the analysis reports those row counts.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from midiva.errors import DataError
from midiva.sources import LIST_SEPARATOR as GENRE_SEPARATOR  # how annotate writes genre lists

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("md5", "bar_number", "valence", "arousal")
GENRE_COLUMN = "music_styles_curated"
MD5_PATTERN = r"^[0-9a-fA-F]{32}$"
# Row status bits, set while scanning; a row is analysed only when its status is 0.
MISSING_MD5, BAD_BAR, MISSING_VALUE, NAN_VALUE, OUT_OF_RANGE = 1, 2, 4, 8, 16
# The DataQuality count that each status bit feeds.
STATUS_COUNTS = (
    ("n_missing_md5", MISSING_MD5),
    ("n_bad_bar_number", BAD_BAR),
    ("n_missing_values", MISSING_VALUE),
    ("n_nan_values", NAN_VALUE),
    ("n_out_of_range", OUT_OF_RANGE),
)
_IGNORED_META_COLUMNS = frozenset({"source", "split", "name", "status"})
NAME_COLUMNS = ("title", "artist")  # kept as text: how songs are named in tables and plots
PARQUET_MAGIC = b"PAR1"
_SCHEMA = {"md5": pl.String, "bar_number": pl.Int64, "valence": pl.Float64, "arousal": pl.Float64}


@dataclass(frozen=True)
class DataQuality:
    """What was read and what was excluded (rows may fail several checks at once).

    Attributes:
        n_missing_values: rows with valence or arousal empty or unparsable.
        n_out_of_range: rows with a value outside [-1, 1] (±inf included).
        n_duplicate_bars: valid rows repeating an (md5, bar_number); duplicates are averaged.
        n_malformed_md5: songs whose md5 is not 32 hex digits (kept, but won't match metadata).
    """

    annotations: str
    n_rows: int
    n_valid_rows: int
    n_missing_md5: int
    n_bad_bar_number: int
    n_missing_values: int
    n_nan_values: int
    n_out_of_range: int
    n_duplicate_bars: int
    n_songs: int
    n_malformed_md5: int
    extra_columns: tuple[str, ...]

    @property
    def n_excluded_rows(self) -> int:
        """Rows left out of every statistic."""
        return self.n_rows - self.n_valid_rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the excluded count."""
        return {**asdict(self), "extra_columns": list(self.extra_columns), "n_excluded_rows": self.n_excluded_rows}


@dataclass(frozen=True)
class FailureCounts:
    """The annotation run's failures ledger, counted."""

    path: str
    n_failures: int
    by_error_type: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Metadata:
    """The metadata table, reduced to what the analysis uses.

    Attributes:
        table: md5, `genres` (list of lower-case str; only with a genre column), numeric columns.
        numeric_columns: columns where at least half the non-empty values parse as numbers.
    """

    path: str
    table: pl.DataFrame
    has_genres: bool
    numeric_columns: tuple[str, ...]
    n_rows: int
    n_duplicate_md5: int


# ---------------------------------------------------------------- the annotations CSV


def sidecar_paths(annotations: Path | str) -> tuple[Path, Path]:
    """The default metadata and failures paths beside `X.csv` or `X.parquet`: `X.meta.csv`
    (`X.meta.parquet` when only that exists beside a Parquet table), `X.failures.csv`."""
    path = Path(annotations)
    stem = path.name
    for suffix in (".csv", ".parquet"):
        stem = stem.removesuffix(suffix) if stem.endswith(suffix) else stem
    meta = path.with_name(stem + ".meta.csv")
    if path.suffix == ".parquet" and not meta.exists() and path.with_name(stem + ".meta.parquet").exists():
        meta = path.with_name(stem + ".meta.parquet")
    return meta, path.with_name(stem + ".failures.csv")


def is_parquet(path: Path | str) -> bool:
    """True when the file starts with Parquet's magic bytes (tables are told apart by content, not name)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == PARQUET_MAGIC
    except OSError:
        return False


def read_header(path: Path | str) -> tuple[str, ...]:
    """Column names of an annotations table (CSV or Parquet).

    Raises:
        DataError: the file is missing, empty, or lacks a required column.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            first = handle.readline()
    except OSError as err:
        raise DataError(f"cannot read annotations {str(path)!r}: {err.strerror or err}") from err
    if not first.strip():
        raise DataError(f"annotations {str(path)!r} has no rows (the file is empty); was the annotation run empty?")
    if first.startswith(PARQUET_MAGIC):
        try:
            columns: tuple[str, ...] = tuple(pl.read_parquet_schema(path))
        except (OSError, pl.exceptions.ComputeError) as err:
            raise DataError(
                f"annotations {str(path)!r} starts like Parquet but cannot be read as Parquet: {err}"
            ) from err
    else:
        columns = tuple(c.strip().strip('"') for c in first.decode("utf-8-sig", "replace").strip().split(","))
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"annotations {str(path)!r} lacks column(s) {missing}; found {list(columns)}, "
            f"expected header {','.join(REQUIRED_COLUMNS)} (the `midiva annotate` format)"
        )
    return columns


def estimate_rows(path: Path) -> int:
    """Rows of a CSV, estimated from the line length of its first MiB (at least 1); a Parquet file's exact count."""
    if is_parquet(path):
        import pyarrow.parquet as pq

        return max(1, pq.ParquetFile(path).metadata.num_rows)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        sample = handle.read(1 << 20)
    lines = max(1, sample.count(b"\n"))
    return int(size / (len(sample) / lines)) + 1


def _status_expr() -> pl.Expr:
    v, a, bar = pl.col("valence"), pl.col("arousal"), pl.col("bar_number")

    def out_of_range(c: pl.Expr) -> pl.Expr:
        return (c.is_not_nan() & ((c < -1.0) | (c > 1.0))).fill_null(False)

    flags = [
        (pl.col("md5").is_null() | (pl.col("md5") == ""), MISSING_MD5),
        (bar.is_null() | (bar < 0) | (bar > 2**31 - 1), BAD_BAR),
        (v.is_null() | a.is_null(), MISSING_VALUE),
        ((v.is_nan() | a.is_nan()).fill_null(False), NAN_VALUE),
        (out_of_range(v) | out_of_range(a), OUT_OF_RANGE),
    ]
    status = pl.lit(0, dtype=pl.UInt8)
    for flag, bit in flags:
        status = status | (flag.cast(pl.UInt8) * bit)
    return status.alias("status")


def scan_annotations(path: Path, bucket: int = 0, n_buckets: int = 1) -> pl.LazyFrame:
    """One md5-hash bucket of the CSV, lazily: compact columns plus a `status` byte per row.

    Columns: md5 (Categorical), bar_number (Int32, clipped to [-1, 2**31 - 1]), valence and
    arousal (Float32), status (UInt8, bits MISSING_MD5 ... OUT_OF_RANGE; 0 = valid row).
    """
    if is_parquet(path):
        lf = pl.scan_parquet(path).select(pl.col(c).cast(t, strict=False) for c, t in _SCHEMA.items())
    else:
        lf = pl.scan_csv(path, schema_overrides=_SCHEMA, ignore_errors=True).select(REQUIRED_COLUMNS)
    if n_buckets > 1:
        lf = lf.filter(pl.col("md5").fill_null("").hash(seed=0) % n_buckets == bucket)
    return lf.select(
        pl.col("md5").cast(pl.Categorical),
        pl.col("bar_number").clip(-1, 2**31 - 1).cast(pl.Int32),
        pl.col("valence").cast(pl.Float32),
        pl.col("arousal").cast(pl.Float32),
        _status_expr(),
    )


def read_bucket(path: Path, bucket: int, n_buckets: int) -> pl.DataFrame:
    """`scan_annotations`, collected with the streaming engine.

    Raises:
        DataError: the file cannot be parsed as CSV (or Parquet).
    """
    try:
        return scan_annotations(path, bucket, n_buckets).collect(engine="streaming")
    except (pl.exceptions.ComputeError, pl.exceptions.InvalidOperationError) as err:
        raise DataError(
            f"annotations {str(path)!r} is malformed and cannot be parsed as CSV: {err}; fix or re-merge the file"
        ) from err


# ---------------------------------------------------------------- metadata and failures


def load_metadata(path: Path | str) -> Metadata:
    """Read `X.meta.csv` (or its Parquet copy): genres split on `|`, numbers parsed, title and artist
    kept as text, duplicate md5s dropped (first kept).

    Raises:
        DataError: unreadable file, or no `md5` column.
    """
    path = Path(path)
    try:
        if is_parquet(path):
            lf = pl.scan_parquet(path)
            lf = lf.select(pl.all().cast(pl.String))
        else:
            lf = pl.scan_csv(path, infer_schema=False)
        columns = lf.collect_schema().names()
        keep = [c for c in columns if c not in _IGNORED_META_COLUMNS]
        raw = lf.select(keep).collect()
    except (OSError, pl.exceptions.NoDataError, pl.exceptions.ComputeError) as err:
        raise DataError(f"cannot read metadata {str(path)!r}: {err}; pass --meta PATH or --no-meta") from err
    if "md5" not in columns:
        raise DataError(
            f"metadata {str(path)!r} has no 'md5' column (found {columns}); it must be the X.meta.csv beside the annotations"
        )
    n_rows = raw.height
    raw = raw.filter(pl.col("md5").is_not_null()).unique("md5", keep="first", maintain_order=True)
    exprs: list[pl.Expr] = [pl.col("md5").str.strip_chars()]
    has_genres = GENRE_COLUMN in raw.columns
    if has_genres:
        element = pl.element()
        exprs.append(
            pl.col(GENRE_COLUMN)
            .fill_null("")
            .str.split(GENRE_SEPARATOR)
            .list.eval(element.str.strip_chars().str.to_lowercase())
            .list.eval(element.filter(element != ""))
            .list.unique(maintain_order=True)
            .alias("genres")
        )
    exprs += [pl.col(name).fill_null("").str.strip_chars() for name in NAME_COLUMNS if name in raw.columns]
    numeric: list[str] = []
    for name in raw.columns:
        if name in ("md5", GENRE_COLUMN, *NAME_COLUMNS):
            continue
        text = raw[name].str.strip_chars()
        parsed = text.cast(pl.Float64, strict=False)
        non_empty = int((text.is_not_null() & (text != "")).sum())
        if non_empty and parsed.is_not_null().sum() >= 0.5 * non_empty:
            numeric.append(name)
            exprs.append(pl.col(name).str.strip_chars().cast(pl.Float64, strict=False))
    table = raw.select(exprs)
    if "n_notes" in numeric and "n_bars" in numeric:
        # note density: the notes per bar of the whole file, from the metadata's own counts
        table = table.with_columns(
            pl.when(pl.col("n_bars") > 0).then(pl.col("n_notes") / pl.col("n_bars")).alias("notes_per_bar")
        )
        numeric.append("notes_per_bar")
    return Metadata(str(path), table, has_genres, tuple(numeric), n_rows, n_rows - raw.height)


def count_failures(path: Path | str) -> FailureCounts | None:
    """Count the failures ledger (`md5,stage,error_type,message`); None when unreadable."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return FailureCounts(str(path), 0, ())
        table = pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.NoDataError, pl.exceptions.ComputeError) as err:
        log.warning("failures ledger %s is unreadable (%s); its failures are not counted", path, err)
        return None
    by_type: tuple[tuple[str, int], ...] = ()
    if "error_type" in table.columns:
        counts = table.group_by("error_type").len().sort(["len", "error_type"], descending=[True, False])
        by_type = tuple((str(t), int(n)) for t, n in counts.iter_rows())
    return FailureCounts(str(path), table.height, by_type)

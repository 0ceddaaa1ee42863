"""Atomic file output: a file is either its old version or its complete new one, never a part.

Input: the bytes, text, JSON value or CSV rows of one output file, or a writer that needs a file
name (safetensors, matplotlib, polars). Output: the file at its path. Every writer goes through
`atomic_output`: write a temporary file in the target's directory, fsync it, `os.replace` it over
the target, then fsync the directory. An `OSError` becomes an `OutputError` that names the file
and says what to do; the temporary file is removed. Text is UTF-8 and written byte for byte (no
newline translation), so a caller's "\\n" is what lands on disk.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from midiva.errors import OutputError

log = logging.getLogger(__name__)

DEFAULT_HINT = "check that the directory exists, is writable and has free space, or choose another output"
_SEQUENCE = itertools.count()  # unique temp names for threads of one process writing the same target


def temporary_path(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique per process and call, ending in '.tmp'."""
    return path.with_name(f".{path.name}.{os.getpid()}-{next(_SEQUENCE)}.tmp")


def _fsync(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Path | str, *, what: str = "", hint: str = DEFAULT_HINT) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it replaces `path` (parents are created).

    Args:
        path: the file to (re)place.
        what: how the error names the file, e.g. 'the model' -> "cannot write the model to 'm.safetensors'".
        hint: what the error tells the user to do.

    Raises:
        OutputError: the file cannot be written, synced or renamed (the temporary file is removed).
    """
    target = Path(path)
    tmp = temporary_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        name = f"{what} to {str(target)!r}" if what else repr(str(target))
        raise OutputError(f"cannot write {name}: {err.strerror or err}; {hint}") from err
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    # The rename is durable only once the directory entry is; some filesystems cannot sync a directory.
    try:
        _fsync(target.parent, directory=True)
    except OSError as err:
        log.debug("cannot fsync directory %s: %s", target.parent, err)


def write_bytes_atomic(path: Path | str, data: bytes, *, what: str = "", hint: str = DEFAULT_HINT) -> Path:
    """Write `data` to `path` atomically; returns the path.

    Raises:
        OutputError: the file cannot be written.
    """
    with atomic_output(path, what=what, hint=hint) as tmp, open(tmp, "xb") as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: Path | str, text: str, *, what: str = "", hint: str = DEFAULT_HINT) -> Path:
    """Write `text` as UTF-8 to `path` atomically, byte for byte; returns the path.

    Raises:
        OutputError: the file cannot be written.
    """
    return write_bytes_atomic(path, text.encode("utf-8"), what=what, hint=hint)


def write_json_atomic(path: Path | str, value: Any, *, hint: str = DEFAULT_HINT, **dump_options: Any) -> Path:
    """Write `json.dumps(value, **dump_options)` plus a final newline to `path` atomically.

    Raises:
        OutputError: the file cannot be written.
    """
    return write_text_atomic(path, json.dumps(value, **dump_options) + "\n", hint=hint)


def write_csv_atomic(
    path: Path | str, fields: Sequence[str], rows: Iterable[Mapping[str, Any]], *, hint: str = DEFAULT_HINT
) -> Path:
    """Write rows as CSV (header first, '\\n' line ends) to `path` atomically.

    Raises:
        OutputError: the file cannot be written.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue(), hint=hint)

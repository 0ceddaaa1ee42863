"""One writer per output: an exclusive lock beside it that names its holder (PID and host).

Input: an output path (e.g. `annotations.csv`). Output: `<output>.lock`, holding one JSON record
`{"midiva_lock": 1, "pid", "host", "started", "process_start", "label", "out"}` of the process
that holds an OS lock (`flock`) on it; removed again when the holder releases it.

The kernel lock is the authority: it goes away when its holder dies (kill -9 included), so a lock
file left by a dead process is taken over at once, and a live holder always wins. The record only
names the holder in messages and in `midiva status`. A record that is not midiva's (damaged, or
another program's file) is reported and never overwritten. A filesystem that refuses locks (some
network filesystems) is reported too; `enabled=False` (`--no-lock`) is the documented override for a
writer that makes sure of being the only one by other means.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from midiva.errors import OutputError, OutputLockedError

log = logging.getLogger(__name__)

LOCK_FORMAT = 1
MAX_RECORD_BYTES = 4096
# errno values of filesystems that do not implement flock (NFS without lockd, Lustre without -o flock, FUSE).
UNSUPPORTED_ERRNOS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) an output lock, as recorded in its lock file."""

    pid: int
    host: str
    started: str
    process_start: int | None
    label: str
    out: str

    def describe(self) -> str:
        """'PID 123 on host n1 (shard 2 of 4), since 2026-12-01T21:00:00Z'."""
        label = f" ({self.label})" if self.label else ""
        return f"PID {self.pid} on host {self.host}{label}, since {self.started}"

    def is_alive_here(self) -> bool | None:
        """Whether the holder still runs: None when it ran on another host (cannot be checked from here)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: it exists
            pass
        start = _process_start(self.pid)
        return self.process_start is None or start is None or start == self.process_start


def lock_path_for(target: Path | str) -> Path:
    """The lock file of an output: `annotations.csv` -> `annotations.csv.lock`."""
    path = Path(target)
    return path.with_name(path.name + ".lock")


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused PID apart); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def parse_record(data: bytes) -> LockHolder | None:
    """The holder in a lock file's bytes; None when they are not a midiva lock record."""
    try:
        record = json.loads(data.decode("utf-8"))
        if not isinstance(record, dict) or record.get("midiva_lock") != LOCK_FORMAT:
            return None
        start = record.get("process_start")
        return LockHolder(
            pid=int(record["pid"]),
            host=str(record["host"]),
            started=str(record["started"]),
            process_start=None if start is None else int(start),
            label=str(record.get("label", "")),
            out=str(record.get("out", "")),
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def read_holder(target: Path | str) -> tuple[LockHolder | None, bytes]:
    """The recorded holder of `target`'s lock and the raw bytes (None, b'' when there is no lock file).

    The record is informative only (`midiva status`): whether the lock is held is the kernel's answer.
    """
    try:
        data = lock_path_for(target).read_bytes()[:MAX_RECORD_BYTES]
    except FileNotFoundError:
        return None, b""
    except OSError as err:  # a folder of that name, no permission: not a record to trust
        return None, f"unreadable: {err.strerror or err}".encode()
    return parse_record(data), data


def _foreign(path: Path, target: Path, data: bytes) -> OutputError:
    return OutputError(
        f"{str(path)!r} is not a midiva lock record (it starts with {data[:60]!r}): another program uses this "
        "name or the file is damaged, so who writes the output is unknown. Make sure no other process writes "
        f"{str(target)!r}, then delete {path.name!r} and rerun"
    )


class OutputLock:
    """An acquired lock on one output; release it (or leave the `with` block) when done writing."""

    def __init__(self, target: Path, path: Path, fd: int | None) -> None:
        self.target, self.path, self._fd = target, path, fd

    @property
    def held(self) -> bool:
        """True until released (False from the start for a disabled lock)."""
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and drop the OS lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Unlink while still holding the lock: a process that opened the old file re-checks the inode.
            with suppress(FileNotFoundError):
                self.path.unlink()
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_output_lock(target: Path | str, *, label: str = "", enabled: bool = True) -> OutputLock:
    """Take the exclusive lock of `target` or raise, naming the process that holds it.

    Args:
        target: the output the lock protects (its lock file is `lock_path_for(target)`).
        label: what this run is (e.g. 'shard 2 of 4, Slurm job 81_2'), shown to a process refused by it.
        enabled: False takes no lock (a filesystem without working locks, one writer ensured otherwise).

    Raises:
        OutputLockedError: a live process holds the lock (or writes `target` with locking disabled).
        OutputError: the lock file is not midiva's, the filesystem has no working locks, or the
            directory is not writable.
    """
    target = Path(target)
    path = lock_path_for(target)
    if not enabled:
        log.warning("not locking %s (--no-lock): make sure no other process writes it", target)
        return OutputLock(target, path, None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"cannot create {str(path.parent)!r}: {err.strerror or err}; choose a writable --out"
        ) from err
    for _ in range(100):  # another process may remove the file between our open and flock: retry
        fd = _open_and_lock(path, target)
        try:
            if _same_file(fd, path):
                _take_over(fd, path, target, label)
                return OutputLock(target, path, fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OutputError(f"could not lock {str(path)!r}: it keeps being replaced; is another program deleting it?")


def _open_and_lock(path: Path, target: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OutputError(f"{str(path)!r} is a symbolic link, not a midiva lock file; remove it and rerun") from err
        raise OutputError(
            f"cannot create the lock file {str(path)!r}: {err.strerror or err}; choose a writable --out"
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        data = os.pread(fd, MAX_RECORD_BYTES, 0)
        os.close(fd)
        holder = parse_record(data)
        if holder is None and data:
            raise _foreign(path, target, data) from err
        who = holder.describe() if holder else "another process (it has not written its record yet)"
        raise OutputLockedError(
            f"{str(target)!r} is being written by {who}; one output has one writer — wait for that run to "
            f"finish or stop it, or give this run another --out"
        ) from err
    except OSError as err:
        os.close(fd)
        if err.errno in UNSUPPORTED_ERRNOS:
            raise OutputError(
                f"the filesystem of {str(path.parent)!r} does not support file locks ({err.strerror or err}), "
                f"so midiva cannot make sure that only one process writes {str(target)!r}. Put --out on a "
                "filesystem with working locks (local disk, or NFS with lockd), or, if you make sure yourself "
                "that one process writes it, pass --no-lock"
            ) from err
        raise OutputError(f"cannot lock {str(path)!r}: {err.strerror or err}") from err
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _take_over(fd: int, path: Path, target: Path, label: str) -> None:
    """We hold the OS lock: check what the file says about a previous holder, then write our record."""
    data = os.pread(fd, MAX_RECORD_BYTES, 0)
    if data:
        holder = parse_record(data)
        if holder is None:
            raise _foreign(path, target, data)
        alive = holder.pid != os.getpid() and holder.is_alive_here()
        if alive:  # it runs but does not hold the lock: --no-lock, or locks that do not work here
            raise OutputLockedError(
                f"{str(target)!r} is being written by {holder.describe()} without holding its lock (it runs "
                "with --no-lock, or this filesystem ignores locks); stop it or wait for it, then rerun"
            )
        where = "is no longer running" if alive is False else "cannot be checked from this host; its lock was free"
        log.info("taking over the lock of %s: %s left by %s, which %s", target, path.name, holder.describe(), where)
    record = {
        "midiva_lock": LOCK_FORMAT,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "process_start": _process_start(os.getpid()),
        "label": label,
        "out": str(target),
    }
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    # Short enough for one write; a kill between truncate and write leaves an empty file, read as free.
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)
        os.fsync(fd)
    except OSError as err:
        raise OutputError(
            f"cannot write the lock file {str(path)!r}: {err.strerror or err}; choose a writable --out"
        ) from err

"""Stage 1: read MIDI bytes into a symusic Score.

Input: a path or the raw bytes of a Standard MIDI File (GigaMIDI stores bytes).
Output: `LoadedMidi` — the symusic Score in the file's own ticks (no resampling: MuseTok's
tick rescaling is reproduced exactly in `midiva.events`), the md5 of the bytes, and the
SMF format from the header. This is the only place that catches symusic's RuntimeError.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy.typing as npt
from symusic.core import ScoreTick

from midiva.errors import MidiReadError

# Larger files are almost always generated noise; refusing them keeps one file from stalling a batch.
MAX_MIDI_BYTES = 32 * 1024 * 1024
# Memory per file grows with its notes (about 0.4 kB per note through events and features): with the
# byte cap this bounds one worker's peak memory (README, "Memory"; benchmarks/bench_memory.py).
MAX_NOTES = 500_000
# When a track ends inside an event, symusic reads the event's type and length from whatever memory
# follows the file before it refuses it, and reports a cursor position computed from those bytes; the
# numbers are dropped so that the message (and failures.csv) depends on the file alone.
_OVERREAD_MESSAGE = re.compile(r"Cursor would be \d+ bytes? beyond the end of buffer with previous event length \d+!?")
MIN_TICKS_PER_QUARTER = 1  # 0 would divide by zero; coarse files rescale like any other
MAX_TICKS_PER_QUARTER = 32767  # the largest value the 15-bit SMF division field can hold


@dataclass(frozen=True)
class LoadedMidi:
    """A parsed MIDI file and where it came from.

    Attributes:
        score: symusic Score in the file's own ticks (`score.ticks_per_quarter`).
        md5: hex md5 of the file's bytes (GigaMIDI's key).
        name: file name, or the md5 when the input was bytes without a name.
        midi_format: SMF format from the header (0, 1 or 2).
        n_bytes: size of the file in bytes.
    """

    score: ScoreTick
    md5: str
    name: str
    midi_format: int
    n_bytes: int

    @functools.cached_property
    def note_arrays(self) -> tuple[dict[str, npt.NDArray[Any]], ...]:
        """Each track's notes as symusic's arrays ('time', 'duration', 'pitch', 'velocity'), read-only.

        Converted on first use and kept: the events and the features stage both read them, and one
        conversion costs about as much as parsing a small file. Valid while `score` is not modified.
        """
        arrays = tuple(track.notes.numpy() for track in self.score.tracks)
        for track_arrays in arrays:
            for array in track_arrays.values():
                array.flags.writeable = False
        return arrays


def read_midi_bytes(src: Path | str | bytes) -> tuple[bytes, str]:
    """Return the bytes of `src` and a display name (the md5 for bytes); bytes pass through unchanged.

    Raises:
        MidiReadError: the path cannot be read, is not a regular file, or is too large.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        return data, hashlib.md5(data).hexdigest()
    path = Path(src)
    try:
        content = read_regular_file(path, MAX_MIDI_BYTES)
    except OSError as err:
        raise MidiReadError(f"cannot read {str(path)!r}: {err.strerror or err}") from err
    if content is None:
        raise MidiReadError(
            f"{path.name!r} is {path.stat().st_size / 2**20:.1f} MiB, above the {MAX_MIDI_BYTES // 2**20} MiB "
            "limit for one MIDI file; skipped"
        )
    return content, path.name


def read_regular_file(path: Path, max_bytes: int) -> bytes | None:
    """The bytes of a regular file, or None when it holds more than `max_bytes`.

    A FIFO, a device (/dev/zero) or a socket is refused before it is opened: reading one blocks
    forever or never ends.

    Raises:
        OSError: the file cannot be read (errno EINVAL with a message for non-regular files).
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "a device or socket"
        raise OSError(22, f"{kind}, not a regular file; only regular files are read")
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)  # bounded even if the file grows while it is read
    return None if len(data) > max_bytes else data


def load_midi(src: Path | str | bytes, *, name: str | None = None) -> LoadedMidi:
    """Parse a MIDI file (path or bytes) with symusic, keeping its own tick resolution.

    Args:
        src: path to a .mid file, or its raw bytes.
        name: display name for messages (default: the file name, or the md5 for bytes).

    Raises:
        MidiReadError: empty, truncated, corrupt, oversized (bytes or notes), not a regular file, or a
            tick resolution of 0 or SMPTE.
    """
    if isinstance(src, (bytes, bytearray, memoryview)) and len(src) > MAX_MIDI_BYTES:
        # checked before hashing, so an oversized blob is refused at once
        label = name or "<bytes>"
        raise MidiReadError(
            f"{label!r} is {len(src) / 2**20:.1f} MiB, above the {MAX_MIDI_BYTES // 2**20} MiB limit; skipped"
        )
    data, default_name = read_midi_bytes(src)
    md5 = default_name if isinstance(src, (bytes, bytearray, memoryview)) else hashlib.md5(data).hexdigest()
    label = name or default_name
    if len(data) == 0:
        raise MidiReadError(f"{label!r} is a zero-length file; skipped")
    if len(data) < 14 or data[:4] != b"MThd":
        raise MidiReadError(f"{label!r} is not a Standard MIDI File (no 'MThd' header); skipped")
    midi_format = int.from_bytes(data[8:10], "big")
    division = int.from_bytes(data[12:14], "big")
    if division > MAX_TICKS_PER_QUARTER:  # the top bit is set: frames per second x ticks per frame follow
        raise MidiReadError(
            f"{label!r} has a time division of {division} (0x{division:04x}), above the {MAX_TICKS_PER_QUARTER} ticks "
            "per quarter note a header can give: it is SMPTE time division, which MuseTok's beat grid cannot express; skipped"
        )
    if division < MIN_TICKS_PER_QUARTER:
        raise MidiReadError(
            f"{label!r} has {division} ticks per quarter note, which cannot place notes in time; skipped"
        )
    try:
        score = ScoreTick.from_midi(data)
    except RuntimeError as err:  # symusic reports every parse failure as RuntimeError
        reason = _OVERREAD_MESSAGE.sub("(the data ends inside this event)", str(err))
        raise MidiReadError(f"{label!r} could not be parsed as MIDI: {reason}") from err
    n_notes = score.note_num()
    if n_notes > MAX_NOTES:
        raise MidiReadError(
            f"{label!r} has {n_notes:,} notes, above the limit of {MAX_NOTES:,} per file that bounds a "
            "worker's memory; skipped"
        )
    return LoadedMidi(score=score, md5=md5, name=label, midi_format=midi_format, n_bytes=len(data))

"""Seeded generator of malformed (and valid) Standard MIDI Files, and the properties a run must keep.

One copy, used by the short run in the test suite (`tests/fuzz/test_fuzz.py`) and the long run
(`benchmarks/fuzz.py`). `generate(seed, n, seeds=...)` returns `n` (name, bytes) cases drawn from
the families below, the same bytes for the same seed on every machine. `check_outputs` reads one
`midiva annotate` output and returns what broke the properties: every file has one record (no
lost record), every value is finite and in [-1, 1], bars are 0..n-1, every failure has a midiva
error type, and no worker crashed. Comparing two runs' tables byte for byte is the last property.
"""

from __future__ import annotations

import csv
import hashlib
import random
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import midiva.errors

TYPED_ERRORS = frozenset(
    name
    for name, value in vars(midiva.errors).items()
    if isinstance(value, type) and issubclass(value, midiva.errors.MidivaError)
)


# ---------------------------------------------------------------- building blocks


def vlq(value: int) -> bytes:
    """MIDI variable-length quantity (any size: oversized ones are part of the abuse)."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def header(fmt: int = 1, n_tracks: int = 1, division: int = 480, length: int = 6) -> bytes:
    body = struct.pack(">HHH", fmt & 0xFFFF, n_tracks & 0xFFFF, division & 0xFFFF)
    return b"MThd" + struct.pack(">I", length) + (body + bytes(max(0, length - 6)))[:length]


def chunk(data: bytes, kind: bytes = b"MTrk", length: int | None = None) -> bytes:
    return kind + struct.pack(">I", (len(data) if length is None else length) & 0xFFFFFFFF) + data


def meta(kind: int, data: bytes, delta: int = 0, length: int | None = None) -> bytes:
    return vlq(delta) + bytes([0xFF, kind]) + vlq(len(data) if length is None else length) + data


def tempo(us_per_quarter: int, delta: int = 0) -> bytes:
    return meta(0x51, us_per_quarter.to_bytes(3, "big", signed=False)[-3:], delta)


def time_signature(numerator: int, denominator_power: int, delta: int = 0) -> bytes:
    return meta(0x58, bytes([numerator & 0xFF, denominator_power & 0xFF, 24, 8]), delta)


END_OF_TRACK = meta(0x2F, b"")


def notes(rng: random.Random, n: int, *, channel: int = 0, step: int = 240, running_status: bool = False) -> bytes:
    """`n` notes one after another: note-on, note-off (velocity 0 with running status)."""
    out = bytearray()
    status = None
    for _ in range(n):
        pitch, velocity = rng.randrange(21, 109), rng.randrange(1, 128)
        for delta, vel in ((rng.randrange(0, step + 1), velocity), (rng.randrange(1, 2 * step), 0)):
            on = 0x90 | channel
            out += vlq(delta)
            if not (running_status and status == on):
                out.append(on)
                status = on
            out += bytes([pitch, vel])
    return bytes(out)


def valid_midi(
    rng: random.Random, n_notes: int = 64, *, n_tracks: int = 2, division: int = 480, text: bytes = b""
) -> bytes:
    """A well-formed format-1 file: a tempo/time-signature track, then tracks of notes."""
    conductor = tempo(rng.choice((400_000, 500_000, 600_000))) + time_signature(rng.choice((3, 4, 6)), 2)
    if text:
        conductor += meta(0x01, text)
    tracks = [chunk(conductor + END_OF_TRACK)]
    for t in range(n_tracks - 1):
        tracks.append(chunk(notes(rng, n_notes, channel=t % 9, running_status=bool(t % 2)) + END_OF_TRACK))
    return header(1, len(tracks), division) + b"".join(tracks)


def split_chunks(data: bytes) -> tuple[bytes, list[bytes]] | None:
    """(header chunk, track payloads) of a well-formed file; None when the chunk layout is broken."""
    if data[:4] != b"MThd" or len(data) < 14:
        return None
    pos = 8 + struct.unpack(">I", data[4:8])[0]
    head, tracks = data[:pos], []
    while pos + 8 <= len(data):
        length = struct.unpack(">I", data[pos + 4 : pos + 8])[0]
        tracks.append(data[pos + 8 : pos + 8 + length])
        pos += 8 + length
    return head, tracks


# ---------------------------------------------------------------- families of malformed files


def _header_abuse(rng: random.Random, base: bytes) -> bytes:
    body = base[14:]
    choice = rng.randrange(8)
    if choice == 0:
        return b"MThd" + struct.pack(">I", rng.choice((0, 1, 5, 7, 100, 0xFFFFFFFF))) + base[8:]
    if choice == 1:
        return header(fmt=rng.choice((2, 3, 255, 0xFFFF)), n_tracks=2) + body
    if choice == 2:
        return header(n_tracks=rng.choice((0, 1, 3, 100, 0xFFFF))) + body
    if choice == 3:
        return base[: rng.randrange(0, 14)]
    if choice == 4:
        return rng.choice((b"MTHD", b"RIFF", b"\0\0\0\0", b"MThd"[::-1])) + base[4:]
    if choice == 5:
        return header(length=rng.choice((8, 12, 64))) + body
    if choice == 6:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))  # no header at all
    return b""  # zero bytes


def _division(rng: random.Random, base: bytes) -> bytes:
    division = rng.choice((0, 1, 2, 3, 7, 0x7FFF, 0x8000, 0xE250, 0xFFFF, rng.randrange(0x10000)))
    return base[:12] + struct.pack(">H", division) + base[14:]


def _running_status(rng: random.Random, base: bytes) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:  # data bytes with no status before them
        body = bytes([0, 60, 64, 10, 62, 0]) + notes(rng, 8)
    elif choice == 1:  # running status across a meta event and a sysex
        body = bytes([0, 0x90, 60, 64]) + meta(0x01, b"x") + bytes([0, 62, 64]) + bytes([0, 0xF0, 1, 0xF7, 0, 64, 0])
    elif choice == 2:  # undefined and real-time status bytes inside a track
        body = b"".join(bytes([0, rng.choice((0xF1, 0xF4, 0xF5, 0xF9, 0xFD, 0xF8, 0xFE)), 60, 64]) for _ in range(6))
    elif choice == 3:  # a status byte where a data byte belongs
        body = bytes([0, 0x90, 0x90, 0x90, 0, 0x80, 60, 0x80])
    else:  # a channel event cut short at the end of the track
        body = notes(rng, 4) + bytes([0, rng.choice((0x90, 0xC0, 0xE0, 0xB0))])
    return header(0, 1) + chunk(body + (END_OF_TRACK if rng.random() < 0.5 else b""))


def _meta_lengths(rng: random.Random, base: bytes) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:  # a length past the end of the track
        body = notes(rng, 4) + meta(0x01, b"abc", length=rng.choice((4, 100, 0x0FFFFFFF)))
    elif choice == 1:  # a 5-byte (oversized) length quantity
        body = notes(rng, 4) + bytes([0, 0xFF, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]) + b"abc"
    elif choice == 2:  # tempo / time signature / key signature with the wrong number of bytes
        kind = rng.choice((0x51, 0x58, 0x59, 0x54))
        body = meta(kind, bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 2, 5, 9))))) + notes(rng, 8)
    elif choice == 3:  # the track ends inside a meta event (the symusic overread)
        body = rng.choice((b"\x00\xff", b"\x00\xff\x51", b"\x00\xff\x51\x83", notes(rng, 2) + b"\x00\xff"))
    elif choice == 4:  # a sysex whose length runs past the end
        body = notes(rng, 3) + bytes([0, 0xF0]) + vlq(rng.choice((10, 1000))) + b"\x7e"
    else:  # end of track first, then more events
        body = END_OF_TRACK + notes(rng, 6)
    return header(0, 1) + chunk(body)


def _tempo_and_time_signature(rng: random.Random, base: bytes) -> bytes:
    events = b""
    for _ in range(rng.randrange(1, 6)):
        if rng.random() < 0.5:
            events += tempo(rng.choice((0, 1, 2, 0xFFFFFF, rng.randrange(1 << 24))), delta=rng.randrange(0, 2000))
        else:
            numerator = rng.choice((0, 1, 2, 3, 4, 5, 7, 13, 31, 64, 255))
            power = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, 31, 255))
            events += time_signature(numerator, power, delta=rng.randrange(0, 2000))
    return header(0, 1, rng.choice((96, 480, 1, 7))) + chunk(events + notes(rng, rng.randrange(1, 80)) + END_OF_TRACK)


def _track_counts(rng: random.Random, base: bytes) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:  # many empty tracks
        n = rng.choice((16, 300, 2000))
        return header(1, n) + chunk(END_OF_TRACK) * n
    if choice == 1:  # declared length longer / shorter than the data
        body = notes(rng, 16) + END_OF_TRACK
        return header(0, 1) + chunk(body, length=len(body) + rng.choice((-7, -1, 1, 50, 0xFFFFFF)))
    if choice == 2:  # unknown chunks between tracks
        return header(1, 2) + chunk(b"junk", b"XFIH") + chunk(notes(rng, 8) + END_OF_TRACK) + chunk(b"", b"MTrk")
    if choice == 3:  # a track chunk claiming 4 GiB
        return header(0, 1) + b"MTrk\xff\xff\xff\xff" + notes(rng, 4)
    return header(1, 8) + b"".join(chunk(notes(rng, 4, channel=9) + END_OF_TRACK) for _ in range(8))  # drums only


def _extreme_ticks(rng: random.Random, base: bytes) -> bytes:
    choice = rng.randrange(4)
    big = rng.choice((0x0FFFFFFF, 0x7FFFFFF, 10**7, 2**21))
    if choice == 0:  # a note, then a note very far away
        body = notes(rng, 2) + vlq(big) + bytes([0x90, 60, 64]) + vlq(10) + bytes([0x80, 60, 0])
    elif choice == 1:  # a note held for an extreme time
        body = bytes([0, 0x90, 60, 64]) + vlq(big) + bytes([0x80, 60, 0])
    elif choice == 2:  # many huge deltas in a row
        body = b"".join(vlq(big) + bytes([0x90, 40 + i, 64]) for i in range(20))
    else:  # notes that never end, and note-offs without notes
        body = b"".join(bytes([0, 0x90, p, 100]) for p in range(21, 109)) + b"".join(
            bytes([1, 0x80, p, 0]) for p in range(0, 128, 7)
        )
    return header(0, 1, rng.choice((1, 480, 0x7FFF))) + chunk(body + END_OF_TRACK)


def _byte_mutation(rng: random.Random, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(rng.randrange(1, 12)):
        op = rng.randrange(4)
        at = rng.randrange(len(data)) if data else 0
        if op == 0 and data:
            data[at] = rng.randrange(256)
        elif op == 1 and data:
            data[at] ^= 1 << rng.randrange(8)
        elif op == 2:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif data:
            del data[at : at + rng.randrange(1, 16)]
    if rng.random() < 0.2:
        data = data[: rng.randrange(len(data) + 1)]  # truncated
    return bytes(data)


def _track_mutation(rng: random.Random, base: bytes) -> bytes:
    """Mutate bytes inside one track, then fix its chunk length, so only the events are wrong."""
    parts = split_chunks(base)
    if parts is None or not parts[1]:
        return _byte_mutation(rng, base)
    head, tracks = parts
    i = rng.randrange(len(tracks))
    track = bytearray(tracks[i])
    for _ in range(rng.randrange(1, 6)):
        if not track:
            break
        at = rng.randrange(len(track))
        op = rng.randrange(3)
        if op == 0:
            track[at] = rng.choice((0x00, 0x7F, 0x80, 0xF0, 0xF7, 0xFF, rng.randrange(256)))
        elif op == 1:
            del track[at : at + rng.randrange(1, 4)]
        else:
            track[at:at] = rng.choice((b"\xff", b"\xf0", b"\x90", b"\x81\x80\x80\x80\x00", bytes([rng.randrange(256)])))
    tracks[i] = bytes(track)
    return head + b"".join(chunk(t) for t in tracks)


def _valid(rng: random.Random, base: bytes) -> bytes:
    return valid_midi(
        rng, rng.randrange(1, 200), n_tracks=rng.randrange(2, 5), division=rng.choice((96, 120, 384, 480, 960))
    )


FAMILIES: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "header": _header_abuse,
    "division": _division,
    "running_status": _running_status,
    "meta_length": _meta_lengths,
    "tempo_time_signature": _tempo_and_time_signature,
    "track_count": _track_counts,
    "extreme_ticks": _extreme_ticks,
    "byte_mutation": _byte_mutation,
    "track_mutation": _track_mutation,
    "valid": _valid,
}


def generate(seed: int, n: int, seeds: Sequence[bytes] = ()) -> list[tuple[str, bytes]]:
    """`n` cases as (file name, bytes): families in turn, each drawn from `random.Random(seed)`.

    Args:
        seeds: real MIDI files to mutate (valid generated files are used when none are given).
    """
    rng = random.Random(seed)
    names = list(FAMILIES)
    cases = []
    for i in range(n):
        family = names[i % len(names)]
        base = rng.choice(seeds) if seeds and rng.random() < 0.7 else valid_midi(rng, rng.randrange(4, 120))
        data = FAMILIES[family](rng, base)
        cases.append((f"{i:06d}_{family}.mid", data))
    return cases


def write_cases(cases: Sequence[tuple[str, bytes]], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in cases:
        path = directory / name
        path.write_bytes(data)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- properties


@dataclass
class RunCheck:
    """What one annotate output says about the properties."""

    files: int = 0
    annotated: int = 0
    failures_by_type: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def crashes(self) -> int:
        return self.failures_by_type.get("WorkerCrash", 0)

    @property
    def untyped(self) -> int:
        return sum(n for kind, n in self.failures_by_type.items() if kind not in TYPED_ERRORS or kind == "WorkerCrash")


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def check_outputs(out: Path, inputs: Sequence[Path]) -> RunCheck:
    """Check one `midiva annotate` output against the properties (see the module docstring)."""
    stem = out.with_suffix("")
    meta = _read(stem.with_name(stem.name + ".meta.csv"))
    failures = _read(stem.with_name(stem.name + ".failures.csv"))
    check = RunCheck(files=len(meta))
    expected = {hashlib.md5(p.read_bytes()).hexdigest() for p in inputs}
    seen = Counter(row["md5"] for row in meta)
    if set(seen) != expected:
        check.problems.append(
            f"lost records: {sorted(expected - set(seen))[:5]}, unexpected: {sorted(set(seen) - expected)[:5]}"
        )
    if any(n > 1 for n in seen.values()):
        check.problems.append(f"files recorded twice: {[m for m, n in seen.items() if n > 1][:5]}")
    bars: dict[str, int] = {r["md5"]: int(r["n_bars"] or 0) for r in meta if r["status"] == "ok"}
    check.annotated = len(bars)
    counts: Counter[str] = Counter()
    with open(out, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            md5 = row["md5"]
            if int(row["bar_number"]) != counts[md5]:
                check.problems.append(f"{md5}: bar_number {row['bar_number']} where {counts[md5]} was due")
            counts[md5] += 1
            for key in ("valence", "arousal"):
                value = float(row[key])
                if not -1.0 <= value <= 1.0:  # NaN fails this too
                    check.problems.append(f"{md5} bar {row['bar_number']}: {key} {row[key]}")
    if counts != Counter(bars):
        check.problems.append("rows per file differ from the meta table's n_bars")
    failed = {r["md5"] for r in meta if r["status"] == "failed"}
    if {r["md5"] for r in failures} != failed:
        check.problems.append("the failures table and the meta table disagree on which files failed")
    check.failures_by_type.update(r["error_type"] for r in failures)
    if check.untyped:
        kinds = {k: n for k, n in check.failures_by_type.items() if k not in TYPED_ERRORS or k == "WorkerCrash"}
        check.problems.append(f"untyped failures or crashes: {kinds}")
    return check


def output_bytes(out: Path) -> dict[str, bytes]:
    """The three tables of one output, for comparing runs byte for byte."""
    stem = out.with_suffix("")
    files = (out, stem.with_name(stem.name + ".meta.csv"), stem.with_name(stem.name + ".failures.csv"))
    return {p.name: p.read_bytes() for p in files}

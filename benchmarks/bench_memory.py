"""Peak memory of one parsing worker on the largest files the per-file limits let through.

    python benchmarks/bench_memory.py            # the limits as shipped
    python benchmarks/bench_memory.py --no-limits   # the same files with the note and bar caps lifted (before)
    python benchmarks/bench_memory.py --no-keep-freed-memory   # glibc's default trimming (workers keep freed memory)

Each file is parsed by `midiva.prepare.prepare_file` (read, events, features: what an annotate
worker does per file) in a fresh interpreter, and the child's peak RSS (ru_maxrss) is printed with
the outcome (VmHWM: the child's own peak). The files are built here: 31 MiB of notes (4 per tick, the densest), 1 M notes plus
31 MiB of controller events, files at the note cap, and one just under the bar cap.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIB = 2**20
CHILD = """
import json, resource, sys, time
import midiva.midi
import midiva.features
if sys.argv[2] == "off":
    midiva.midi.MAX_NOTES = midiva.features.MAX_FEATURE_BARS = 1 << 62
if sys.argv[3] == "on":
    from midiva.prepare import keep_freed_memory
    keep_freed_memory()
from pathlib import Path
from midiva.prepare import PrepareOptions, prepare_file
from midiva.sources import iter_files
t0 = time.perf_counter()
result = prepare_file(next(iter_files([Path(sys.argv[1])])), PrepareOptions())
try:  # VmHWM: this process's own peak (ru_maxrss carries the parent's over exec on Linux)
    status = Path("/proc/self/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
except OSError:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": time.perf_counter() - t0, "n_bars": result.n_bars, "error_type": result.error_type,
                  "error": result.error[:90], "peak_rss_mib": peak_kib / 1024}))
"""


def _track(body: bytes) -> bytes:
    body += b"\x00\xff\x2f\x00"
    return b"MTrk" + struct.pack(">I", len(body)) + body


def _header(n_tracks: int) -> bytes:
    return b"MThd" + struct.pack(">IHHH", 6, 1 if n_tracks > 1 else 0, n_tracks, 480)


def dense_notes(n_notes: int) -> bytes:
    """`n_notes` notes, 4 starting on each tick (8 bytes per note, no running status)."""
    i = np.arange(n_notes)
    ev = np.zeros((n_notes, 8), np.uint8)
    ev[:, 0] = np.where(i % 4 == 0, 1, 0)
    ev[:, 1], ev[:, 2], ev[:, 3] = 0x90, 21 + i % 88, 80
    ev[:, 5], ev[:, 6] = 0x80, 21 + i % 88
    return _header(1) + _track(ev.tobytes())


def notes_and_controllers(n_notes: int, total_bytes: int) -> bytes:
    """`n_notes` notes one tick apart, then controller events up to `total_bytes`."""
    i = np.arange(n_notes)
    ev = np.zeros((n_notes, 8), np.uint8)
    ev[:, 1], ev[:, 2], ev[:, 3] = 0x90, 40 + i % 48, 80
    ev[:, 4], ev[:, 5], ev[:, 6] = 10, 0x80, 40 + i % 48
    notes = _track(ev.tobytes())
    n_cc = max(0, (total_bytes - len(notes) - 40) // 4)
    cc = np.zeros((n_cc, 4), np.uint8)
    cc[:, 0], cc[:, 1], cc[:, 2], cc[:, 3] = 1, 0xB0, 1, np.arange(n_cc) % 128
    return _header(2) + notes + _track(cc.tobytes())


def many_bars(n_bars: int) -> bytes:
    """One note per bar for `n_bars` 4/4 bars."""
    bar = 4 * 480
    delta = bytes([0x80 | (bar - 10) >> 7, (bar - 10) & 0x7F])
    one = b"\x00\x90\x3c\x40\x0a\x80\x3c\x00"
    return _header(1) + _track(one + (delta + b"\x90\x3c\x40\x0a\x80\x3c\x00") * (n_bars - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--limits", action=argparse.BooleanOptionalAction, default=True, help="keep the note and bar caps"
    )
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc malloc settings of a parsing worker (midiva.prepare.keep_freed_memory)",
    )
    args = parser.parse_args()
    from midiva.features import MAX_FEATURE_BARS
    from midiva.midi import MAX_MIDI_BYTES, MAX_NOTES

    cases = {
        "a 4-note file (the worker's baseline)": lambda: many_bars(4),
        "31 MiB of notes (4.06 M notes, 4 per tick)": lambda: dense_notes(31 * MIB // 8),
        "1 M notes + controllers to 31 MiB": lambda: notes_and_controllers(1_000_000, 31 * MIB),
        f"{MAX_NOTES:,} notes (the cap), 4 per tick": lambda: dense_notes(MAX_NOTES),
        f"{MAX_NOTES:,} notes (the cap) + controllers to 31 MiB": lambda: notes_and_controllers(MAX_NOTES, 31 * MIB),
        f"{MAX_FEATURE_BARS:,} bars (the feature cap), one note each": lambda: many_bars(MAX_FEATURE_BARS),
        "99,000 bars (under the event cap), one note each": lambda: many_bars(99_000),
    }
    with tempfile.TemporaryDirectory() as tmp:
        print(
            f"limits: {'on' if args.limits else 'lifted'} (bytes {MAX_MIDI_BYTES // MIB} MiB, notes {MAX_NOTES:,}, "
            f"bars for features {MAX_FEATURE_BARS:,})"
        )
        print(f"{'file':<52} {'MiB':>6} {'peak RSS MiB':>12} {'s':>6}  outcome")
        for label, build in cases.items():
            path = Path(tmp) / "case.mid"
            data = build()
            path.write_bytes(data)
            t0 = time.perf_counter()
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(path),
                    "on" if args.limits else "off",
                    "on" if args.keep_freed_memory else "off",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            outcome = (
                f"{result['n_bars']} bars" if not result["error_type"] else f"{result['error_type']}: {result['error']}"
            )
            print(
                f"{label:<52} {len(data) / MIB:6.1f} {result['peak_rss_mib']:12.0f} {time.perf_counter() - t0:6.1f}  {outcome}"
            )


if __name__ == "__main__":
    main()

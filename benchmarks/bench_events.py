"""Benchmark `midiva.events`: MIDI bytes -> MuseTok events, single process, on EMOPIA and GigaMIDI.

    python benchmarks/bench_events.py [--shared ../shared] [--repeat 5] [--tracemalloc]

Reads every file into memory first, then times `midi_to_bars(bytes)` (symusic parse + events +
token ids) over each set, best of --repeat passes. Prints one line per set and a JSON summary:
files/s and bars/s per core (CPU time of this process, which is what a worker on a busy
machine gets) and by wall clock, ms per file (mean and p95 of single-file CPU times), the speed-up
over MuseTok's miditoolkit path (19 ms per EMOPIA clip, 116 s for 30 GigaMIDI-sample files), and
peak memory: the RSS high-water mark, and with --tracemalloc the Python-allocation peak of one
pass (traced separately: tracing slows the run).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from midiva.errors import MidivaError
from midiva.events import midi_to_bars

REPO = Path(__file__).resolve().parents[1]
# MuseTok's own timings on one core (see the issue): ms per file.
MUSETOK_MS_PER_FILE = {"emopia": 19.0, "gigamidi_sample": 116_000 / 30}


def convert_all(blobs: list[tuple[str, bytes]]) -> tuple[int, int, int, list[float]]:
    """Convert every blob; returns (files converted, bars, failures, CPU seconds per file)."""
    n_files = n_bars = n_failed = 0
    per_file = []
    for name, data in blobs:
        started = time.process_time()
        try:
            bars = midi_to_bars(data, name=name)
        except MidivaError:
            n_failed += 1
        else:
            n_files += 1
            n_bars += bars.n_bars
        per_file.append(time.process_time() - started)
    return n_files, n_bars, n_failed, per_file


def bench_set(name: str, folder: Path, repeat: int, trace: bool) -> dict[str, Any]:
    blobs = [(p.name, p.read_bytes()) for p in sorted(folder.glob("*.mid"))]
    if not blobs:
        raise SystemExit(f"no .mid files in {folder}; pass --shared")
    convert_all(blobs[:20])  # warm caches (grid tables, imports)
    best: dict[str, Any] = {}
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        n_files, n_bars, n_failed, per_file = convert_all(blobs)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if not best or cpu < best["cpu_s"]:
            best = {"cpu_s": cpu, "wall_s": wall, "per_file": per_file}
    per_file = sorted(best["per_file"])
    result = {
        "set": name,
        "files": len(blobs),
        "converted": n_files,
        "failed": n_failed,
        "bars": n_bars,
        "cpu_s": round(best["cpu_s"], 4),
        "wall_s": round(best["wall_s"], 4),
        "files_per_s_per_core": round(len(blobs) / best["cpu_s"], 1),
        "bars_per_s_per_core": round(n_bars / best["cpu_s"]),
        "files_per_s_wall": round(len(blobs) / best["wall_s"], 1),
        "ms_per_file_mean": round(1e3 * best["cpu_s"] / len(blobs), 4),
        "ms_per_file_median": round(1e3 * statistics.median(per_file), 4),
        "ms_per_file_p95": round(1e3 * per_file[int(0.95 * (len(per_file) - 1))], 4),
        "ms_per_file_max": round(1e3 * per_file[-1], 4),
        "speedup_vs_musetok": round(MUSETOK_MS_PER_FILE[name] / (1e3 * best["cpu_s"] / len(blobs)), 1),
    }
    if trace:
        tracemalloc.start()
        convert_all(blobs)
        result["tracemalloc_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
        tracemalloc.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="shared data folder")
    parser.add_argument(
        "--emopia-dir", type=Path, default=None, help="EMOPIA midis (default: SHARED/data/emopia/midis)"
    )
    parser.add_argument(
        "--gigamidi-dir", type=Path, default=None, help="GigaMIDI sample (default: SHARED/data/gigamidi_sample)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="passes per set; the fastest is reported")
    parser.add_argument("--tracemalloc", action="store_true", help="also trace Python allocations (one extra pass)")
    args = parser.parse_args(argv)
    folders = {
        "emopia": args.emopia_dir or args.shared / "data" / "emopia" / "midis",
        "gigamidi_sample": args.gigamidi_dir or args.shared / "data" / "gigamidi_sample",
    }
    results = []
    for name, folder in folders.items():
        r = bench_set(name, folder, args.repeat, args.tracemalloc)
        results.append(r)
        print(
            f"{name}: {r['files']} files ({r['failed']} failed), {r['bars']} bars: "
            f"{r['files_per_s_per_core']} files/s and {r['bars_per_s_per_core']} bars/s per core; "
            f"{r['ms_per_file_mean']} ms/file (median {r['ms_per_file_median']}, p95 {r['ms_per_file_p95']}, "
            f"max {r['ms_per_file_max']}); {r['speedup_vs_musetok']}x MuseTok; wall {r['wall_s']} s",
            file=sys.stderr,
        )
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"results": results, "peak_rss_mib": round(peak_rss_mib, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

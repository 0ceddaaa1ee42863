"""How annotate scales with files and workers, and what that projects for all of GigaMIDI.

    python benchmarks/bench_scaling.py                          # 1k and 10k files, 0/1/2 workers (~6 min on 2 cores)
    python benchmarks/bench_scaling.py --files 1000 10000 50000 --workers 0 1 2   # the full table
    python benchmarks/bench_scaling.py --stress-only            # the 20,000-bar and 64-track cases only

Files: the GigaMIDI sample cycled to N files, each made distinct by a text meta event at tick 0
in its first track (`midiva-bench <i>`; it changes no note, tempo or bar, but it changes the
bytes and so the md5, so annotate's md5 dedup skips none of them). Rows come from memory, as
from a streamed parquet: reading the parquet is not measured. The model is the bundled default
(features backend), threads pinned as `midiva annotate` pins them (--cpu-threads 1).

Each (files, workers) run is a fresh subprocess, so its peak RSS is its own; rows are made one
at a time while the run consumes them. Reported per run: files/s and bars/s by wall clock
(which on a shared machine says more about the load than about midiva); main-process CPU per
file (user+sys of the process that makes the rows, selects, predicts and writes — making a row
splices the meta event and hashes the bytes, about what a files source costs; with 0 workers it
also parses); worker CPU per file (all workers
together, from RUSAGE_CHILDREN once the pool has exited); peak RSS of the main process and of
each worker (VmHWM of each worker, sampled every 0.2 s while the run lasts). The source's share of
main CPU is measured in the same process, just before the run, by making up to 2,000 of the same rows
alone; main CPU minus that share is the writer's own CPU per file (selecting, receiving the workers'
finished rows, staging, committing), whose inverse is the writer ceiling.

The projection for GigaMIDI (1.43 M files in v1.0.0) on a node of C cores assumes: C − 1
parsing workers and one main process, one core each; worker CPU per file as measured here with
2 workers (GigaMIDI-sample-like files; GigaMIDI's own mix of file sizes is not known here);
workers scale linearly (no memory-bandwidth or I/O limit); the single main process caps the
node at 1 / (main CPU per file) files/s. Then files/s = min((C − 1) / worker_cpu, 1 / main_cpu).

The stress cases time load + events + features of one synthetic file of 20,000 bars (and of
10,000, for the linearity ratio) and of one with 64 tracks (and 32), each in a fresh subprocess,
with its peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GIGAMIDI_FILES = 1_430_000
SOURCE_SAMPLE_FILES = 2000  # rows made alone, before the run, to measure the source's share of main CPU
PROJECTED_CORES = (16, 64)


def _varlen(n: int) -> bytes:
    out = [n & 0x7F]
    while n > 0x7F:
        n >>= 7
        out.append(0x80 | (n & 0x7F))
    return bytes(reversed(out))


def with_text_event(data: bytes, text: str) -> bytes:
    """`data` with a text meta event at delta 0 opening its first track (the notes are unchanged)."""
    header_end = 8 + int.from_bytes(data[4:8], "big")
    if data[header_end : header_end + 4] != b"MTrk":
        return data + text.encode()  # not a plain SMF: distinct bytes are all the benchmark needs
    length = int.from_bytes(data[header_end + 4 : header_end + 8], "big")
    payload = text.encode()
    event = b"\x00\xff\x01" + _varlen(len(payload)) + payload
    start = header_end + 8
    return data[:header_end] + b"MTrk" + (length + len(event)).to_bytes(4, "big") + event + data[start:]


def distinct_rows(shared: Path, n_files: int) -> Iterator[Any]:
    """The rows, made one at a time as a streamed source makes them (so memory is annotate's own)."""
    from midiva.sources import SourceRow, list_midi_files

    blobs = [(p.stem, p.read_bytes()) for p in list_midi_files([shared / "data" / "gigamidi_sample"])]
    for i in range(n_files):
        name, data = blobs[i % len(blobs)]
        music = with_text_event(data, f"midiva-bench {i}") if len(data) >= 14 else data
        yield SourceRow(hashlib.md5(music).hexdigest(), f"{i}:{name}", "train", music, {"title": name})


class WorkerRss:
    """Samples VmHWM (peak RSS) of this process's children while a run lasts."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.peak_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period_s,), daemon=True)

    def _children(self) -> list[int]:
        found = []
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            try:
                found += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
        return found

    def _loop(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            for pid in self._children():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), int(line.split()[1]))

    def __enter__(self) -> WorkerRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_one(shared: Path, n_files: int, workers: int) -> dict[str, Any]:
    """One annotate run in this process (called in a fresh subprocess)."""
    from midiva.annotate import AnnotateOptions, annotate_stream
    from midiva.model import load_regressor

    source_cpu = time.process_time()  # what making the rows alone costs (splice + md5): the source's share
    sampled = sum(1 for _ in distinct_rows(shared, min(n_files, SOURCE_SAMPLE_FILES)))
    source_ms = 1e3 * (time.process_time() - source_cpu) / sampled
    rows = distinct_rows(shared, n_files)
    regressor = load_regressor(None)
    options = AnnotateOptions(num_workers=workers, progress=False, torch_threads=1, cpu_threads=1)
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as tmp, WorkerRss() as rss:
        t0 = time.perf_counter()
        summary = annotate_stream(rows, Path(tmp) / "a.csv", regressor, options=options)
        wall = time.perf_counter() - t0
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    files = summary.files_done + summary.files_failed
    main_cpu = (self_after.ru_utime - self_before.ru_utime) + (self_after.ru_stime - self_before.ru_stime)
    worker_cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    return {
        "files": files,
        "workers": workers,
        "failed": summary.files_failed,
        "bars": summary.bars,
        "wall_s": round(wall, 2),
        "files_per_s": round(files / wall, 1),
        "bars_per_s": round(summary.bars / wall),
        "main_cpu_ms_per_file": round(1e3 * main_cpu / files, 3),
        "source_cpu_ms_per_file": round(source_ms, 3),
        "writer_cpu_ms_per_file": round(1e3 * main_cpu / files - source_ms, 3),
        "worker_cpu_ms_per_file": round(1e3 * worker_cpu / files, 3),
        "peak_rss_main_mib": round(self_after.ru_maxrss / 1024, 1),
        "peak_rss_workers_mib": sorted(round(k / 1024, 1) for k in rss.peak_kib.values()),
        "seconds_by_stage": summary.seconds_by_stage,
    }


def stress_score(kind: str, size: int) -> bytes:
    """A synthetic file: `size` bars of 4/4 with 8 notes each ('bars'), or `size` tracks of 200 bars ('tracks')."""
    import symusic

    score = symusic.Score(480)
    n_tracks, n_bars = (1, size) if kind == "bars" else (size, 200)
    for t in range(n_tracks):
        track = symusic.Track(f"t{t}", t % 16, False)
        for b in range(n_bars):
            for k in range(8):
                track.notes.append(symusic.Note(b * 1920 + k * 240, 240, 48 + (t * 7 + b + 3 * k) % 40, 80))
        score.tracks.append(track)
    return bytes(score.dumps_midi())


def stress_one(kind: str, size: int) -> dict[str, Any]:
    from midiva.features import midi_to_features
    from midiva.prepare import limit_threads

    limit_threads(1)
    data = stress_score(kind, size)
    cpu = time.process_time()
    bars, _ = midi_to_features(data)
    cpu = time.process_time() - cpu
    return {
        "case": f"{size} {kind}",
        "bytes": len(data),
        "bars": bars.n_bars,
        "cpu_s": round(cpu, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _subprocess(args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=env)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def projection(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """GigaMIDI wall time on PROJECTED_CORES from the largest 2-worker run (or the largest run with workers)."""
    pooled = [r for r in runs if r["workers"] > 0]
    if not pooled:
        return {}
    ref = max(pooled, key=lambda r: (r["workers"], r["files"]))
    worker_ms, main_ms = ref["worker_cpu_ms_per_file"], ref["main_cpu_ms_per_file"]
    out: dict[str, Any] = {
        "from_run": {"files": ref["files"], "workers": ref["workers"]},
        "worker_cpu_ms_per_file": worker_ms,
        "main_cpu_ms_per_file": main_ms,
        "main_ceiling_files_per_s": round(1e3 / main_ms),
        "writer_cpu_ms_per_file": ref["writer_cpu_ms_per_file"],
        "writer_ceiling_files_per_s": round(1e3 / max(ref["writer_cpu_ms_per_file"], 1e-3)),
    }
    for cores in PROJECTED_CORES:
        rate = min((cores - 1) * 1e3 / worker_ms, 1e3 / main_ms)
        out[f"{cores}_cores"] = {
            "files_per_s": round(rate),
            "gigamidi_minutes": round(GIGAMIDI_FILES / rate / 60, 1),
            "bound_by": "main process" if rate == 1e3 / main_ms else "workers",
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--files", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stress-only", action="store_true", help="only the 20,000-bar and 64-track cases")
    parser.add_argument("--no-stress", action="store_true", help="skip the 20,000-bar and 64-track cases")
    parser.add_argument("--one", type=int, nargs=2, metavar=("FILES", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--stress-case", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.shared, *args.one)))
        return 0
    if args.stress_case:
        print(json.dumps(stress_one(args.stress_case[0], int(args.stress_case[1]))))
        return 0
    report: dict[str, Any] = {"runs": [], "stress": []}
    if not args.stress_only:
        for n_files in args.files:
            for workers in args.workers:
                record = _subprocess(["--shared", str(args.shared), "--one", str(n_files), str(workers)])
                report["runs"].append(record)
                print(
                    f"{n_files} files, {workers} workers: {record['files_per_s']} files/s, {record['bars_per_s']} bars/s; "
                    f"CPU/file main {record['main_cpu_ms_per_file']} ms (source {record['source_cpu_ms_per_file']}, "
                    f"writer {record['writer_cpu_ms_per_file']}), workers {record['worker_cpu_ms_per_file']} ms; "
                    f"peak RSS main {record['peak_rss_main_mib']} MiB, workers {record['peak_rss_workers_mib']} MiB",
                    file=sys.stderr,
                    flush=True,
                )
        report["projection"] = projection(report["runs"])
        print(f"projection: {json.dumps(report['projection'])}", file=sys.stderr)
    if not args.no_stress:
        for kind, size in (("bars", 10000), ("bars", 20000), ("tracks", 32), ("tracks", 64)):
            record = _subprocess(["--stress-case", kind, str(size)])
            report["stress"].append(record)
            print(
                f"stress {record['case']}: {record['bars']} bars, {record['cpu_s']} s CPU, peak RSS {record['peak_rss_mib']} MiB",
                file=sys.stderr,
                flush=True,
            )
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

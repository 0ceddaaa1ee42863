"""`midiva merge` at GigaMIDI scale: time and peak memory of merging many synthetic shards.

Writes `--shards` annotation outputs through the real writer (`LedgerWriter`: tables, ledger,
completion mark), `--rows` bar rows in all (files of `--bars-per-file` bars on average), then runs
`midiva merge` on them in a child process and reports its wall time and peak RSS.

    python benchmarks/bench_merge.py --shards 64 --rows 15000000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from midiva.annotate import format_rows
from midiva.ledger import LedgerWriter, output_paths
from midiva.prepare import FileResult
from midiva.sources import shard_of

MERGE_AND_REPORT_PEAK = """
import sys
from pathlib import Path
from midiva.cli import main
code = main(sys.argv[1:])
sys.stderr.write(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")) + "\\n")
sys.exit(code)
"""


def write_shards(root: Path, shards: int, rows: int, bars_per_file: int, seed: int = 0) -> tuple[list[Path], int, int]:
    """Synthetic shard outputs under root/shard-i/annotations.csv; returns their paths, files and rows."""
    rng = np.random.default_rng(seed)
    n_files = max(1, rows // bars_per_file)
    bars = rng.integers(1, 2 * bars_per_file, n_files)
    bars = np.maximum(1, np.round(bars * (rows / bars.sum()))).astype(np.int64)  # about `rows` in all
    md5s = [hashlib.md5(str(i).encode()).hexdigest() for i in range(n_files)]
    writers = []
    for i in range(shards):
        paths = output_paths(root / f"shard-{i}" / "annotations.csv")
        fingerprint = {
            "backend": "features",
            "include_drums": True,
            "num_shards": shards,
            "shard_index": i,
            "model_sha256": "0" * 64,
        }
        writers.append(LedgerWriter(paths, fingerprint, resume=False, commit_interval_s=30.0))
    template = np.round(rng.uniform(-1, 1, (int(bars.max()), 2)), 4).astype(np.float32)
    for md5, n in zip(md5s, bars.tolist(), strict=True):
        writer = writers[shard_of(md5, shards)]
        writer.stage_ok(FileResult(md5, md5[:8], "train", {}, n_bars=n), format_rows(md5, template[:n]), n)
        writer.maybe_commit()
    for writer in writers:
        writer.mark_complete()
        writer.close()
    return [w.paths.csv for w in writers], n_files, int(bars.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--rows", type=int, default=15_000_000)
    parser.add_argument("--bars-per-file", type=int, default=75, help="GigaMIDI: ~340 M bars over ~2 M files is ~170")
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary directory, removed after)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        shard_csvs, n_files, n_rows = write_shards(root, args.shards, args.rows, args.bars_per_file)
        made_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in shard_csvs)
        t0 = time.perf_counter()
        merged = root / "merged" / "annotations.csv"
        # The child reports its own VmHWM: getrusage's maxrss would include this (larger) parent's
        # pages, which Linux carries over into a child across fork and exec.
        done = subprocess.run(
            [sys.executable, "-c", MERGE_AND_REPORT_PEAK, "merge", *map(str, shard_csvs), "--out", str(merged)],
            capture_output=True,
            text=True,
            check=True,
        )
        merge_s = time.perf_counter() - t0
        peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", done.stderr).group(1))  # type: ignore[union-attr]
        report = json.loads(done.stdout)
        assert report["bars"] == n_rows and report["files"] == n_files, report
        print(
            json.dumps(
                {
                    "shards": args.shards,
                    "files": n_files,
                    "rows": report["bars"],
                    "csv_bytes": size,
                    "generate_s": round(made_s, 1),
                    "merge_s": round(merge_s, 1),
                    "rows_per_s": round(report["bars"] / merge_s),
                    "merge_peak_rss_mib": round(peak_kib / 1024, 1),
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

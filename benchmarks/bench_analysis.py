"""Benchmark `midiva stats` out of core: a synthetic annotations CSV (+ metadata), rows/s, peak RSS.

Generates (once, reused when present) `annotations.csv` with --rows bar rows over --songs songs,
its `annotations.meta.csv` and a small `annotations.failures.csv`, then runs
`midiva.analysis.compute_stats` in a fresh child process so the RSS high-water mark
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) is that of the analysis alone, not of the generator.

    python benchmarks/bench_analysis.py --rows 20000000 --songs 130000 --dir /tmp/midiva_bench

Prints one JSON object: rows, songs, CSV bytes, seconds, rows/s, peak RSS (MiB) and the
RSS after imports (MiB) for comparison. Planted effects (genre means, a tempo-arousal slope)
let the printed genre table be checked by eye.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# genre -> (valence offset, arousal offset): planted so the output can be sanity-checked.
GENRE_EFFECTS: dict[str, tuple[float, float]] = {
    "pop": (0.30, 0.10),
    "rock": (0.05, 0.30),
    "metal": (-0.20, 0.55),
    "classical": (0.00, -0.25),
    "jazz": (0.15, -0.05),
    "ambient": (0.05, -0.50),
    "blues": (-0.25, -0.10),
    "electronic": (0.10, 0.35),
    "folk": (0.10, -0.20),
    "soundtrack": (-0.05, 0.00),
    "country": (0.25, 0.00),
    "reggae": (0.35, -0.05),
}


def generate(out_dir: Path, n_rows: int, n_songs: int, seed: int = 0, chunk_songs: int = 10_000) -> Path:
    """Write annotations.csv, annotations.meta.csv and annotations.failures.csv; return the CSV path."""
    import polars as pl

    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "annotations.csv"
    md5s = np.array([rng.bytes(16).hex() for _ in range(n_songs)])
    raw = rng.lognormal(mean=0.0, sigma=0.7, size=n_songs)
    lengths = np.maximum(1, np.round(raw / raw.sum() * n_rows)).astype(np.int64)
    lengths[-1] = max(1, lengths[-1] + n_rows - int(lengths.sum()))
    names = list(GENRE_EFFECTS)
    effects = np.array([GENRE_EFFECTS[g] for g in names])
    n_genres = rng.choice([0, 1, 1, 1, 2, 2, 3], size=n_songs)  # ~14% of songs without genre
    tempo = rng.normal(120, 25, size=n_songs).clip(40, 240)
    song_genres: list[list[str]] = []
    song_means = np.zeros((n_songs, 2))
    for i in range(n_songs):
        picks = rng.choice(len(names), size=n_genres[i], replace=False)
        song_genres.append([names[j] for j in picks])
        base = effects[picks].mean(axis=0) if len(picks) else np.zeros(2)
        song_means[i] = base + rng.normal(0, 0.15, size=2) + [0.0, 0.004 * (tempo[i] - 120)]
    kernel = 0.8 ** np.arange(12)
    kernel /= np.sqrt((kernel**2).sum())
    with open(csv_path, "wb") as handle:
        for start in range(0, n_songs, chunk_songs):
            idx = np.arange(start, min(n_songs, start + chunk_songs))
            lens = lengths[idx]
            total = int(lens.sum())
            song_of_row = np.repeat(idx, lens)
            bar = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
            noise = np.stack([np.convolve(rng.normal(0, 0.12, total), kernel, "same") for _ in range(2)], 1)
            values = np.clip(song_means[song_of_row] + noise, -1.0, 1.0)
            frame = pl.DataFrame(
                {
                    "md5": md5s[song_of_row],
                    "bar_number": bar,
                    "valence": np.round(values[:, 0], 6),
                    "arousal": np.round(values[:, 1], 6),
                }
            )
            frame.write_csv(handle, include_header=start == 0)
    meta = pl.DataFrame(
        {
            "md5": md5s,
            "source": "synthetic",
            "split": rng.choice(["train", "validation", "test"], size=n_songs),
            "title": [f"song {i}" for i in range(n_songs)],
            "artist": [f"artist {i % 9000}" for i in range(n_songs)],
            "music_styles_curated": ["|".join(g) for g in song_genres],
            "num_tracks": rng.integers(1, 17, size=n_songs),
            "tempo": np.round(tempo, 2),
            "NOMML": rng.integers(1, 40, size=n_songs),
            "n_bars": lengths,
            "n_notes": lengths * rng.integers(4, 40, size=n_songs),
        }
    )
    meta.write_csv(out_dir / "annotations.meta.csv")
    failures = pl.DataFrame(
        {
            "md5": [rng.bytes(16).hex() for _ in range(50)],
            "stage": "events",
            "error_type": rng.choice(["EmptyScoreError", "MidiReadError"], size=50),
            "message": "synthetic failure",
        }
    )
    failures.write_csv(out_dir / "annotations.failures.csv")
    return csv_path


_CHILD = """
import json, resource, sys, time
from pathlib import Path
import midiva.analysis as A
rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
csv = Path(sys.argv[1])
meta, failures = A.sidecar_paths(csv)
stats = A.compute_stats(csv, meta, failures, n_boot=int(sys.argv[2]), max_rows_in_memory=int(sys.argv[3]))
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
top = stats.genres.sort("arousal_mean", descending=True).head(3)["genre"].to_list() if stats.genres is not None else []
print(json.dumps({"seconds": seconds, "peak_rss_mib": peak / 1024, "rss_after_imports_mib": rss_imports / 1024,
                  "valid_rows": stats.quality.n_valid_rows, "songs": stats.quality.n_songs,
                  "buckets": stats.n_buckets, "top_arousal_genres": top}))
"""


def main(argv: list[str] | None = None) -> int:
    """Generate the data when absent, time the analysis in a child process, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--songs", type=int, default=130_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/midiva_bench"))
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--max-rows-in-memory", type=int, default=50_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data_dir = args.dir / f"rows{args.rows}_songs{args.songs}_seed{args.seed}"
    csv_path = data_dir / "annotations.csv"
    gen_seconds = None
    if not (data_dir / "annotations.failures.csv").exists():
        t0 = time.perf_counter()
        generate(data_dir, args.rows, args.songs, args.seed)
        gen_seconds = time.perf_counter() - t0
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(csv_path), str(args.n_boot), str(args.max_rows_in_memory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return 1
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(
        rows=args.rows,
        songs=args.songs,
        csv_bytes=csv_path.stat().st_size,
        rows_per_s=args.rows / result["seconds"],
        generate_seconds=gen_seconds,
        max_rows_in_memory=args.max_rows_in_memory,
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

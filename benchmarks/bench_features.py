"""Time MIDI loading, MuseTok event conversion and bar features separately, per corpus.

Usage: python benchmarks/bench_features.py [--shared ../shared] [--emopia-limit N] [--repeat R]

Prints, per corpus, files, bars, and for each stage ms/file (mean and median) and bars/s.
The stage times are measured on the same files, one after another in one process; the
feature time excludes loading and events (it is `bar_features(midi, bars)` alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from midiva.errors import MidivaError
from midiva.events import score_to_bars
from midiva.features import FEATURE_NAMES, bar_features
from midiva.midi import load_midi

REPO = Path(__file__).resolve().parents[1]


def bench(paths: list[Path], repeat: int) -> dict[str, object]:
    """Best-of-`repeat` seconds per file for each stage, over the files that convert."""
    stages: dict[str, list[float]] = {"load": [], "events": [], "features": []}
    n_bars = skipped = 0
    for path in paths:
        best = {k: float("inf") for k in stages}
        try:
            for _ in range(repeat):
                t0 = time.perf_counter()
                midi = load_midi(path)
                t1 = time.perf_counter()
                bars = score_to_bars(midi)
                t2 = time.perf_counter()
                feats = bar_features(midi, bars)
                t3 = time.perf_counter()
                for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                    best[key] = min(best[key], dt)
        except MidivaError:
            skipped += 1
            continue
        n_bars += feats.n_bars
        for key in stages:
            stages[key].append(best[key])
    return {"files": len(stages["load"]), "skipped": skipped, "bars": n_bars, "stages": stages}


def report(name: str, result: dict[str, object]) -> None:
    stages = result["stages"]
    assert isinstance(stages, dict)
    bars = int(result["bars"])  # type: ignore[call-overload]
    print(f"{name}: {result['files']} files ({result['skipped']} skipped), {bars} bars, {len(FEATURE_NAMES)} features")
    for key, times in stages.items():
        total = sum(times)
        print(
            f"  {key:9s} mean {1e3 * total / max(len(times), 1):7.2f} ms/file  "
            f"median {1e3 * statistics.median(times) if times else 0:7.2f} ms/file  "
            f"{bars / total if total else 0:10.0f} bars/s"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--emopia-limit", type=int, default=0, help="first N EMOPIA clips (0: all)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per file; the fastest counts")
    args = parser.parse_args(argv)
    emopia = sorted((args.shared / "data" / "emopia" / "midis").glob("*.mid"))
    if args.emopia_limit:
        emopia = emopia[: args.emopia_limit]
    giga = sorted((args.shared / "data" / "gigamidi_sample").glob("*.mid"))
    if not emopia and not giga:
        print(f"no MIDI files under {args.shared}/data", file=sys.stderr)
        return 1
    report("EMOPIA", bench(emopia, args.repeat))
    report("GigaMIDI sample", bench(giga, args.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

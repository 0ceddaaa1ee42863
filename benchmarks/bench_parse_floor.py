"""What midiva's per-file work costs next to the floor, bare symusic parsing, measured in one run.

    python benchmarks/bench_parse_floor.py [--shared ../shared] [--repeat 7] [--rounds 3]

For each corpus (EMOPIA, the GigaMIDI sample) the files are read into memory, then every pass
times, over all files one after another, CPU seconds of this process for:
  parse     `symusic.ScoreTick.from_midi(bytes)` alone (the floor);
  load      `midi.load_midi(bytes)`: parse plus md5 and header checks;
  events    `score_to_bars(midi)` on freshly loaded files (loaded untimed before each pass);
  features  `bar_features(midi, bars)` on those, after events (they share the note arrays);
  events_many    `score_to_bars_many(midis)` on all of them at once, freshly loaded (the batched API, same events);
  features_many  `bar_features_many(pairs)` on all of them at once, after events_many (the batched API, same values);
  pipeline  load + events + features of each file in turn (what a worker does per file).
The stages alternate within a pass and the fastest of --repeat passes counts for each, so a load
spike on a shared machine inflates no single ratio. The headline ratios are
`(events + features) / parse`, `(events_many + features_many) / parse` and `pipeline / parse`. --rounds
repeats the whole measurement and prints the range of each ratio over the rounds, which is what
to report from a noisy machine.
BLAS is pinned to one thread (as annotate's workers are) unless --no-pin is given, and glibc keeps
freed memory as in a worker (`midiva.prepare.keep_freed_memory`) unless --no-keep-freed-memory is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from symusic.core import ScoreTick

from midiva.errors import MidivaError
from midiva.events import score_to_bars, score_to_bars_many
from midiva.features import bar_features, bar_features_many
from midiva.midi import LoadedMidi, load_midi

REPO = Path(__file__).resolve().parents[1]


def _cpu(fn: Callable[[], Any]) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def measure(blobs: list[bytes], repeat: int) -> dict[str, float]:
    """Fastest CPU seconds over `repeat` passes for each stage, summed over the files that convert."""
    good_bytes: list[bytes] = []
    good: list[LoadedMidi] = []
    for data in blobs:
        try:
            midi = load_midi(data)
            score_to_bars(midi)
        except MidivaError:
            continue
        good_bytes.append(data)
        good.append(midi)
    bars = [score_to_bars(m) for m in good]
    # Each events pass gets freshly loaded files (loaded untimed), so that it pays for reading the
    # note arrays (`LoadedMidi.note_arrays`) as a worker does; features then reuse them, as in a worker.
    fresh: list[LoadedMidi] = good

    def reload() -> None:
        nonlocal fresh
        fresh = [load_midi(d) for d in good_bytes]

    def pipeline() -> None:
        for data in good_bytes:
            midi = load_midi(data)
            bar_features(midi, score_to_bars(midi))

    stages: dict[str, Callable[[], Any]] = {
        "parse": lambda: [ScoreTick.from_midi(d) for d in good_bytes],
        "load": lambda: [load_midi(d) for d in good_bytes],
        "events": lambda: [score_to_bars(m) for m in fresh],
        "features": lambda: [bar_features(m, b) for m, b in zip(fresh, bars, strict=True)],
        "events_many": lambda: score_to_bars_many(fresh),
        "features_many": lambda: bar_features_many(list(zip(fresh, bars, strict=True))),
        "pipeline": pipeline,
    }
    untimed_before = {"events": reload, "events_many": reload}
    for name, fn in stages.items():  # warm caches (grid tables, lazy imports)
        untimed_before.get(name, lambda: None)()
        fn()
    best = dict.fromkeys(stages, float("inf"))
    for _ in range(repeat):
        for name, fn in stages.items():
            untimed_before.get(name, lambda: None)()
            best[name] = min(best[name], _cpu(fn))
    best["files"] = len(good_bytes)
    best["bars"] = sum(b.n_bars for b in bars)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--repeat", type=int, default=7, help="passes per round; the fastest counts per stage")
    parser.add_argument("--rounds", type=int, default=3, help="independent measurements; ratios are given as ranges")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True, help="BLAS to one thread")
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc malloc settings of a parsing worker",
    )
    args = parser.parse_args(argv)
    corpora = {
        "emopia": sorted((args.shared / "data" / "emopia" / "midis").glob("*.mid")),
        "gigamidi_sample": sorted((args.shared / "data" / "gigamidi_sample").glob("*.mid")),
    }
    if args.pin:
        from midiva.prepare import limit_threads

        limit_threads(1)
    if args.keep_freed_memory:
        from midiva.prepare import keep_freed_memory

        keep_freed_memory()
    summary: dict[str, Any] = {}
    for name, paths in corpora.items():
        if not paths:
            print(f"no MIDI files for {name} under {args.shared}/data", file=sys.stderr)
            return 1
        blobs = [p.read_bytes() for p in paths]
        rounds = [measure(blobs, args.repeat) for _ in range(args.rounds)]
        ratios = {
            "events_features_over_parse": [(r["events"] + r["features"]) / r["parse"] for r in rounds],
            "events_features_many_over_parse": [(r["events_many"] + r["features_many"]) / r["parse"] for r in rounds],
            "pipeline_over_parse": [r["pipeline"] / r["parse"] for r in rounds],
            "events_over_parse": [r["events"] / r["parse"] for r in rounds],
            "features_over_parse": [r["features"] / r["parse"] for r in rounds],
            "events_many_over_parse": [r["events_many"] / r["parse"] for r in rounds],
            "features_many_over_parse": [r["features_many"] / r["parse"] for r in rounds],
        }
        n = rounds[0]["files"]
        ms = {
            k: [round(1e3 * r[k] / n, 4) for r in rounds]
            for k in ("parse", "load", "events", "features", "events_many", "features_many", "pipeline")
        }
        summary[name] = {
            "files": n,
            "bars": rounds[0]["bars"],
            "ms_per_file": ms,
            "ratios": {k: [round(min(v), 2), round(max(v), 2)] for k, v in ratios.items()},
        }
        r = summary[name]["ratios"]
        print(
            f"{name}: {n} files; parse {min(ms['parse'])}-{max(ms['parse'])} ms/file; "
            f"(events+features)/parse {r['events_features_over_parse']}, "
            f"(events_many+features_many)/parse {r['events_features_many_over_parse']}, "
            f"pipeline/parse {r['pipeline_over_parse']} "
            f"(range over {args.rounds} rounds)",
            file=sys.stderr,
        )
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

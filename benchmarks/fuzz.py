"""Long fuzz run: ≥ 10,000 seeded malformed MIDI files through `midiva annotate`, twice.

    python benchmarks/fuzz.py --files 10000 --seed 0 --workers 2

Generates the cases with `tests/fuzz/midi_fuzz.py` (the generator the test suite's short run uses;
real files to mutate come from ../shared/data/gigamidi_sample), runs `midiva annotate DIR` twice
in fresh processes with the same command, and prints the figures: files, crashes (WorkerCrash rows
or a run that died), hangs (a run over --timeout-s), typed and untyped failures, property
problems (lost records, NaN or out-of-range values, bad bar numbers) and whether both runs wrote
byte-identical tables. Exit status 1 when any property is broken.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fuzz"))

from midi_fuzz import check_outputs, generate, output_bytes, write_cases  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="--num-workers of both runs")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="a run longer than this is a hang")
    parser.add_argument("--seeds-dir", type=Path, default=REPO.parent / "shared" / "data" / "gigamidi_sample")
    parser.add_argument(
        "--keep", type=Path, default=None, help="write the cases and outputs here instead of a temp dir"
    )
    args = parser.parse_args()
    seeds = [p.read_bytes() for p in sorted(args.seeds_dir.glob("*.mid")) if p.stat().st_size > 0]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        t0 = time.perf_counter()
        paths = write_cases(generate(args.seed, args.files, seeds), root / "cases")
        figures: dict[str, object] = {
            "files": len(paths),
            "distinct_files": len({p.read_bytes() for p in paths}),
            "seed": args.seed,
            "workers": args.workers,
            "generate_s": round(time.perf_counter() - t0, 1),
        }
        tables, hangs, dead = [], 0, 0
        for run in ("run1", "run2"):
            out = root / run / "a.csv"
            command = [
                sys.executable,
                "-m",
                "midiva",
                "-q",
                "annotate",
                str(root / "cases"),
                "--out",
                str(out),
                "--num-workers",
                str(args.workers),
                "--no-resume",
            ]
            t0 = time.perf_counter()
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s, check=False)
            except subprocess.TimeoutExpired:
                hangs += 1
                continue
            figures[f"{run}_s"] = round(time.perf_counter() - t0, 1)
            figures[f"{run}_stderr_lines"] = len(done.stderr.splitlines())
            if done.returncode != 0:
                dead += 1
                figures[f"{run}_error"] = done.stderr[-500:]
                continue
            check = check_outputs(out, paths)
            figures.update(
                {
                    "annotated": check.annotated,
                    "failed": sum(check.failures_by_type.values()),
                    "failures_by_type": dict(check.failures_by_type.most_common()),
                    "worker_crashes": check.crashes,
                    "untyped_failures": check.untyped,
                    f"{run}_problems": check.problems[:20],
                }
            )
            tables.append(output_bytes(out))
        figures["hangs"] = hangs
        figures["runs_died"] = dead
        figures["identical_tables"] = len(tables) == 2 and tables[0] == tables[1]
    print(json.dumps(figures, indent=2))
    broken = hangs or dead or figures.get("worker_crashes") or figures.get("untyped_failures")
    broken = broken or figures.get("run1_problems") or figures.get("run2_problems") or not figures["identical_tables"]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

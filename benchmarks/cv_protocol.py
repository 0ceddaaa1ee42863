"""Score a backend by song-grouped K-fold CV on EMOPIA train+val (K folds x N seeds) plus the official val and test.

One table on stdout (markdown): per metric the CV mean over folds x seeds with its song-bootstrap
95% CI and the CI's half-width (the smallest difference the protocol resolves for one score; two
backends scored on the same folds are better compared with `--compare`, a paired bootstrap), then
the official val and test (trained on train, stopped early on val, as `midiva train`; test is
reported, never used for a choice; `--no-test` leaves it out). `--json FILE` writes every number,
with each run's graded clip predictions. The protocol is `midiva.crossval`'s (see its docstring).

The bundled recipe (scripts/train_default_model.sh) on the features backend:

    midiva preprocess-emopia --emopia-dir ../shared/data/emopia --out /tmp/cv-data --augment 4 --medleys 800 --augment-seed 0
    midiva prepare-labels --data /tmp/cv-data
    python benchmarks/cv_protocol.py --write-pool-view ../shared/data/emopia /tmp/cv-pool-emopia
    midiva preprocess-emopia --emopia-dir /tmp/cv-pool-emopia --out /tmp/cv-pool --augment 4 --medleys 3000 --augment-seed 0
    midiva prepare-labels --data /tmp/cv-pool
    python benchmarks/cv_protocol.py --data /tmp/cv-data --cv-data /tmp/cv-pool --max-medleys 800 --json cv.json

--data is the official preprocessing (val/test scores, and the CV pool without --cv-data); --cv-data
the pooled view's, where every train+val clip has its rewrites and medleys mix all pool songs
(about a third survive a fold's filter, hence 3000 capped at 800). Another backend: preprocess with
its `--backend`, or, for a backend this script does not train, call `midiva.crossval.cross_validate`
and `official_scores` with its own `FitPredict` (a function of a `FoldTask` returning (n_bars, 2)
predictions per clip of `task.predict`), and `scores_json` for the same JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from midiva.config import DEFAULT_CONTEXT, DEFAULT_EXCLUDE_FEATURES
from midiva.crossval import (
    CV_METRICS,
    ClipTable,
    Estimate,
    Scores,
    cross_validate,
    mlp_fit_predict,
    official_scores,
    paired,
    scores_from_json,
    scores_json,
    write_pool_view,
)
from midiva.train import TrainConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--write-pool-view",
        nargs=2,
        type=Path,
        metavar=("EMOPIA_DIR", "OUT"),
        help="write an EMOPIA view whose train split is train+val, then exit",
    )
    p.add_argument("--data", type=Path, help="preprocessed + labelled EMOPIA directory (official split)")
    p.add_argument("--cv-data", type=Path, help="the same of the pooled view (default: --data)")
    p.add_argument("--backend", choices=["features", "musetok", "hybrid"], help="default: the data's")
    p.add_argument("--features", default="", help="comma-separated names or globs (empty: all)")
    p.add_argument("--exclude-features", default=",".join(DEFAULT_EXCLUDE_FEATURES), help="comma-separated globs")
    p.add_argument("--context", default=",".join(DEFAULT_CONTEXT), help="comma-separated context blocks")
    p.add_argument("--max-epochs", type=int, default=d.max_epochs)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (fold partition and training)")
    p.add_argument("--inner-folds", type=int, default=8, help="1/N of a fold's training songs stops early")
    p.add_argument("--max-medleys", type=int, help="medleys per run at most (default: all that qualify)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws over songs")
    p.add_argument("--boot-seed", type=int, default=0)
    p.add_argument("--cv", action=argparse.BooleanOptionalAction, default=True, help="run the cross-validation")
    p.add_argument("--official", action=argparse.BooleanOptionalAction, default=True, help="train on train, score val")
    p.add_argument(
        "--test", action=argparse.BooleanOptionalAction, default=True, help="also score test (reported only)"
    )
    p.add_argument("--compare", type=Path, help="a previous --json (same data): paired differences this - that")
    p.add_argument("--json", type=Path, help="write every number here")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-run log lines")
    args = p.parse_args(argv)
    if args.write_pool_view is None and args.data is None:
        p.error("give --data (or --write-pool-view EMOPIA_DIR OUT)")
    if args.folds < 2 or args.seeds < 1 or args.inner_folds < 2 or args.n_boot < 1:
        p.error("need --folds >= 2, --seeds >= 1, --inner-folds >= 2 and --n-boot >= 1")
    return args


def cell(e: Estimate) -> str:
    """'0.712 [0.690, 0.731]'."""
    return f"{e.mean:.3f} [{e.low:.3f}, {e.high:.3f}]"


def table(results: dict[str, Scores], compare: dict[str, dict[str, Estimate]]) -> str:
    """The markdown table: CV mean [CI] and ± half-width, val, test, and paired differences."""
    cols = [
        ("cv", "CV mean [95% CI]"),
        ("val", "official val [95% CI]"),
        ("test", "official test [95% CI] (reported, not for choices)"),
    ]
    cols = [(k, title) for k, title in cols if k in results]
    header = ["metric"] + [t for _, t in cols] + (["CV CI half-width"] if "cv" in results else [])
    header += [f"{k} diff vs --compare [95% CI]" for k in compare]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in CV_METRICS:
        row = [key.removeprefix("clip.")] + [cell(results[k].estimates[key]) for k, _ in cols]
        if "cv" in results:
            row.append(f"{results['cv'].estimates[key].half_width:.3f}")
        row += [
            f"{compare[k][key].mean:+.3f} [{compare[k][key].low:+.3f}, {compare[k][key].high:+.3f}]" for k in compare
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the protocol and print the table."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s"
    )
    if args.write_pool_view is not None:
        out = write_pool_view(*args.write_pool_view)
        print(f"pooled view written to {out}; preprocess it with `midiva preprocess-emopia --emopia-dir {out} ...`")
        return 0
    started = time.perf_counter()
    recipe: dict[str, Any] = {
        "backend": args.backend,
        "features": [x for x in args.features.split(",") if x],
        "exclude_features": [x for x in args.exclude_features.split(",") if x],
        "context": [x for x in args.context.split(",") if x],
    }
    config = TrainConfig(max_epochs=args.max_epochs, patience=args.patience)
    seeds = list(range(args.seeds))
    results: dict[str, Scores] = {}
    tables: dict[str, ClipTable] = {}

    cv_seconds = official_seconds = 0.0
    if args.cv:
        cv_dir = args.cv_data or args.data
        tables["cv"] = ClipTable.from_dir(cv_dir)
        t0 = time.perf_counter()
        results["cv"] = cross_validate(
            tables["cv"],
            mlp_fit_predict(cv_dir, **recipe, config=config),
            n_folds=args.folds,
            seeds=seeds,
            inner_folds=args.inner_folds,
            max_medleys=args.max_medleys,
            n_boot=args.n_boot,
            boot_seed=args.boot_seed,
        )
        cv_seconds = time.perf_counter() - t0
    if args.official:
        official = ClipTable.from_dir(args.data)
        t0 = time.perf_counter()
        splits = ["val", *(["test"] if args.test else [])]
        for split, scores in official_scores(
            official,
            mlp_fit_predict(args.data, **recipe, config=config),
            seeds=seeds,
            splits=splits,
            max_medleys=args.max_medleys,
            n_boot=args.n_boot,
            boot_seed=args.boot_seed,
        ).items():
            results[split], tables[split] = scores, official
        official_seconds = time.perf_counter() - t0
    compare: dict[str, dict[str, Estimate]] = {}
    if args.compare is not None:
        saved = json.loads(args.compare.read_text())
        for key in ("cv", "val"):
            if key in results and key in saved.get("scores", {}):
                other = scores_from_json(saved["scores"][key], tables[key])
                compare[key] = paired(results[key], other, tables[key], n_boot=args.n_boot, seed=args.boot_seed)
    seconds = time.perf_counter() - started
    runs = {k: len(s.runs) for k, s in results.items()}
    medleys = sorted({r.n_medleys for s in results.values() for r in s.runs})
    print(
        f"data {args.data} (CV: {args.cv_data or args.data}); recipe {recipe}; {args.folds} folds x {args.seeds} seeds; "
        f"runs {runs}; medleys per run {medleys[0] if medleys else 0}..{medleys[-1] if medleys else 0}; "
        f"CV {cv_seconds:.0f} s, official {official_seconds:.0f} s, total {seconds:.0f} s\n"
    )
    print(table(results, compare))
    if args.json is not None:
        out = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "recipe": recipe,
            "seconds": {"cv": cv_seconds, "official": official_seconds, "total": seconds},
            "scores": {k: scores_json(s, tables[k]) for k, s in results.items()},
            "compare": {
                k: {m: vars(e) | {"half_width": e.half_width} for m, e in d.items()} for k, d in compare.items()
            },
        }
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

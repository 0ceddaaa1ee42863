"""Seed spread of the valence/arousal MLP: train N seeds on train, stop early on val, score val and test.

Needs a preprocessed and labelled EMOPIA directory:

    midiva preprocess-emopia --emopia-dir ../shared/data/emopia --out data/emopia-features --num-workers 2
    midiva prepare-labels --data data/emopia-features
    python benchmarks/train_seeds.py --data data/emopia-features --seeds 5

Hyperparameter flags mirror `midiva train` (same defaults). Prints, per metric, mean ± std over
seeds on val and test, plus the score of the seed-averaged predictions ("ensemble"). Selection
happens on val only; test is reported, never used to choose anything. `--no-test` hides it, for
tuning runs. `--json FILE` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from midiva.emopia import ClipSet, build_clip_set, load_split, pad_clips, select_features
from midiva.metrics import masked_metrics
from midiva.model import InputRecipe
from midiva.train import DEFAULT_CONTEXT, DEFAULT_EXCLUDE_FEATURES, TrainConfig, fit, predict_clips

KEYS = (
    "clip.mae_valence",
    "clip.mae_arousal",
    "clip.rmse_valence",
    "clip.rmse_arousal",
    "clip.pearson_valence",
    "clip.pearson_arousal",
    "clip.ccc_valence",
    "clip.ccc_arousal",
    "clip.quadrant_accuracy",
    "clip.valence_sign_accuracy",
    "clip.arousal_sign_accuracy",
    "bar.mae_valence",
    "bar.mae_arousal",
    "bar.ccc_valence",
    "bar.ccc_arousal",
    "bar.quadrant_accuracy",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (the hyperparameters mirror `midiva train`)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="preprocessed + labelled EMOPIA directory")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--backend", default="features", choices=["features", "musetok", "hybrid"])
    p.add_argument("--features", default="", help="comma-separated names or globs (empty: all)")
    p.add_argument(
        "--exclude-features",
        default=",".join(DEFAULT_EXCLUDE_FEATURES),
        help="comma-separated names or globs to leave out",
    )
    p.add_argument(
        "--context", default=",".join(DEFAULT_CONTEXT), help="comma-separated context blocks (mean, std, window<k>)"
    )
    p.add_argument("--hidden-dim", type=int, default=d.hidden_dim)
    p.add_argument("--activation", default=d.activation)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--tanh", action=argparse.BooleanOptionalAction, default=d.tanh)
    p.add_argument("--loss", default=d.loss)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-epochs", type=int, default=d.max_epochs)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--batch-clips", type=int, default=d.batch_clips)
    p.add_argument("--clip-weighting", action=argparse.BooleanOptionalAction, default=d.clip_weighting)
    p.add_argument("--monitor", default=d.monitor)
    p.add_argument("--test", action=argparse.BooleanOptionalAction, default=True, help="also score the test split")
    p.add_argument("--json", type=Path, help="write all numbers to this file")
    return p.parse_args(argv)


@dataclass
class SeedRuns:
    """What `run_seeds` measured: per-seed metrics and per-clip predictions by split, and the ensemble."""

    recipe: InputRecipe
    sets: dict[str, ClipSet]
    scores: dict[str, list[dict[str, float]]]
    preds: dict[str, list[list[np.ndarray]]]
    ensemble: dict[str, dict[str, float]]
    epochs: list[int]
    seconds: float


def run_seeds(args: argparse.Namespace) -> SeedRuns:
    """Train `args.seeds` seeds on train (early stopping on val) and score val (and test with `args.test`)."""
    started = time.perf_counter()
    splits = ["train", "val", *(["test"] if args.test else [])]
    raw = {s: load_split(args.data, s) for s in splits}
    first = raw["train"][0]
    patterns = [x for x in args.features.split(",") if x]
    exclude = [x for x in args.exclude_features.split(",") if x]
    names = select_features(first.feature_names, patterns, exclude) if args.backend != "musetok" else ()
    latent_dim = first.latents.shape[1] if args.backend != "features" and first.latents is not None else 0
    recipe = InputRecipe(args.backend, names, latent_dim, tuple(x for x in args.context.split(",") if x))
    sets = {s: build_clip_set(raw[s], recipe) for s in splits}
    scores: dict[str, list[dict[str, float]]] = {s: [] for s in splits[1:]}
    preds: dict[str, list[list[np.ndarray]]] = {s: [] for s in splits[1:]}
    epochs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        config = TrainConfig(
            hidden_dim=args.hidden_dim,
            activation=args.activation,
            dropout=args.dropout,
            tanh=args.tanh,
            loss=args.loss,
            lr=args.lr,
            weight_decay=args.weight_decay,
            max_epochs=args.max_epochs,
            patience=args.patience,
            batch_clips=args.batch_clips,
            clip_weighting=args.clip_weighting,
            monitor=args.monitor,
            seed=seed,
        )
        result = fit(sets["train"], sets["val"], recipe, config)
        epochs.append(result.best_epoch)
        for s in scores:
            p = predict_clips(result.regressor, sets[s])
            preds[s].append(p)
            scores[s].append(masked_metrics(*pad_clips(p, sets[s].targets), sets[s].quadrants).to_dict())
    ensemble = {}
    for s in scores:
        mean_pred = [np.mean([run[i] for run in preds[s]], axis=0) for i in range(sets[s].n_clips)]
        ensemble[s] = masked_metrics(*pad_clips(mean_pred, sets[s].targets), sets[s].quadrants).to_dict()
    return SeedRuns(recipe, sets, scores, preds, ensemble, epochs, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    """Train the seeds and print the table."""
    args = parse_args(argv)
    runs = run_seeds(args)
    recipe, scores, ensemble, epochs = runs.recipe, runs.scores, runs.ensemble, runs.epochs
    header = f"{'metric':28s}" + "".join(f"{s + ' mean ± std':>22s}{s + ' ens':>10s}" for s in scores)
    print(
        f"recipe: {recipe.to_dict()['context']} {len(recipe.feature_names)} features, input_dim {recipe.input_dim}; "
        f"seeds {args.seeds}; best epochs {epochs}; {runs.seconds:.0f} s"
    )
    print(header)
    for key in KEYS:
        row = f"{key:28s}"
        for s in scores:
            values = np.array([r[key] for r in scores[s]])
            row += f"{values.mean():>14.3f} ± {values.std():.3f}{ensemble[s][key]:>10.3f}"
        print(row)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "best_epochs": epochs,
                    "runs": scores,
                    "ensemble": ensemble,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""barseq on EMOPIA: val over seeds (trained here), optional song-grouped CV, test once, robustness, speed.

    python benchmarks/barseq_eval.py --seeds 0 1 2                 # train per seed, score val
    python benchmarks/barseq_eval.py --model DEFAULT --test         # the shipped weights on val and test
    python benchmarks/barseq_eval.py --model DEFAULT --robustness --speed
    python benchmarks/barseq_eval.py --cv 5 --seeds 0               # song-grouped 5-fold CV over train+val

Predictions are graded clip predictions: the mean over a clip's bars of barseq's expected
(valence, arousal) (quadrant probabilities times the label mapping), not decoded to quadrant points.
The bundled features model is scored on the same clips through `midiva.robustness.bar_predictor`.
Every run is single-threaded (torch.set_num_threads(1)). Writes barseq_eval.json and .md to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "src"))

from midiva.barseq import BarSeqConfig, BarSeqEncoder, encode_songs, load_barseq  # noqa: E402
from midiva.barseq_train import ClipData, TrainSettings, load_clip_data, train_barseq  # noqa: E402
from midiva.emopia import list_emopia  # noqa: E402
from midiva.errors import MidivaError  # noqa: E402
from midiva.events import pitched_bar_token_ids, score_to_bars  # noqa: E402
from midiva.labels import DEFAULT_LABEL_MAPPING, QUADRANTS  # noqa: E402
from midiva.metrics import level_metrics  # noqa: E402
from midiva.midi import load_midi  # noqa: E402

METRICS = (
    "valence_sign_accuracy",
    "quadrant_accuracy",
    "arousal_sign_accuracy",
    "mae_valence",
    "mae_arousal",
    "ccc_valence",
    "ccc_arousal",
)
TARGETS = {
    "valence_sign_accuracy": ">=0.86",
    "quadrant_accuracy": ">=0.78",
    "arousal_sign_accuracy": ">=0.92",
    "mae_valence": "<0.30",
    "mae_arousal": "<0.25",
}


def _row(m: object) -> dict[str, float]:
    d = asdict(m) if not isinstance(m, dict) else m  # type: ignore[call-overload]
    return {k: float(d[k]) for k in METRICS}


def _summary(rows: list[dict[str, float]]) -> dict[str, str]:
    out = {}
    for k in METRICS:
        v = np.array([r[k] for r in rows])
        out[k] = f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else "")
    return out


def features_predictions(split: str, emopia: Path) -> dict[str, np.ndarray]:
    """The bundled features model's graded clip predictions (mean of its bar predictions), by clip name."""
    from midiva.annotate import load_annotation_model
    from midiva.robustness import bar_predictor

    predict = bar_predictor(load_annotation_model(None, device="cpu"))
    return {c.name: predict(c.path.read_bytes()).mean(0).astype(np.float64) for c in list_emopia(emopia, [split]).clips}


def _metrics(pred: np.ndarray, clips: list[ClipData]) -> dict[str, float]:
    q = np.array([c.quadrant for c in clips])
    target = np.array([DEFAULT_LABEL_MAPPING[QUADRANTS[i]] for i in q])
    return _row(level_metrics(pred, target, q))


def barseq_predictor(encoder: BarSeqEncoder, include_drums: bool = True):  # type: ignore[no-untyped-def]
    """MIDI bytes -> (n_bars, 2) expected valence/arousal of barseq, from the tokens annotate gives it (the
    pitched tracks on the file's MuseTok bars; `include_drums=False`: bars of a `--no-drums` run)."""

    def predict(data: bytes) -> np.ndarray:
        midi = load_midi(data)
        tokens = pitched_bar_token_ids(midi, score_to_bars(midi, include_drums=include_drums))
        return encode_songs(encoder, [tokens])[0][:, -2:]

    return predict


def robustness(encoder: BarSeqEncoder, emopia: Path, gigamidi: Path) -> list[dict[str, object]]:
    """Clip metrics and mean |Δ| on val under constant_velocity 100, drums_added and sequenced_band."""
    from midiva.annotate import load_annotation_model
    from midiva.authoring import evaluation_variants, load_drum_patterns
    from midiva.robustness import LabelledClip, bar_predictor, score_variants

    variants = evaluation_variants(load_drum_patterns(sorted(gigamidi.glob("*.mid"))))
    chosen = {
        k: variants[k]
        for k in (
            "velocity_100",
            "quantized_16th",
            "retimed_90bpm_96tpq",
            "tracks_octave_doublings",
            "drums_added",
            "sequenced_band",
        )
    }
    clips = [LabelledClip(c.name, c.song, c.quadrant, c.path.read_bytes()) for c in list_emopia(emopia, ["val"]).clips]
    out = []
    for name, predict in (
        ("barseq", barseq_predictor(encoder)),
        ("barseq, --no-drums bars", barseq_predictor(encoder, include_drums=False)),
        ("features (bundled)", bar_predictor(load_annotation_model(None, device="cpu"))),
    ):
        for s in score_variants(predict, clips, chosen, DEFAULT_LABEL_MAPPING):
            out.append(
                {
                    "model": name,
                    "variant": s.variant,
                    "quadrant_accuracy": s.metrics["quadrant_accuracy"],
                    "valence_sign_accuracy": s.metrics["valence_sign_accuracy"],
                    "mae_valence": s.metrics["mae_valence"],
                    "delta_v": s.mean_abs_delta_valence,
                    "delta_a": s.mean_abs_delta_arousal,
                }
            )
    return out


def speed(encoder: BarSeqEncoder, gigamidi: Path) -> dict[str, float]:
    """Single-thread bars/s on the GigaMIDI sample: barseq encode alone, tokens+barseq, and the features path."""
    from midiva.features import bar_features

    songs, t_tokens, t_features, n_bars = [], 0.0, 0.0, 0
    for path in sorted(gigamidi.glob("*.mid")):
        try:
            t0 = time.perf_counter()
            midi = load_midi(path)
            bars = score_to_bars(midi)
            ids = pitched_bar_token_ids(midi, bars)
            t1 = time.perf_counter()
            bar_features(midi, bars)
            t2 = time.perf_counter()
        except MidivaError:
            continue
        songs.append(ids)
        n_bars += len(ids)
        t_tokens += t1 - t0
        t_features += t2 - t1
    encode_songs(encoder, songs[:2])  # warm-up
    t0 = time.perf_counter()
    encode_songs(encoder, songs)
    t_encode = time.perf_counter() - t0
    return {
        "files": len(songs),
        "bars": n_bars,
        "barseq_encode_bars_per_s": n_bars / t_encode,
        "load_events_bars_per_s": n_bars / t_tokens,
        "features_bars_per_s": n_bars / t_features,
        "features_path_bars_per_s": n_bars / (t_tokens + t_features),
        "barseq_path_bars_per_s": n_bars / (t_tokens + t_encode),
    }


def _fold(song: str, folds: int) -> int:
    return int(hashlib.sha1(song.encode("utf-8")).hexdigest()[:8], 16) % folds


def bootstrap_ci(values: np.ndarray, seed: int = 0, n: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap CI of the mean of per-clip values."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def cross_validate(
    clips: list[ClipData], folds: int, seed: int, settings: TrainSettings, config: BarSeqConfig = BarSeqConfig()
) -> dict[str, object]:
    """Song-grouped k-fold CV over train+val (a song's clips share a fold); pooled out-of-fold metrics."""
    pool = [c for c in clips if c.split in ("train", "val")]
    preds = np.zeros((len(pool), 2))
    from midiva.barseq_train import clip_predictions

    for k in range(folds):
        held = [i for i, c in enumerate(pool) if _fold(c.song, folds) == k]
        train = [c for c in pool if _fold(c.song, folds) != k]  # val clips train without rewrites (none cached)
        net, _ = train_barseq(train, config=config, settings=settings)
        preds[held] = clip_predictions(BarSeqEncoder(net, ""), [pool[i] for i in held])
    q = np.array([c.quadrant for c in pool])
    target = np.array([DEFAULT_LABEL_MAPPING[QUADRANTS[i]] for i in q])
    m = level_metrics(preds, target, q)
    qp = np.array([0 if v >= 0 and a >= 0 else 1 if a >= 0 else 2 if v < 0 else 3 for v, a in preds])
    return {
        "metrics": _row(m),
        "quadrant_ci": bootstrap_ci((qp == q).astype(float), seed),
        "valence_sign_ci": bootstrap_ci(((preds[:, 0] >= 0) == np.isin(q, (0, 3))).astype(float), seed),
    }


def markdown(result: dict) -> str:  # type: ignore[type-arg]
    """The one table (plus robustness and speed when measured)."""
    lines = ["| model | split | n | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS)]
    lines.append("| target | | | " + " | ".join(TARGETS.get(k, "") for k in METRICS) + " |")
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['split']} | {r['n']} | " + " | ".join(r["values"][k] for k in METRICS) + " |"
        )
    if result.get("robustness"):
        lines += [
            "",
            "| model | variant (val) | quad acc | valence sign | MAE V | mean abs Δ V | mean abs Δ A |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["robustness"]:
            lines.append(
                f"| {r['model']} | {r['variant']} | {r['quadrant_accuracy']:.3f} | {r['valence_sign_accuracy']:.3f} | "
                f"{r['mae_valence']:.3f} | {r['delta_v']:.3f} | {r['delta_a']:.3f} |"
            )
    if result.get("speed"):
        lines += [
            "",
            "speed (1 thread, GigaMIDI sample): "
            + ", ".join(f"{k} {v:.0f}" if not isinstance(v, int) else f"{k} {v}" for k, v in result["speed"].items()),
        ]
    if result.get("train_seconds"):
        lines += ["", f"training seconds per run: {', '.join(f'{s:.0f}' for s in result['train_seconds'])}"]
    return "\n".join(lines) + "\n"


def _split_rows(
    result: dict, split: str, clips_s: list, encoders: list[BarSeqEncoder], args: argparse.Namespace
) -> None:
    """The barseq, features and averaged rows of one split, appended to `result`."""
    from midiva.barseq_train import clip_predictions

    preds = [clip_predictions(e, clips_s) for e in encoders]
    seeds = f" ({len(preds)} seeds)" if len(preds) > 1 else ""
    result.setdefault("per_seed", {})[split] = [_metrics(p, clips_s) for p in preds]
    if preds:
        result["rows"].append(
            {
                "model": "barseq head" + seeds,
                "split": split,
                "n": len(clips_s),
                "values": _summary([_metrics(p, clips_s) for p in preds]),
            }
        )
    if not args.no_baseline:
        by_name = features_predictions(split, args.emopia_dir)
        feats = np.stack([by_name[c.name] for c in clips_s])
        result["rows"].append(
            {
                "model": "features (bundled)",
                "split": split,
                "n": len(clips_s),
                "values": _summary([_metrics(feats, clips_s)]),
            }
        )
        if preds:
            result["rows"].append(
                {
                    "model": "mean of barseq head and features" + seeds,
                    "split": split,
                    "n": len(clips_s),
                    "values": _summary([_metrics((p + feats) / 2, clips_s) for p in preds]),
                }
            )


def _cv_rows(clips: list, args: argparse.Namespace) -> list[dict]:
    """Song-grouped CV rows, one per seed."""
    rows = []
    for seed in args.seeds:
        cv = cross_validate(
            clips, args.cv, seed, TrainSettings(epochs=args.epochs, seed=seed), BarSeqConfig(d_model=args.d_model)
        )
        values = {k: f"{v:.3f}" for k, v in cv["metrics"].items()}  # type: ignore[attr-defined]
        lo, hi = cv["quadrant_ci"]  # type: ignore[misc]
        values["quadrant_accuracy"] += f" [{lo:.3f}, {hi:.3f}]"
        lo, hi = cv["valence_sign_ci"]  # type: ignore[misc]
        values["valence_sign_accuracy"] += f" [{lo:.3f}, {hi:.3f}]"
        rows.append(
            {
                "model": f"barseq CV{args.cv} seed {seed}",
                "split": "train+val",
                "n": sum(c.split != "test" for c in clips),
                "values": values,
            }
        )
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help="a barseq checkpoint, or DEFAULT for the bundled one (no training)"
    )
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    parser.add_argument("--augment", type=int, default=8)
    parser.add_argument(
        "--d-model", type=int, default=BarSeqConfig.d_model, help="width of element and bar vectors (trained models)"
    )
    parser.add_argument("--cv", type=int, default=0, help="song-grouped folds over train+val (0: none)")
    parser.add_argument("--test", action="store_true", help="also score test (once, for the final recipe)")
    parser.add_argument("--robustness", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--no-baseline", action="store_true", help="skip the bundled features model rows")
    parser.add_argument("--emopia-dir", type=Path, default=SHARED / "data" / "emopia")
    parser.add_argument("--gigamidi-dir", type=Path, default=SHARED / "data" / "gigamidi_sample")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "barseq_eval")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(1)
    clips = load_clip_data(
        args.emopia_dir, n_augment=args.augment, cache=REPO / "out" / f"barseq_aug{args.augment}.npz"
    )
    by_split = {s: [c for c in clips if c.split == s] for s in ("train", "val", "test")}
    splits = ["val", "test"] if args.test else ["val"]
    result: dict = {"rows": [], "train_seconds": []}
    encoders: list[BarSeqEncoder] = []
    if args.model:
        encoders.append(load_barseq(None if args.model == "DEFAULT" else args.model))
    elif not args.cv:
        for seed in args.seeds:
            t0 = time.perf_counter()
            net, _ = train_barseq(
                by_split["train"],
                config=BarSeqConfig(d_model=args.d_model),
                settings=TrainSettings(epochs=args.epochs, seed=seed),
            )
            result["train_seconds"].append(time.perf_counter() - t0)
            encoders.append(BarSeqEncoder(net, ""))
    for split in splits:
        _split_rows(result, split, by_split[split], encoders, args)
    if args.cv:
        result["rows"] += _cv_rows(clips, args)
    if args.robustness and encoders:
        result["robustness"] = robustness(encoders[0], args.emopia_dir, args.gigamidi_dir)
    if args.speed and encoders:
        result["speed"] = speed(encoders[0], args.gigamidi_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "barseq_eval.json").write_text(json.dumps(result, indent=1, default=float) + "\n", encoding="utf-8")
    text = markdown(result)
    (args.out / "barseq_eval.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0 if all(not (isinstance(v, float) and math.isnan(v)) for v in result.get("speed", {}).values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

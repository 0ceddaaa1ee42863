"""Choose the bundled model's recipe on EMOPIA val: train candidate recipes over seeds, run the
authoring suite on each, print one row per recipe (mean ± std over seeds). Never touches test.

    python benchmarks/robust_recipes.py --data out/emopia-aug4 --plain out/emopia-plain --seeds 3 [--only NAME ...]

--data is `midiva preprocess-emopia --augment 4` output (train clips plus rewritten copies),
--medleys-data the same with `--medleys 800` too, and --plain the same without either; all need
`midiva prepare-labels`.

Besides EMOPIA val and the authoring suite, each row carries a sanity reading on music EMOPIA lacks:
`pop_valence`, the mean valence of 7 upbeat band arrangements of the GigaMIDI sample
(`POP_SANITY_FILES`), and `pop_positive`, how many of them read above 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "src"))

from midiva.annotate import load_annotation_model  # noqa: E402
from midiva.authoring import evaluation_variants, load_drum_patterns  # noqa: E402
from midiva.config import DEFAULT_EXCLUDE_FEATURES  # noqa: E402
from midiva.emopia import list_emopia  # noqa: E402
from midiva.robustness import (  # noqa: E402
    LabelledClip,
    bar_predictor,
    build_medleys,
    file_sensitivity,
    score_medleys,
    score_variants,
)
from midiva.train import TrainConfig, train_from_dir  # noqa: E402

ROBUST_BASE = (
    "pitched_onset_density_per_second",
    "chroma_onset_density_per_second",
    "pitch_class_polyphony",
    "velocity_relative",
    "pitch_mean",
    "pitch_std",
    "pitch_range",
    "bass_pitch",
    "top_pitch",
    "sounding_fraction",
    "sustain_pedal_fraction",
    "duration_seconds",
    "articulation",
    "mode",
    "key_strength",
    "chroma_entropy_bits",
    "consonance",
    "triad_major",
    "triad_minor",
    "triad_diminished",
    "diatonicity",
    "chord_major_fraction",
    "chord_minor_fraction",
)
# A sanity reading, not a label: upbeat, major-key songs of the GigaMIDI sample (band arrangements with
# drums) that a listener would not call sad. `pop_valence` is their mean valence, `pop_positive` how many
# read above 0. EMOPIA has no such music; a recipe that reads them all as sad has learned authoring.
POP_SANITY_FILES = (
    "All The Small Things.mid",
    "Funkytown.mid",
    "Girls Just Want to Have Fun.mid",
    "I Gotta Feeling.mid",
    "Mr. Blue Sky.mid",
    "What a Fool Believes.mid",
    "In Too Deep.mid",
)
OLD_EXCLUDE = ("*_song", "tempo_bpm*", "note_count*", "*_per_beat*", "duration_beats*")
BUNDLED_EXCLUDE = DEFAULT_EXCLUDE_FEATURES  # the bundled recipe's
# the bundled recipe of sessions 3-5: harmony weighted by sounding time (mode, triads, ... instead of onsets_*)
SOUNDING_HARMONY_EXCLUDE = (*OLD_EXCLUDE, "velocity_*", "note_density_*", "onset_density_*", "polyphony*", "onsets_*")


def robust(*drop: str) -> tuple[str, ...]:
    return tuple(p for b in ROBUST_BASE if b not in drop for p in (b, f"{b}_win5"))


RECIPES: dict[str, dict] = {
    "old_recipe_plain": {
        "data": "plain",
        "features": (),
        "exclude": (*OLD_EXCLUDE, "onsets_*"),
        "context": ("window16",),
    },
    "old_recipe_aug": {"data": "aug", "features": (), "exclude": (*OLD_EXCLUDE, "onsets_*"), "context": ("window16",)},
    "robust_plain_w16": {"data": "plain", "features": robust(), "context": ("window16",)},
    "robust_aug_w16": {"data": "aug", "features": robust(), "context": ("window16",)},
    "robust_aug_w8": {"data": "aug", "features": robust(), "context": ("window8",)},
    "robust_aug_w4": {"data": "aug", "features": robust(), "context": ("window4",)},
    "robust_aug_w4_w16": {"data": "aug", "features": robust(), "context": ("window4", "window16")},
    "robust_novel_aug_w8": {"data": "aug", "features": robust("velocity_relative"), "context": ("window8",)},
    "robust_nopedal_aug_w8": {"data": "aug", "features": robust("sustain_pedal_fraction"), "context": ("window8",)},
    # the bundled recipe of sessions 3-5: the same columns as robust("velocity_relative"), chosen by exclusion
    "novel_med_w8": {"data": "med", "features": (), "exclude": SOUNDING_HARMONY_EXCLUDE, "context": ("window8",)},
    # the bundled recipe (scripts/train_default_model.sh): harmony from onsets instead of sounding time
    "onsets_med_w8": {"data": "med", "features": (), "exclude": BUNDLED_EXCLUDE, "context": ("window8",)},
    "novel_med_w8_no_top_range": {
        "data": "med",
        "features": (),
        "context": ("window8",),
        "exclude": (*SOUNDING_HARMONY_EXCLUDE, "top_pitch*", "pitch_range*"),
    },
    "novel_med_w4": {"data": "med", "features": robust("velocity_relative"), "context": ("window4",)},
    "novel_med_w8_h128": {
        "data": "med",
        "features": robust("velocity_relative"),
        "context": ("window8",),
        "config": {"hidden_dim": 128, "dropout": 0.3},
    },
    "novel_med_w4_w16": {"data": "med", "features": robust("velocity_relative"), "context": ("window4", "window16")},
    "robust_aug_w8_h128": {
        "data": "aug",
        "features": robust(),
        "context": ("window8",),
        "config": {"hidden_dim": 128, "dropout": 0.3},
    },
    "robust_aug_w6_h128_d4": {
        "data": "aug",
        "features": robust(),
        "context": ("window6",),
        "config": {"hidden_dim": 128, "dropout": 0.4},
    },
    # session 7's training options; onsets_med_w8_clip3 on --augment-backing data is the bundled recipe since session 9
    "onsets_med_w8_clip3": {
        "data": "med",
        "features": (),
        "exclude": BUNDLED_EXCLUDE,
        "context": ("window8",),
        "config": {"input_clip": 3.0},
    },
    "onsets_med_w8_clip2": {
        "data": "med",
        "features": (),
        "exclude": BUNDLED_EXCLUDE,
        "context": ("window8",),
        "config": {"input_clip": 2.0},
    },
    "onsets_med_w8_fdrop02": {
        "data": "med",
        "features": (),
        "exclude": BUNDLED_EXCLUDE,
        "context": ("window8",),
        "config": {"feature_dropout": 0.2},
    },
    "onsets_med_w8_clip3_fdrop01": {
        "data": "med",
        "features": (),
        "exclude": BUNDLED_EXCLUDE,
        "context": ("window8",),
        "config": {"input_clip": 3.0, "feature_dropout": 0.1},
    },
    # feature dropout on only one family of bar features: texture (densities, polyphony, sounding, pedal,
    # duration, articulation) or harmony (onset-weighted mode/triads/..., chord fractions)
    "onsets_med_w8_clip3_fdrop_texture02": {
        "data": "med",
        "features": (),
        "exclude": BUNDLED_EXCLUDE,
        "context": ("window8",),
        "config": {
            "input_clip": 3.0,
            "feature_dropout": 0.2,
            "feature_dropout_features": (
                "pitched_onset_density_per_second",
                "chroma_onset_density_per_second",
                "pitch_class_polyphony",
                "sounding_fraction",
                "sustain_pedal_fraction",
                "duration_seconds",
                "articulation",
            ),
        },
    },
    "onsets_med_w8_clip3_fdrop_harmony02": {
        "data": "med",
        "features": (),
        "exclude": BUNDLED_EXCLUDE,
        "context": ("window8",),
        "config": {"input_clip": 3.0, "feature_dropout": 0.2, "feature_dropout_features": ("onsets_*", "chord_*")},
    },
    "onsets_med_w8_no_artic": {
        "data": "med",
        "features": (),
        "exclude": (*BUNDLED_EXCLUDE, "articulation*"),
        "context": ("window8",),
    },
    "robust_aug_w8_acc": {
        "data": "aug",
        "features": robust(),
        "context": ("window8",),
        "config": {"hidden_dim": 128, "dropout": 0.3, "monitor": "clip.quadrant_accuracy"},
    },
}


def evaluate(model_path: Path, clips: list[LabelledClip], variants: dict, medleys: list, giga: dict) -> dict:
    model = load_annotation_model(model_path, device="cpu")
    predict = bar_predictor(model)
    scores = score_variants(predict, clips, variants, model.regressor.label_mapping)
    orig = scores[0].metrics
    rest = scores[1:]
    med = score_medleys(predict, medleys)
    sens = file_sensitivity(predict, giga)
    n_bars = sum(s.n_bars for s in sens)
    pop = [float(predict(giga[name])[:, 0].mean()) for name in POP_SANITY_FILES if name in giga]
    return {
        "quadrant_accuracy": orig["quadrant_accuracy"],
        "ccc_valence": orig["ccc_valence"],
        "valence_sign_accuracy": orig["valence_sign_accuracy"],
        "arousal_sign_accuracy": orig["arousal_sign_accuracy"],
        "mae_valence": orig["mae_valence"],
        "mae_arousal": orig["mae_arousal"],
        "worst_variant_acc_drop": max(orig["quadrant_accuracy"] - s.metrics["quadrant_accuracy"] for s in rest),
        "worst_variant_arousal_sign": min(s.metrics["arousal_sign_accuracy"] for s in rest),
        "worst_delta_valence": max(s.mean_abs_delta_valence for s in rest),
        "worst_delta_arousal": max(s.mean_abs_delta_arousal for s in rest),
        "worst_variant": max(rest, key=lambda s: max(s.mean_abs_delta_valence, s.mean_abs_delta_arousal)).variant,
        "medley_bar_accuracy": med.bar_quadrant_accuracy,
        "medley_median_lag": med.median_lag_bars,
        "giga_max_delta_valence": max(max(s.delta_valence_no_drums, s.delta_valence_flat_velocity) for s in sens),
        "giga_fraction_beyond_085": sum(s.n_bars_beyond for s in sens) / max(n_bars, 1),
        "pop_valence": float(np.mean(pop)) if pop else float("nan"),
        "pop_positive": float(sum(v > 0 for v in pop)),
        "variants": {
            s.variant: {
                "acc": s.metrics.get("quadrant_accuracy"),
                "dv": s.mean_abs_delta_valence,
                "da": s.mean_abs_delta_arousal,
                "arousal_sign": s.metrics.get("arousal_sign_accuracy"),
            }
            for s in scores
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--plain", type=Path, required=True)
    parser.add_argument("--medleys-data", type=Path, default=None, help="--augment 4 --medleys 800 output")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--medleys", type=int, default=300)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=Path("out/robust_recipes.json"))
    parser.add_argument("--emopia-dir", type=Path, default=SHARED / "data" / "emopia")
    parser.add_argument("--gigamidi-dir", type=Path, default=SHARED / "data" / "gigamidi_sample")
    args = parser.parse_args(argv)
    listing = list_emopia(args.emopia_dir, ["val"])
    clips = [LabelledClip(c.name, c.song, c.quadrant, c.path.read_bytes()) for c in listing.clips]
    variants = evaluation_variants(load_drum_patterns(sorted(args.gigamidi_dir.glob("*.mid"))))
    medleys = build_medleys(clips, args.medleys, seed=0)
    giga = {p.name: p.read_bytes() for p in sorted(args.gigamidi_dir.glob("*.mid"))}
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name, recipe in RECIPES.items():
        if args.only and name not in args.only:
            continue
        runs = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as tmp:
                model = Path(tmp) / "m.safetensors"
                data = {"aug": args.data, "plain": args.plain, "med": args.medleys_data}[recipe["data"]]
                train_from_dir(
                    data,
                    model,
                    features=recipe["features"],
                    exclude_features=recipe.get("exclude", ()),
                    context=recipe["context"],
                    config=TrainConfig(seed=seed, **recipe.get("config", {})),
                )
                runs.append(evaluate(model, clips, variants, medleys, giga))
        keys = [k for k, v in runs[0].items() if isinstance(v, float)]
        results[name] = {"seeds": args.seeds, **{k: [r[k] for r in runs] for k in runs[0]}}
        row = "  ".join(f"{k}={np.mean([r[k] for r in runs]):.3f}±{np.std([r[k] for r in runs]):.3f}" for k in keys)
        print(f"{name}: {row}  worst={[r['worst_variant'] for r in runs]}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Authoring-robustness suite: score a model on rewritten copies of EMOPIA val (and test, reported only).

    python benchmarks/authoring.py                                  # the bundled model, val
    python benchmarks/authoring.py --model M.safetensors --split val --split test --out out/authoring
    python benchmarks/authoring.py --model M --backend hybrid --checkpoint model.pt   # any backend

For each rewrite of `midiva.authoring.evaluation_variants` (constant velocities 40/64/100/127, a
compressed band, 16th quantization, two retimings at other tempo/resolution with the same seconds,
melody/bass/accompaniment tracks with and without octave doublings, no pedal, notated note lengths
(each note ends where its voice's next note begins), transpositions,
an added drum track cut from the GigaMIDI sample, all of it at once as a "sequenced band", and a
band backing of the clip's own harmony, pad and power-chord guitar, without and with drums)
it prints the clip metrics and the mean |Δ| of clip predictions against the unrewritten clips;
then medleys of val clips (bar accuracy against each bar's own segment, lag after boundaries);
then per GigaMIDI-sample file the |Δ| of mean valence/arousal without drums and with flat velocities.
Writes `authoring.json` and `authoring.md` to --out. Choices are made on val; test is only reported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "src"))

from midiva.annotate import load_annotation_model  # noqa: E402
from midiva.authoring import evaluation_variants, load_drum_patterns  # noqa: E402
from midiva.emopia import list_emopia  # noqa: E402
from midiva.robustness import (  # noqa: E402
    LabelledClip,
    bar_predictor,
    build_medleys,
    file_sensitivity,
    score_medleys,
    score_variants,
)

TABLE_METRICS = (
    "quadrant_accuracy",
    "valence_sign_accuracy",
    "arousal_sign_accuracy",
    "mae_valence",
    "mae_arousal",
    "ccc_valence",
    "ccc_arousal",
)


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def run(
    model: str | None,
    emopia: Path,
    gigamidi: Path,
    splits: list[str],
    n_medleys: int,
    seed: int,
    backend: str | None = None,
    checkpoint: str | None = None,
    max_clips: int = 0,
) -> dict:
    """Run the whole suite; returns a JSON-ready dict."""
    annotation_model = load_annotation_model(model, backend=backend, checkpoint=checkpoint, device="cpu")
    predict = bar_predictor(annotation_model)
    mapping = annotation_model.regressor.label_mapping
    patterns = load_drum_patterns(sorted(gigamidi.glob("*.mid")))
    variants = evaluation_variants(patterns)
    result: dict = {
        "model": model or "bundled",
        "fingerprint": annotation_model.fingerprint,
        "drum_patterns": len(patterns),
        "splits": {},
    }
    for split in splits:
        listing = list_emopia(emopia, [split])
        clips = [LabelledClip(c.name, c.song, c.quadrant, c.path.read_bytes()) for c in listing.clips]
        if max_clips:  # spread over the sorted list, so every quadrant stays in
            clips = clips[:: max(1, len(clips) // max_clips)][:max_clips]
        t0 = time.perf_counter()

        def progress(name: str, split: str = split) -> None:
            print(f"  {split}: {name}", file=sys.stderr)

        scores = score_variants(predict, clips, variants, mapping, seed=seed, progress=progress)
        entry: dict = {"variants": [asdict(s) for s in scores], "seconds": round(time.perf_counter() - t0, 1)}
        if n_medleys:
            medleys = build_medleys(clips, n_medleys, seed=seed)
            entry["medleys"] = {k: v for k, v in asdict(score_medleys(predict, medleys)).items() if k != "lags"}
        result["splits"][split] = entry
    files = {p.name: p.read_bytes() for p in sorted(gigamidi.glob("*.mid"))}
    result["gigamidi"] = [asdict(s) for s in file_sensitivity(predict, files)]
    return result


def markdown(result: dict) -> str:
    """The suite's tables as Markdown."""
    lines = [f"model: {result['model']}  ", f"drum patterns: {result['drum_patterns']}", ""]
    for split, entry in result["splits"].items():
        lines += [
            f"### {split}",
            "",
            "| variant | clips | failed | " + " | ".join(TABLE_METRICS) + " | mean abs Δ V | mean abs Δ A |",
            "|---|" + "---|" * (len(TABLE_METRICS) + 4),
        ]
        for s in entry["variants"]:
            cells = [_fmt(s["metrics"].get(k, float("nan"))) for k in TABLE_METRICS]
            lines.append(
                f"| {s['variant']} | {s['n_clips']} | {s['n_failed']} | "
                + " | ".join(cells)
                + f" | {_fmt(s['mean_abs_delta_valence'])} | {_fmt(s['mean_abs_delta_arousal'])} |"
            )
        if "medleys" in entry:
            m = entry["medleys"]
            lines += [
                "",
                f"medleys: {m['n_medleys']} ({m['n_bars']} bars, {m['n_boundaries']} boundaries): "
                f"bar quadrant accuracy {_fmt(m['bar_quadrant_accuracy'])}, median lag {m['median_lag_bars']:g} bars, "
                f"mean lag {_fmt(m['mean_lag_bars'])}",
            ]
        lines.append("")
    g = result["gigamidi"]
    lines += [
        "### GigaMIDI sample: |Δ| of the file's mean prediction",
        "",
        "| file | bars | valence | arousal | Δ V no drums | Δ A no drums | Δ V flat velocity | Δ A flat velocity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in g:
        lines.append(
            f"| {s['name']} | {s['n_bars']} | {_fmt(s['valence'])} | {_fmt(s['arousal'])} | "
            f"{_fmt(s['delta_valence_no_drums'])} | {_fmt(s['delta_arousal_no_drums'])} | "
            f"{_fmt(s['delta_valence_flat_velocity'])} | {_fmt(s['delta_arousal_flat_velocity'])} |"
        )
    worst = max((max(s["delta_valence_no_drums"], s["delta_valence_flat_velocity"]) for s in g), default=float("nan"))
    lines += ["", f"largest |Δ mean valence| over files and both rewrites: {_fmt(worst)}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="regressor .safetensors (default: the bundled model)")
    parser.add_argument("--backend", default=None, help="the model's backend (checked against it)")
    parser.add_argument("--checkpoint", default=None, help="MuseTok checkpoint for musetok/hybrid models")
    parser.add_argument("--emopia-dir", type=Path, default=SHARED / "data" / "emopia")
    parser.add_argument("--gigamidi-dir", type=Path, default=SHARED / "data" / "gigamidi_sample")
    parser.add_argument("--split", action="append", default=None, help="EMOPIA split(s) to score (default: val)")
    parser.add_argument("--medleys", type=int, default=300, help="medleys per split (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-clips", type=int, default=0, help="score only N clips spread over the split (0: all)")
    parser.add_argument("--out", type=Path, default=Path("out/authoring"))
    args = parser.parse_args(argv)
    result = run(
        args.model,
        args.emopia_dir,
        args.gigamidi_dir,
        args.split or ["val"],
        args.medleys,
        args.seed,
        args.backend,
        args.checkpoint,
        args.max_clips,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "authoring.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    text = markdown(result)
    (args.out / "authoring.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

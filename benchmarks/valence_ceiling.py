"""How far can the features backend push EMOPIA valence MAE? Ablations, scored on val only.

Needs a preprocessed and labelled EMOPIA directory (see `benchmarks/train_seeds.py`):

    python benchmarks/valence_ceiling.py --data out/emopia-features --seeds 3

Each variant trains `--seeds` seeds with the bundled model's recipe and hyperparameters
(`train_seeds.py` defaults) changed as named, and prints val clip-level MAE (valence, arousal),
valence sign accuracy and quadrant accuracy, mean ± std over seeds. The test split is never
loaded. Variants:

- the bundled recipe; wider and more regularised; no regularisation with early stopping on val MAE;
  whole-piece (`*_song`) columns; a piece-std context block;
- `clip-l1`: the loss is L1 between each clip's mean bar prediction and its label (the quantity the
  clip metrics score), patched into `midiva.train` for this process only;
- `+key-degrees`: 26 whole-clip columns added to every bar: Krumhansl-Kessler mode of the clip, a
  major/minor flag, and the clip's chroma and bass chroma rotated to the estimated tonic;
- `quadrant-points`: not a model, a decoding of the bundled recipe's predictions: each clip's mean
  prediction replaced by the label point of its quadrant. It shows how much of the MAE is hedging
  between the four label points rather than wrong signs; it turns the regressor into a 4-way
  classifier, so midiva does not ship it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_seeds

import midiva.train as train_module
from midiva.emopia import pad_clips
from midiva.labels import DEFAULT_LABEL_MAPPING
from midiva.latents import load_bar_tensors, save_bar_tensors
from midiva.metrics import masked_metrics, quadrant_of

BASE_EXCLUDE = "*_song,tempo_bpm*,note_count*,*_per_beat*,duration_beats*"
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
KEY_COLUMNS = ["clip_mode", "clip_major", *(f"degree_{i}" for i in range(12)), *(f"bass_degree_{i}" for i in range(12))]


def clip_l1_loss(pred: Any, target: Any, mask: Any, kind: str = "mse", clip_weighting: bool = False) -> Any:
    """L1 between each clip's mean prediction over real bars and its mean target."""
    import torch

    m = mask.unsqueeze(-1)
    count = m.sum(1).clamp(min=1)
    zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
    p = torch.where(m, pred, zero).sum(1) / count
    t = torch.where(m, target, zero).sum(1) / count
    return (p - t).abs().mean(-1)[mask.any(1)].mean()


@contextmanager
def patched_loss(loss: Callable[..., Any] | None) -> Iterator[None]:
    """Swap `midiva.train.masked_loss` for this block (None: leave it)."""
    original = train_module.masked_loss
    if loss is not None:
        train_module.masked_loss = loss
    try:
        yield
    finally:
        train_module.masked_loss = original


def key_degree_columns(midi_path: Path) -> np.ndarray:
    """`KEY_COLUMNS` of one whole clip (duration-weighted chroma; bass = pitches below 55)."""
    import symusic

    score = symusic.Score(str(midi_path))
    chroma, bass = np.zeros(12), np.zeros(12)
    for track in score.tracks:
        if track.is_drum:
            continue
        notes = track.notes.numpy()
        pitch, duration = notes["pitch"], notes["duration"].astype(np.float64)
        np.add.at(chroma, pitch % 12, duration)
        low = pitch < 55
        np.add.at(bass, pitch[low] % 12, duration[low])
    profiles = np.stack([np.roll(p, k) for p in (KK_MAJOR, KK_MINOR) for k in range(12)])
    profiles = (profiles - profiles.mean(1, keepdims=True)) / profiles.std(1, keepdims=True)
    z = (chroma - chroma.mean()) / max(chroma.std(), 1e-9)
    corr = profiles @ z / 12
    best = int(np.argmax(corr))
    tonic = best % 12
    return np.concatenate(
        [
            [corr[:12].max() - corr[12:].max(), float(best < 12)],
            np.roll(chroma / max(chroma.sum(), 1e-9), -tonic),
            np.roll(bass / max(bass.sum(), 1e-9), -tonic),
        ]
    ).astype(np.float32)


def with_key_degrees(data: Path, emopia_dir: Path, out: Path) -> Path:
    """A copy of a preprocessed directory whose clips carry `KEY_COLUMNS` as extra bar features."""
    for item in data.iterdir():
        if item.suffix in (".json", ".csv"):
            shutil.copy2(item, out / item.name)
    (out / "clips").mkdir()
    for path in sorted((data / "clips").glob("*.safetensors")):
        tensors, meta = load_bar_tensors(path)
        extra = key_degree_columns(emopia_dir / "midis" / meta.get("source", path.stem + ".mid"))
        tensors["features"] = np.hstack([tensors["features"], np.repeat(extra[None], len(tensors["features"]), 0)])
        meta["feature_names"] = json.dumps([*json.loads(meta["feature_names"]), *KEY_COLUMNS])
        save_bar_tensors(out / "clips" / path.name, tensors, meta)
    return out


def quadrant_point_metrics(runs: train_seeds.SeedRuns) -> list[dict[str, float]]:
    """Val metrics per seed after replacing each clip's mean prediction by its quadrant's label point."""
    points = np.array([DEFAULT_LABEL_MAPPING[q] for q in ("Q1", "Q2", "Q3", "Q4")], np.float32)
    val = runs.sets["val"]
    out = []
    for seed_preds in runs.preds["val"]:
        snapped = []
        for p in seed_preds:
            mean = p.mean(0, keepdims=True)
            q = quadrant_of(mean[:, 0], mean[:, 1])[0]
            snapped.append(np.repeat(points[q][None], len(p), 0))
        out.append(masked_metrics(*pad_clips(snapped, val.targets), val.quadrants).to_dict())
    return out


def row(name: str, scores: list[dict[str, float]]) -> str:
    """One table line: mean ± std over seeds of the headline val metrics."""
    cells = []
    for key in ("clip.mae_valence", "clip.mae_arousal", "clip.valence_sign_accuracy", "clip.quadrant_accuracy"):
        v = np.array([s[key] for s in scores])
        cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    """Run the variants and print a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", type=Path, required=True, help="preprocessed + labelled EMOPIA directory (features backend)"
    )
    p.add_argument("--emopia-dir", type=Path, default=Path("../shared/data/emopia"), help="for the key-degree columns")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    common = ["--data", str(args.data), "--seeds", str(args.seeds), "--no-test"]
    variants: list[tuple[str, list[str], Callable[..., Any] | None]] = [
        ("bundled recipe", [], None),
        ("hidden 128, dropout 0.4", ["--hidden-dim", "128", "--dropout", "0.4"], None),
        (
            "no dropout/weight decay, stop on val MAE valence",
            ["--dropout", "0", "--weight-decay", "0", "--monitor", "clip.mae_valence", "--patience", "60"],
            None,
        ),
        ("+ *_song columns", ["--exclude-features", BASE_EXCLUDE.replace("*_song,", "")], None),
        ("+ piece-std context", ["--context", "window16,std"], None),
        ("clip-l1 loss", [], clip_l1_loss),
        (
            "clip-l1 loss, lr 0.003, stop on val MAE valence",
            ["--lr", "0.003", "--monitor", "clip.mae_valence", "--patience", "60"],
            clip_l1_loss,
        ),
    ]
    print("| variant (val, features backend) | clip MAE valence | clip MAE arousal | valence sign acc | quadrant acc |")
    print("|---|---|---|---|---|")
    for name, extra, loss in variants:
        with patched_loss(loss):
            runs = train_seeds.run_seeds(train_seeds.parse_args([*common, *extra]))
        print(row(name, runs.scores["val"]), flush=True)
        if name == "bundled recipe":
            print(
                row("bundled recipe, decoded to quadrant points (not shipped)", quadrant_point_metrics(runs)),
                flush=True,
            )
    with tempfile.TemporaryDirectory() as tmp:
        augmented = with_key_degrees(args.data, args.emopia_dir, Path(tmp))
        runs = train_seeds.run_seeds(
            train_seeds.parse_args(["--data", str(augmented), "--seeds", str(args.seeds), "--no-test"])
        )
        print(row("+ key-degree columns (26)", runs.scores["val"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Snapshot events, token ids and bar features of the shared corpora, or compare with a snapshot.

    python scripts/features_snapshot.py --save before.npz      # on the old code
    python scripts/features_snapshot.py --compare before.npz   # on the new code: exit 1 on any difference

Covers every file of EMOPIA, the GigaMIDI sample and the hard cases, with drums kept and dropped.
A speed-up must leave all of it bit-identical: the comparison is exact (`np.array_equal` on the
float32 features, dtypes included), not a tolerance. Files that fail (a MidivaError or a crash) are recorded by error type.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from midiva.events import score_to_bars
from midiva.features import bar_features
from midiva.midi import load_midi

REPO = Path(__file__).resolve().parents[1]


def snapshot(shared: Path) -> dict[str, np.ndarray]:
    """name -> array for every file and option set (features, token ids, bar starts, event hash)."""
    folders = [
        shared / "data" / "emopia" / "midis",
        shared / "data" / "gigamidi_sample",
        shared / "data" / "hard_cases",
    ]
    out: dict[str, np.ndarray] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.mid")):
            for drums in (True, False):
                key = f"{folder.name}/{path.name}/drums={drums}"
                try:
                    midi = load_midi(path)
                    bars = score_to_bars(midi, include_drums=drums)
                    feats = bar_features(midi, bars)
                except Exception as err:  # a crash is part of the behaviour to keep
                    out[f"{key}/error"] = np.array(type(err).__name__)
                    continue
                out[f"{key}/features"] = feats.values
                out[f"{key}/token_ids"] = np.asarray(bars.token_ids, np.int64)
                out[f"{key}/bar_starts"] = np.asarray(bars.bar_starts, np.int64)
                out[f"{key}/events"] = np.array("\n".join(bars.events))
                out[f"{key}/report"] = np.array(sorted(bars.report.to_dict().items()), dtype=object).astype(str)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", type=Path, help="write the snapshot here (.npz)")
    mode.add_argument("--compare", type=Path, help="compare with this snapshot; exit 1 on any difference")
    args = parser.parse_args(argv)
    current = snapshot(args.shared)
    if args.save:
        np.savez_compressed(args.save, **current)
        print(f"saved {len(current)} arrays to {args.save}", file=sys.stderr)
        return 0
    with np.load(args.compare, allow_pickle=False) as saved:
        before = {k: saved[k] for k in saved.files}
    differ = sorted(
        k
        for k in set(before) | set(current)
        if k not in before
        or k not in current
        or before[k].dtype != current[k].dtype
        or not np.array_equal(before[k], current[k])
    )
    n_features = sum(k.endswith("/features") for k in current)
    for key in differ[:20]:
        print(f"differs: {key}", file=sys.stderr)
    print(f"{len(current)} arrays ({n_features} feature tables) compared: {len(differ)} differ", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())

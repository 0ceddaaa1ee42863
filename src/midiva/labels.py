"""Labels: EMOPIA quadrants -> (valence, arousal) targets per clip and per bar.

Input: `clips.csv` of a `preprocess-emopia` directory (clip, split, quadrant, song, n_bars and,
for medleys, the quadrant of every bar) and a quadrant -> (valence, arousal) mapping (default
`DEFAULT_LABEL_MAPPING`, or a YAML/TOML file read by `read_label_mapping`). Output: the label
files `labels_clip.json` and `labels_bar.json` (`prepare_labels`) and, read back, one
`ClipLabel` per clip with targets (n_bars, 2) float32 (`read_labels`). Units: valence and
arousal unitless in [-1, 1], the units of EMOPIA's quadrant points.

Both label files share one format: `{"format": "midiva.labels/1", "level": "clip"|"bar",
"mapping": {"Q1": [v, a], ...}, "split_source": ..., "clips": [{"clip", "split", "quadrant",
"song", "n_bars", "valence", "arousal"}, ...]}` where valence/arousal are numbers (clip level)
or lists with one value per bar (bar level). Training reads the bar-level file; a clip-level
file is read as constant bars. A checkpoint stores the mapping it was trained with.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva.atomic import write_text_atomic
from midiva.config import parse_toml
from midiva.errors import DataError

log = logging.getLogger(__name__)

# EMOPIA quadrant -> (valence, arousal): Russell's circumplex, Q1 happy ... Q4 calm/content.
DEFAULT_LABEL_MAPPING: dict[str, tuple[float, float]] = {
    "Q1": (0.8, 0.6),
    "Q2": (-0.6, 0.8),
    "Q3": (-0.8, -0.4),
    "Q4": (0.4, -0.6),
}
QUADRANTS = ("Q1", "Q2", "Q3", "Q4")
LABELS_FORMAT = "midiva.labels/1"


def check_label_mapping(
    mapping: Mapping[str, Sequence[float]], origin: str = "label mapping"
) -> dict[str, tuple[float, float]]:
    """Validate a quadrant -> (valence, arousal) mapping: Q1..Q4, two finite values in [-1, 1] each.

    Raises:
        DataError: a quadrant is missing or unknown, or a value is not a number in [-1, 1].
    """
    unknown = sorted(set(mapping) - set(QUADRANTS))
    missing = [q for q in QUADRANTS if q not in mapping]
    if unknown or missing:
        raise DataError(f"{origin} must map exactly Q1..Q4; missing {missing}, unknown {unknown}")
    out: dict[str, tuple[float, float]] = {}
    for q in QUADRANTS:
        value = mapping[q]
        try:
            pair = tuple(float(v) for v in value)
        except (TypeError, ValueError) as err:
            raise DataError(f"{origin}: {q} must be [valence, arousal], got {value!r}") from err
        if len(pair) != 2 or not all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in pair):
            raise DataError(f"{origin}: {q} must be two numbers in [-1, 1], got {value!r}")
        out[q] = (pair[0], pair[1])
    return out


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file with a header, values stripped.

    Raises:
        DataError: the file cannot be read.
    """
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read {str(path)!r}: {err}") from err


def read_label_mapping(path: Path | str) -> dict[str, tuple[float, float]]:
    """Read a quadrant -> (valence, arousal) mapping from YAML or TOML.

    Accepts `Q1: [0.8, 0.6]` or `Q1: {valence: 0.8, arousal: 0.6}`, at the top level or under `mapping`.

    Raises:
        DataError: unreadable file, unknown format, or an invalid mapping.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read label mapping {str(path)!r}: {err.strerror or err}") from err
    try:
        data: Any = parse_toml(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise DataError(f"label mapping {str(path)!r} cannot be parsed: {err}") from err
    if isinstance(data, dict) and "mapping" in data:
        data = data["mapping"]
    if not isinstance(data, dict):
        raise DataError(f"label mapping {str(path)!r} must be a table of Q1..Q4, got {type(data).__name__}")
    pairs: dict[str, Any] = {
        str(k): ([v.get("valence"), v.get("arousal")] if isinstance(v, dict) else v) for k, v in data.items()
    }
    return check_label_mapping(pairs, f"label mapping {str(path)!r}")


@dataclass(frozen=True)
class LabelFiles:
    """Paths written by `prepare_labels`."""

    clip_path: Path
    bar_path: Path
    n_clips: int
    mapping: dict[str, tuple[float, float]]


def prepare_labels(
    data_dir: Path | str, mapping: Mapping[str, Sequence[float]] | None = None, out_dir: Path | str | None = None
) -> LabelFiles:
    """Write labels_clip.json and labels_bar.json for the clips listed in `<data_dir>/clips.csv`.

    Raises:
        DataError: no clips.csv (run preprocess first), it lists no clips or it is malformed.
    """
    data = Path(data_dir)
    quads = check_label_mapping(mapping if mapping is not None else DEFAULT_LABEL_MAPPING)
    manifest = data / "clips.csv"
    if not manifest.is_file():
        raise DataError(f"{str(manifest)!r} is missing; run `midiva preprocess-emopia --out {data}` first")
    rows = read_csv_rows(manifest)
    if not rows:
        raise DataError(f"{str(manifest)!r} lists no clips; preprocessing produced nothing usable (see failures.csv)")
    missing = [c for c in ("fname", "quadrant", "song", "split", "n_bars") if c not in rows[0]]
    if missing:
        raise DataError(
            f"{str(manifest)!r} lacks the columns {missing}; it is not a preprocess-emopia clips.csv: "
            f"rerun `midiva preprocess-emopia --out {data} --no-resume`"
        )
    split_source = "unknown"
    if (data / "preprocess.json").is_file():
        try:
            info = json.loads((data / "preprocess.json").read_text(encoding="utf-8"))
            split_source = str(info.get("split_source", "unknown"))
        except (OSError, ValueError, AttributeError) as err:
            raise DataError(f"cannot read {str(data / 'preprocess.json')!r}: {err}; rerun preprocess-emopia") from err
    head = {"format": LABELS_FORMAT, "mapping": {q: list(v) for q, v in quads.items()}, "split_source": split_source}
    clip_items, bar_items = [], []
    for i, row in enumerate(rows, start=2):
        try:
            v, a = quads[row["quadrant"]]
            n = int(row["n_bars"])
        except (KeyError, ValueError) as err:
            raise DataError(
                f"{str(manifest)!r} line {i}: bad quadrant {row['quadrant']!r} or n_bars "
                f"{row['n_bars']!r} ({type(err).__name__}); rerun preprocess-emopia"
            ) from err
        base = {
            "clip": row["fname"],
            "split": row["split"],
            "quadrant": row["quadrant"],
            "song": row["song"],
            "n_bars": n,
        }
        clip_items.append({**base, "valence": v, "arousal": a})
        runs = row.get("bar_quadrants") or ""
        if runs:  # a medley: every bar has its own segment's label
            from midiva.emopia import parse_run_lengths

            per_bar = parse_run_lengths(runs)
            if len(per_bar) != n or any(q not in quads for q in per_bar):
                raise DataError(
                    f"{str(manifest)!r} line {i}: bar labels {runs!r} do not give {n} known quadrants; "
                    "rerun preprocess-emopia"
                )
            bar_items.append(
                {**base, "valence": [quads[q][0] for q in per_bar], "arousal": [quads[q][1] for q in per_bar]}
            )
        else:
            bar_items.append({**base, "valence": [v] * n, "arousal": [a] * n})
    target = Path(out_dir) if out_dir is not None else data
    clip_path, bar_path = target / "labels_clip.json", target / "labels_bar.json"
    write_text_atomic(clip_path, json.dumps({**head, "level": "clip", "clips": clip_items}, indent=1) + "\n")
    write_text_atomic(bar_path, json.dumps({**head, "level": "bar", "clips": bar_items}) + "\n")
    return LabelFiles(clip_path, bar_path, len(rows), quads)


@dataclass(frozen=True)
class ClipLabel:
    """Labels of one clip: per-bar targets (n_bars, 2) and its quadrant."""

    clip: str
    split: str
    quadrant: str
    targets: npt.NDArray[np.float32]


def read_labels(path: Path | str) -> tuple[dict[str, ClipLabel], dict[str, tuple[float, float]]]:
    """Read a label file (clip or bar level) -> ({clip: ClipLabel}, mapping).

    Raises:
        DataError: missing file, wrong format, or inconsistent bar counts.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"no label file {str(path)!r}; run `midiva prepare-labels --data DIR` first") from err
    except json.JSONDecodeError as err:
        raise DataError(f"label file {str(path)!r} is not JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != LABELS_FORMAT or data.get("level") not in ("clip", "bar"):
        raise DataError(f"{str(path)!r} is not a {LABELS_FORMAT} label file (see `midiva prepare-labels`)")
    mapping = check_label_mapping(data["mapping"], f"mapping in {path.name}")
    out: dict[str, ClipLabel] = {}
    for item in data["clips"]:
        n = int(item["n_bars"])
        if data["level"] == "bar":
            v, a = np.asarray(item["valence"], np.float32), np.asarray(item["arousal"], np.float32)
        else:
            v, a = np.full(n, item["valence"], np.float32), np.full(n, item["arousal"], np.float32)
        if v.shape != (n,) or a.shape != (n,):
            raise DataError(f"{path.name}: clip {item['clip']!r} has {n} bars but {v.size}/{a.size} labels")
        if item["quadrant"] not in QUADRANTS:
            raise DataError(
                f"{path.name}: clip {item['clip']!r} has quadrant {item['quadrant']!r}, not one of {QUADRANTS}"
            )
        out[item["clip"]] = ClipLabel(item["clip"], item["split"], item["quadrant"], np.stack([v, a], axis=1))
    return out, mapping

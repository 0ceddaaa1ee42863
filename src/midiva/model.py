"""Stage 5: the valence/arousal regressor — bar representation in, (valence, arousal) per bar out.

Input: per-bar representations of one piece, `features` (n_bars, n_features) from
`midiva.features` and/or MuseTok `latents` (n_bars, latent_dim) from `midiva.latents`.
`Regressor.make_inputs` turns them into model inputs (n_bars, input_dim) — the same function
for training and annotation — and `Regressor.predict` maps those to (n_bars, 2) float32:
column 0 valence, column 1 arousal, both in [-1, 1] (the units of EMOPIA's quadrant points).

A checkpoint is one `.safetensors` file: the MLP's tensors (input normalisation included) plus a
JSON header that describes everything needed to use it (backend, input recipe, label mapping,
metrics, training settings, versions). `load_regressor()` with no path loads the bundled model.

Also here, because the checkpoint carries them: the quadrant -> (valence, arousal) label mapping
and the label files built from it, and the metrics (`Metrics`: MAE/MSE/RMSE, Pearson, CCC,
quadrant accuracy at bar and clip level) with their plots.

Label files (`labels_clip.json`, `labels_bar.json`, written by `prepare_labels`) share one format:
`{"format": "midiva.labels/1", "level": "clip"|"bar", "mapping": {"Q1": [v, a], ...},
"split_source": ..., "clips": [{"clip", "split", "quadrant", "song", "n_bars", "valence",
"arousal"}, ...]}` where valence/arousal are numbers (clip level) or lists with one value per bar
(bar level). Training reads the bar-level file; a clip-level file is read as constant bars.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from midiva.config import BACKENDS
from midiva.errors import CheckpointError, DataError, OutputError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "midiva.regressor/1"
METADATA_KEY = "midiva"
DEFAULT_MODEL_RESOURCE = "assets/default_model.safetensors"
ACTIVATIONS = ("relu", "gelu")
MAX_LAYER_WIDTH = 1 << 16  # a wider layer in a checkpoint is damage, not a model: refused before allocation
# EMOPIA quadrant -> (valence, arousal): Russell's circumplex, Q1 happy ... Q4 calm/content.
DEFAULT_LABEL_MAPPING: dict[str, tuple[float, float]] = {
    "Q1": (0.8, 0.6),
    "Q2": (-0.6, 0.8),
    "Q3": (-0.8, -0.4),
    "Q4": (0.4, -0.6),
}
QUADRANTS = ("Q1", "Q2", "Q3", "Q4")
LABELS_FORMAT = "midiva.labels/1"
_CONTEXT_PATTERN = re.compile(r"^(mean|std|window(\d+))$")


class VARegressor(nn.Module):
    """Per-bar MLP: normalise, input_dim -> hidden_dim -> 2, optional tanh.

    The input normalisation (train-split mean and std) is stored as buffers, so the state dict
    alone reproduces the model's predictions.
    """

    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int | None = None,
        *,
        activation: str = "relu",
        dropout: float = 0.1,
        tanh: bool = True,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if input_dim < 1:
            raise DataError(f"input_dim must be at least 1, got {input_dim}; the representation has no columns")
        if activation not in ACTIVATIONS:
            raise CheckpointError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.input_dim = int(input_dim)
        self.hidden_dim = int(hidden_dim) if hidden_dim else max(1, input_dim // 2)
        self.activation = activation
        self.dropout_p = float(dropout)
        self.tanh = bool(tanh)
        if not (math.isfinite(output_scale) and 0.0 < output_scale <= 1.0):
            raise CheckpointError(f"output_scale must be in (0, 1], got {output_scale!r}")
        self.output_scale = float(output_scale)
        self.register_buffer("input_mean", torch.zeros(self.input_dim))
        self.register_buffer("input_std", torch.ones(self.input_dim))
        self.hidden = nn.Linear(self.input_dim, self.hidden_dim)
        self.act: nn.Module = nn.ReLU() if activation == "relu" else nn.GELU()
        self.dropout = nn.Dropout(self.dropout_p)
        self.out = nn.Linear(self.hidden_dim, 2)

    def set_normalisation(self, mean: npt.NDArray[np.floating], std: npt.NDArray[np.floating]) -> None:
        """Store the input mean and std.

        A column constant in training (std 0) gets std = inf: it normalises to 0 whatever its value,
        so a feature the model never saw vary (e.g. tempo on EMOPIA) cannot shift its predictions.
        """
        std = np.where(np.asarray(std) > 1e-8, std, np.inf)
        self.input_mean.copy_(torch.as_tensor(np.asarray(mean), dtype=torch.float32))
        self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., input_dim) -> (..., 2): valence, arousal."""
        x = (x - self.input_mean) / self.input_std
        y = self.out(self.dropout(self.act(self.hidden(x))))
        # Scaled to the labels' reach: a tanh saturating at ±1 would claim more than the labels teach.
        return torch.tanh(y) * self.output_scale if self.tanh else y

    def architecture(self) -> dict[str, Any]:
        """Constructor arguments, JSON-ready."""
        return {
            "input_dim": self.input_dim,
            "hidden_dim": self.hidden_dim,
            "activation": self.activation,
            "dropout": self.dropout_p,
            "tanh": self.tanh,
            "output_scale": self.output_scale,
        }


def _window_mean(x: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.float32]:
    """Centred moving average over bars b-k..b+k, truncated at the piece's ends."""
    csum = np.concatenate([np.zeros((1, x.shape[1]), np.float64), np.cumsum(x, axis=0, dtype=np.float64)])
    idx = np.arange(x.shape[0])
    lo = np.clip(idx - k, 0, x.shape[0])
    hi = np.clip(idx + k + 1, 0, x.shape[0])
    return ((csum[hi] - csum[lo]) / (hi - lo)[:, None]).astype(np.float32)


@dataclass(frozen=True)
class InputRecipe:
    """How model inputs are built from a piece's bar representations.

    Attributes:
        backend: 'features', 'musetok' or 'hybrid' (features then latents).
        feature_names: the bar features used, in order (empty for 'musetok').
        latent_dim: width of the MuseTok latents used (0 for 'features').
        context: blocks appended to each bar's row, each computed over the whole piece:
            'mean' (piece mean), 'std' (piece standard deviation), 'window<k>' (mean of bars b-k..b+k).
    """

    backend: str
    feature_names: tuple[str, ...] = ()
    latent_dim: int = 0
    context: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise CheckpointError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend != "musetok" and not self.feature_names:
            raise DataError(f"backend {self.backend!r} needs at least one feature name")
        if self.backend != "features" and self.latent_dim < 1:
            raise DataError(f"backend {self.backend!r} needs latent_dim >= 1, got {self.latent_dim}")
        for block in self.context:
            if not _CONTEXT_PATTERN.match(block):
                raise DataError(f"unknown context block {block!r}; use 'mean', 'std' or 'window<k>' (e.g. window4)")

    @property
    def uses_features(self) -> bool:
        """Whether bar features are part of the input."""
        return self.backend in ("features", "hybrid")

    @property
    def uses_latents(self) -> bool:
        """Whether MuseTok latents are part of the input."""
        return self.backend in ("musetok", "hybrid")

    @property
    def base_dim(self) -> int:
        """Columns per bar before context blocks."""
        return (len(self.feature_names) if self.uses_features else 0) + (self.latent_dim if self.uses_latents else 0)

    @property
    def input_dim(self) -> int:
        """Columns of `build`'s output."""
        return self.base_dim * (1 + len(self.context))

    def build(
        self,
        features: npt.NDArray[np.floating] | None,
        latents: npt.NDArray[np.floating] | None,
        feature_names: Sequence[str] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Model inputs (n_bars, input_dim) float32 for one whole piece.

        Args:
            features: (n_bars, n_features) bar features; needed unless backend is 'musetok'.
            latents: (n_bars, latent_dim) MuseTok latents; needed unless backend is 'features'.
            feature_names: column names of `features` (default `midiva.features.FEATURE_NAMES`).

        Raises:
            DataError: a needed array is missing, has the wrong shape, lacks a feature, or is not finite.
        """
        blocks: list[npt.NDArray[np.float32]] = []
        n_bars: int | None = None
        if self.uses_features:
            if features is None:
                raise DataError(f"backend {self.backend!r} needs bar features, got none")
            feats = np.asarray(features, dtype=np.float32)
            if feature_names is None:
                from midiva.features import FEATURE_NAMES

                feature_names = FEATURE_NAMES
            names = list(feature_names)
            if feats.ndim != 2 or feats.shape[1] != len(names):
                raise DataError(
                    f"features have shape {feats.shape}, expected (n_bars, {len(names)}) for the "
                    f"{len(names)} feature names given"
                )
            position = {name: i for i, name in enumerate(names)}
            missing = [n for n in self.feature_names if n not in position]
            if missing:
                raise DataError(
                    f"the model needs bar features {missing} that the representation lacks; "
                    "recompute features with the midiva version that trained the model"
                )
            blocks.append(feats[:, [position[n] for n in self.feature_names]])
            n_bars = feats.shape[0]
        if self.uses_latents:
            if latents is None:
                raise DataError(f"backend {self.backend!r} needs MuseTok latents, got none")
            lat = np.asarray(latents, dtype=np.float32)
            if lat.ndim != 2 or lat.shape[1] != self.latent_dim:
                raise DataError(
                    f"latents have shape {lat.shape}, the model expects (n_bars, {self.latent_dim}); "
                    "was it trained with another MuseTok checkpoint?"
                )
            if n_bars is not None and lat.shape[0] != n_bars:
                raise DataError(f"features have {n_bars} bars but latents have {lat.shape[0]}")
            blocks.append(lat)
        base = np.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
        if not np.isfinite(base).all():
            raise DataError("bar representation holds NaN or infinite values")
        if base.shape[0] == 0:
            return np.zeros((0, self.input_dim), np.float32)
        out = [base]
        for block in self.context:
            if block == "mean":
                out.append(np.broadcast_to(base.mean(axis=0, keepdims=True), base.shape))
            elif block == "std":
                out.append(np.broadcast_to(base.std(axis=0, keepdims=True), base.shape))
            else:
                out.append(_window_mean(base, int(block[len("window") :])))
        return np.ascontiguousarray(np.concatenate(out, axis=1), dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "backend": self.backend,
            "feature_names": list(self.feature_names),
            "latent_dim": self.latent_dim,
            "context": list(self.context),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputRecipe:
        """Inverse of `to_dict`."""
        return cls(
            backend=str(data["backend"]),
            feature_names=tuple(data.get("feature_names", ())),
            latent_dim=int(data.get("latent_dim", 0)),
            context=tuple(data.get("context", ())),
        )


@dataclass(frozen=True)
class Regressor:
    """A trained model and everything needed to use it.

    Attributes:
        module: the MLP (eval mode, on CPU unless moved).
        recipe: how inputs are built from features/latents.
        label_mapping: quadrant -> (valence, arousal) used for the training targets.
        metadata: metrics, training settings, data provenance and versions (JSON-ready).
        source: where it was loaded from ('' when built in memory).
    """

    module: VARegressor
    recipe: InputRecipe
    label_mapping: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_LABEL_MAPPING))
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def backend(self) -> str:
        """'features', 'musetok' or 'hybrid'."""
        return self.recipe.backend

    @property
    def input_dim(self) -> int:
        """Width of `make_inputs`' output."""
        return self.module.input_dim

    @property
    def metrics(self) -> dict[str, Any]:
        """Metrics recorded at training time (e.g. {'val': {...}, 'test': {...}})."""
        return dict(self.metadata.get("metrics", {}))

    def domain_distance(self, inputs: npt.NDArray[np.floating]) -> float | None:
        """How far a piece's inputs lie from the training bars; 1.0 is a typical training clip.

        The median over bars of the RMS z-score of the inputs (the model's own train mean and std),
        divided by the median of that value over the training clips. None when the model's
        metadata has no `domain` reference (models trained before midiva recorded it).
        """
        reference = self.metadata.get("domain", {}).get("train_median_rms_z") if isinstance(self.metadata.get("domain"), dict) else None
        if not reference or len(inputs) == 0:
            return None
        return float(np.median(bar_rms_z(self.module, inputs))) / float(reference)

    def make_inputs(
        self,
        features: npt.NDArray[np.floating] | None = None,
        latents: npt.NDArray[np.floating] | None = None,
        feature_names: Sequence[str] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Model inputs (n_bars, input_dim) for one whole piece; see `InputRecipe.build`."""
        return self.recipe.build(features, latents, feature_names)

    def predict(
        self, inputs: npt.NDArray[np.floating], *, batch_size: int = 4096, device: str | torch.device = "cpu"
    ) -> npt.NDArray[np.float32]:
        """Valence and arousal per bar.

        Args:
            inputs: (n_bars, input_dim) rows from `make_inputs`.
            batch_size: bars per forward pass.
            device: torch device to run on.

        Returns:
            (n_bars, 2) float32 in [-1, 1]; column 0 valence, column 1 arousal.

        Raises:
            DataError: inputs are not (n_bars, input_dim) or hold NaN.
        """
        x = np.asarray(inputs, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise DataError(
                f"inputs have shape {x.shape}, but the model ({self.source or 'in memory'}, backend "
                f"{self.backend!r}) expects (n_bars, {self.input_dim}); build them with make_inputs"
            )
        if not np.isfinite(x).all():
            raise DataError("inputs hold NaN or infinite values")
        module = self.module.to(device).eval()
        out = np.empty((x.shape[0], 2), np.float32)
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                chunk = torch.from_numpy(x[start : start + batch_size]).to(device)
                out[start : start + batch_size] = module(chunk).float().cpu().numpy()
        if np.isnan(out).any():  # the clip below would let NaN through into the annotations
            raise DataError(f"the model ({self.source or 'in memory'}) predicted NaN; its weights are unusable")
        return np.clip(out, -1.0, 1.0)


def bar_rms_z(module: VARegressor, inputs: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """Per bar, the root-mean-square z-score of its inputs over the columns that varied in training: (n_bars,)."""
    mean = module.input_mean.detach().cpu().numpy().astype(np.float64)
    std = module.input_std.detach().cpu().numpy().astype(np.float64)
    used = np.isfinite(std)
    if not used.any():
        return np.zeros(len(inputs))
    z = (np.asarray(inputs, np.float64)[:, used] - mean[used]) / std[used]
    return np.asarray(np.sqrt((z * z).mean(1)))


def quadrant_of(valence: npt.NDArray[np.floating], arousal: npt.NDArray[np.floating]) -> npt.NDArray[np.int64]:
    """Quadrant index 0..3 (Q1..Q4) from signs; zero counts as positive."""
    v = np.asarray(valence) >= 0
    a = np.asarray(arousal) >= 0
    return np.where(v & a, 0, np.where(~v & a, 1, np.where(~v & ~a, 2, 3))).astype(np.int64)


def check_label_mapping(mapping: Mapping[str, Sequence[float]], origin: str = "label mapping") -> dict[str, tuple[float, float]]:
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


# ---------------------------------------------------------------- label files


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file, then rename it over `path`.

    Raises:
        OutputError: the file cannot be written.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(f"cannot write {str(path)!r}: {err.strerror or err}") from err


def write_csv_atomic(path: Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows as CSV (header first) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def read_label_mapping(path: Path | str) -> dict[str, tuple[float, float]]:
    """Read a quadrant -> (valence, arousal) mapping from YAML or TOML.

    Accepts `Q1: [0.8, 0.6]` or `Q1: {valence: 0.8, arousal: 0.6}`, at the top level or under `mapping`.

    Raises:
        DataError: unreadable file, unknown format, or an invalid mapping.
    """
    import tomllib
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read label mapping {str(path)!r}: {err.strerror or err}") from err
    try:
        data: Any = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
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


def prepare_labels(data_dir: Path | str, mapping: Mapping[str, Sequence[float]] | None = None,
                   out_dir: Path | str | None = None) -> LabelFiles:
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
        raise DataError(f"{str(manifest)!r} lacks the columns {missing}; it is not a preprocess-emopia clips.csv: "
                        f"rerun `midiva preprocess-emopia --out {data} --no-resume`")
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
            raise DataError(f"{str(manifest)!r} line {i}: bad quadrant {row['quadrant']!r} or n_bars "
                            f"{row['n_bars']!r} ({type(err).__name__}); rerun preprocess-emopia") from err
        base = {"clip": row["fname"], "split": row["split"], "quadrant": row["quadrant"], "song": row["song"], "n_bars": n}
        clip_items.append({**base, "valence": v, "arousal": a})
        runs = row.get("bar_quadrants") or ""
        if runs:  # a medley: every bar has its own segment's label
            from midiva.emopia import parse_run_lengths

            per_bar = parse_run_lengths(runs)
            if len(per_bar) != n or any(q not in quads for q in per_bar):
                raise DataError(f"{str(manifest)!r} line {i}: bar labels {runs!r} do not give {n} known quadrants; "
                                "rerun preprocess-emopia")
            bar_items.append({**base, "valence": [quads[q][0] for q in per_bar], "arousal": [quads[q][1] for q in per_bar]})
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
            raise DataError(f"{path.name}: clip {item['clip']!r} has quadrant {item['quadrant']!r}, not one of {QUADRANTS}")
        out[item["clip"]] = ClipLabel(item["clip"], item["split"], item["quadrant"], np.stack([v, a], axis=1))
    return out, mapping


def save_regressor(path: Path | str, regressor: Regressor) -> Path:
    """Write a regressor as one .safetensors file (tensors + JSON metadata), atomically.

    Raises:
        OutputError: the file cannot be written.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from midiva import __version__

    path = Path(path)
    header = {
        "format": CHECKPOINT_FORMAT,
        "midiva_version": __version__,
        "architecture": regressor.module.architecture(),
        "recipe": regressor.recipe.to_dict(),
        "label_mapping": {q: list(v) for q, v in regressor.label_mapping.items()},
        **{k: v for k, v in regressor.metadata.items() if k not in ("format", "architecture", "recipe", "label_mapping")},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in regressor.module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header, sort_keys=True, allow_nan=False)})
        os.chmod(tmp, 0o644)  # a model is shareable data, whatever mode the writer created it with
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise OutputError(f"cannot write the model to {str(path)!r}: {reason}; choose a writable --out") from err
    return path


def default_model_path() -> Path:
    """Filesystem path of the bundled default model (features backend)."""
    return Path(str(resources.files("midiva").joinpath(DEFAULT_MODEL_RESOURCE)))


def load_regressor(path: Path | str | None = None, *, device: str | torch.device = "cpu") -> Regressor:
    """Load a regressor written by `save_regressor`; None loads the bundled default model.

    Raises:
        CheckpointError: the file is missing, not a midiva regressor, or its tensors do not match.
    """
    from safetensors import SafetensorError, safe_open

    path = default_model_path() if path is None else Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {str(path)!r} does not exist; train one with `midiva train` or omit --model")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable .safetensors file: {err}") from err
    if raw is None:
        raise CheckpointError(f"{str(path)!r} has no midiva metadata; is it a midiva regressor (not a MuseTok checkpoint)?")
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise TypeError(f"the metadata is a JSON {type(header).__name__}, not an object")
        if header.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{str(path)!r} has format {header.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        recipe = InputRecipe.from_dict(header["recipe"])
        arch = _checked_architecture(header["architecture"], tensors, path)
        module = VARegressor(
            arch["input_dim"], arch["hidden_dim"], activation=arch["activation"], dropout=arch["dropout"], tanh=arch["tanh"],
            output_scale=arch["output_scale"],
        )
        mapping = check_label_mapping(header["label_mapping"], f"label mapping of {path.name}")
    except (KeyError, TypeError, ValueError, AttributeError, DataError) as err:
        raise CheckpointError(f"{str(path)!r} has invalid midiva metadata ({type(err).__name__}: {err})") from err
    _check_tensors(tensors, path)
    if recipe.input_dim != module.input_dim:
        raise CheckpointError(
            f"{str(path)!r}: the input recipe gives {recipe.input_dim} columns but the MLP expects {module.input_dim}"
        )
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{str(path)!r}: tensors do not match the stored architecture: {err}") from err
    module.to(device).eval()
    metadata = {k: v for k, v in header.items() if k not in ("architecture", "recipe", "label_mapping", "format")}
    log.debug("loaded regressor %s (backend %s, input_dim %d)", path, recipe.backend, module.input_dim)
    return Regressor(module=module, recipe=recipe, label_mapping=mapping, metadata=metadata, source=str(path))


def _checked_architecture(arch: Any, tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """The MLP's constructor arguments, validated against the stored tensor shapes before anything is allocated.

    Raises:
        TypeError, ValueError: a value has the wrong type or range (the caller says which file).
        CheckpointError: the stored weights have another shape.
    """
    if not isinstance(arch, dict):
        raise TypeError(f"'architecture' is a {type(arch).__name__}, not an object")
    sizes = {}
    for key in ("input_dim", "hidden_dim"):
        value = arch[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LAYER_WIDTH:
            raise ValueError(f"{key} must be an integer in [1, {MAX_LAYER_WIDTH}], got {value!r}")
        sizes[key] = value
    dropout = arch["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(arch["tanh"], bool) or arch["activation"] not in ACTIVATIONS:
        raise ValueError(f"tanh must be true/false and activation one of {ACTIVATIONS}, got {arch['tanh']!r}, "
                         f"{arch['activation']!r}")  # fmt: skip
    weight = tensors.get("hidden.weight")
    expected = (sizes["hidden_dim"], sizes["input_dim"])
    if weight is None or tuple(weight.shape) != expected:
        found = None if weight is None else tuple(weight.shape)
        raise CheckpointError(f"{str(path)!r}: tensors do not match the stored architecture: hidden.weight "
                              f"has shape {found}, the architecture says {expected}")  # fmt: skip
    scale = arch.get("output_scale", 1.0)  # models from before output scaling reach ±1
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale <= 1.0:
        raise ValueError(f"output_scale must be a number in (0, 1], got {scale!r}")
    return {**sizes, "dropout": float(dropout), "tanh": arch["tanh"], "activation": arch["activation"],
            "output_scale": float(scale)}


def _check_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse weights that would make every prediction NaN: non-float, non-finite, or a zero input std.

    Raises:
        CheckpointError: which tensor is wrong and how.
    """
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{str(path)!r}: tensor {name!r} is {tensor.dtype}, expected float32; the file is damaged")
        values = tensor.float()
        # input_std may be inf (a column constant in training normalises to 0), never 0 or NaN
        bad = ~(values > 0) if name == "input_std" else ~torch.isfinite(values)
        if bool(bad.any()):
            what = "zero, negative or NaN" if name == "input_std" else "NaN or infinite"
            raise CheckpointError(f"{str(path)!r}: tensor {name!r} holds {int(bad.sum())} {what} values; "
                                  "predictions would be NaN — retrain or restore the model")  # fmt: skip


def check_feature_names(recipe: InputRecipe, path: Path | str) -> None:
    """Refuse a model that needs bar features this midiva does not compute (every file would fail).

    Raises:
        CheckpointError: with the unknown names.
    """
    if not recipe.uses_features:
        return
    from midiva.features import FEATURE_NAMES

    unknown = sorted(set(recipe.feature_names) - set(FEATURE_NAMES))
    if unknown:
        raise CheckpointError(
            f"{str(path)!r} needs bar features {unknown[:8]}{' …' if len(unknown) > 8 else ''} that this midiva "
            "does not compute; use the midiva version that trained it, or retrain"
        )


# ---------------------------------------------------------------- metrics


@dataclass(frozen=True)
class LevelMetrics:
    """Errors and agreement of predictions against targets at one level (bars or clips)."""

    n: int
    mae_valence: float
    mae_arousal: float
    mse_valence: float
    mse_arousal: float
    rmse_valence: float
    rmse_arousal: float
    pearson_valence: float
    pearson_arousal: float
    ccc_valence: float
    ccc_arousal: float
    quadrant_accuracy: float
    valence_sign_accuracy: float
    arousal_sign_accuracy: float
    confusion: tuple[tuple[int, ...], ...]  # rows: true Q1..Q4, columns: predicted


@dataclass(frozen=True)
class Metrics:
    """Bar- and clip-level metrics; `to_dict` gives flat keys such as 'clip.mae_valence'."""

    bar: LevelMetrics
    clip: LevelMetrics

    def to_dict(self) -> dict[str, float]:
        """Flat {'bar.mae_valence': ..., 'clip.quadrant_accuracy': ...} (confusion matrices left out)."""
        out: dict[str, float] = {}
        for level in ("bar", "clip"):
            for key, value in asdict(getattr(self, level)).items():
                if key != "confusion":
                    out[f"{level}.{key}"] = value
        return out


def pearson(x: npt.NDArray[np.floating], y: npt.NDArray[np.floating]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx**2).sum() * (dy**2).sum()))
    return float((dx * dy).sum() / den) if den > 0 else math.nan


def ccc(x: npt.NDArray[np.floating], y: npt.NDArray[np.floating]) -> float:
    """Lin's concordance correlation coefficient (population moments); NaN when both are constant and equal."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    cov = float(((x - x.mean()) * (y - y.mean())).mean())
    den = float(x.var() + y.var() + (x.mean() - y.mean()) ** 2)
    return 2 * cov / den if den > 0 else math.nan


def level_metrics(pred: npt.NDArray[np.floating], target: npt.NDArray[np.floating],
                  quadrants: npt.NDArray[np.integer]) -> LevelMetrics:
    """Metrics of predictions (n, 2) against targets (n, 2) with true quadrant indices (n,) 0..3.

    Raises:
        DataError: no rows (metrics of zero examples are meaningless).
    """
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if pred.shape[0] == 0:
        raise DataError("no predictions to score; the evaluated split is empty")
    err = pred - target
    mae, mse = np.abs(err).mean(0), (err**2).mean(0)
    q_pred = quadrant_of(pred[:, 0], pred[:, 1])
    q_true = np.asarray(quadrants, np.int64)
    true_v, true_a = np.isin(q_true, (0, 3)), np.isin(q_true, (0, 1))
    confusion = np.zeros((4, 4), np.int64)
    np.add.at(confusion, (q_true, q_pred), 1)
    return LevelMetrics(
        n=int(pred.shape[0]),
        mae_valence=float(mae[0]), mae_arousal=float(mae[1]),
        mse_valence=float(mse[0]), mse_arousal=float(mse[1]),
        rmse_valence=float(np.sqrt(mse[0])), rmse_arousal=float(np.sqrt(mse[1])),
        pearson_valence=pearson(pred[:, 0], target[:, 0]), pearson_arousal=pearson(pred[:, 1], target[:, 1]),
        ccc_valence=ccc(pred[:, 0], target[:, 0]), ccc_arousal=ccc(pred[:, 1], target[:, 1]),
        quadrant_accuracy=float((q_pred == q_true).mean()),
        valence_sign_accuracy=float(((pred[:, 0] >= 0) == true_v).mean()),
        arousal_sign_accuracy=float(((pred[:, 1] >= 0) == true_a).mean()),
        confusion=tuple(tuple(int(v) for v in row) for row in confusion),
    )


def masked_metrics(pred: npt.NDArray[np.floating], target: npt.NDArray[np.floating], mask: npt.NDArray[np.bool_],
                   quadrants: Sequence[str]) -> Metrics:
    """Bar and clip metrics from padded (n_clips, max_bars, 2) arrays; only bars where mask is True count.

    A clip's prediction and target are the means over its real bars.

    Raises:
        DataError: a clip has no real bars, or there are no clips.
    """
    mask = np.asarray(mask, bool)
    counts = mask.sum(1)
    if mask.shape[0] == 0 or (counts == 0).any():
        raise DataError("every clip needs at least one real bar; got an empty clip or no clips")
    q = np.array([QUADRANTS.index(x) for x in quadrants], np.int64)
    w = mask[..., None].astype(np.float64)
    clip_pred = (np.where(w > 0, pred, 0.0)).sum(1) / counts[:, None]
    clip_target = (np.where(w > 0, target, 0.0)).sum(1) / counts[:, None]
    bar = level_metrics(np.asarray(pred)[mask], np.asarray(target)[mask], np.repeat(q, counts))
    return Metrics(bar=bar, clip=level_metrics(clip_pred, clip_target, q))


def to_json_safe(value: Any) -> Any:
    """NaN/inf -> None recursively, so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    return value


def metrics_json(metrics: Metrics) -> dict[str, Any]:
    """Flat metrics plus the confusion matrices, JSON-ready (NaN -> null)."""
    return to_json_safe({**metrics.to_dict(), "bar.confusion": metrics.bar.confusion, "clip.confusion": metrics.clip.confusion})


def plot_va_scatter(pred: npt.NDArray[np.floating], quadrants: Sequence[str], ax: Any = None, title: str = "") -> Any:
    """Scatter of predicted (valence, arousal) points (n, 2), coloured by true quadrant; returns the axes."""
    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=(5, 5)).subplots()
    pred = np.asarray(pred).reshape(-1, 2)
    for q, colour in zip(QUADRANTS, ("tab:orange", "tab:red", "tab:blue", "tab:green"), strict=True):
        sel = np.array([x == q for x in quadrants], bool).reshape(-1)
        ax.scatter(pred[sel, 0], pred[sel, 1], s=8, alpha=0.6, color=colour, label=f"true {q}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(xlim=(-1, 1), ylim=(-1, 1), xlabel="predicted valence", ylabel="predicted arousal", title=title)
    ax.legend(loc="lower right", fontsize="small")
    return ax


def plot_confusion(confusion: Sequence[Sequence[int]], ax: Any = None, title: str = "") -> Any:
    """Quadrant confusion matrix (rows true, columns predicted, counts written in); returns the axes."""
    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=(4.5, 4)).subplots()
    mat = np.asarray(confusion)
    ax.imshow(mat, cmap="Blues")
    for (i, j), value in np.ndenumerate(mat):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > mat.max() / 2 else "black")
    ax.set(xticks=range(4), yticks=range(4), xticklabels=QUADRANTS, yticklabels=QUADRANTS,
           xlabel="predicted quadrant", ylabel="true quadrant", title=title)
    return ax

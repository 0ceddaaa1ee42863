"""Stage 5: the valence/arousal regressor — bar representation in, (valence, arousal) per bar out.

Input: per-bar representations of one piece, `features` (n_bars, n_features) from
`midiva.features` and/or MuseTok `latents` (n_bars, latent_dim) from `midiva.latents`.
`Regressor.make_inputs` turns them into model inputs (n_bars, input_dim) — the same function
for training and annotation — and `Regressor.predict` maps those to (n_bars, 2) float32:
column 0 valence, column 1 arousal, both in [-1, 1] (the units of EMOPIA's quadrant points).

A checkpoint is one `.safetensors` file: the MLP's tensors (input normalisation included) plus a
JSON header that describes everything needed to use it (backend, input recipe, label mapping,
metrics, training settings, versions). `load_regressor()` with no path loads the bundled model.

The checkpoint also carries the label mapping it was trained with (`midiva.labels`) and its
metrics (`midiva.metrics`); those modules hold the label files and the metric functions.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from midiva import representations
from midiva.atomic import atomic_output
from midiva.errors import CheckpointError, ConfigError, DataError, OutputError
from midiva.labels import DEFAULT_LABEL_MAPPING, check_label_mapping

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "midiva.regressor/1"
METADATA_KEY = "midiva"
DEFAULT_MODEL_RESOURCE = "assets/default_model.safetensors"
ACTIVATIONS = ("relu", "gelu")
MAX_LAYER_WIDTH = 1 << 16  # a wider layer in a checkpoint is damage, not a model: refused before allocation
_CONTEXT_PATTERN = re.compile(r"^(mean|std|window(\d+))$")


class VARegressor(nn.Module):
    """Per-bar MLP: normalise, optionally clip the z-scores, input_dim -> hidden_dim -> 2, optional tanh.

    The input normalisation (train-split mean and std) is stored as buffers, so the state dict
    alone reproduces the model's predictions. With `input_clip` c, each normalised column is clipped
    to [-c, c]: a column far outside what training showed (a band's onset density, say) counts as at
    most c standard deviations instead of being extrapolated linearly.
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
        input_clip: float | None = None,
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
        if input_clip is not None and not (math.isfinite(input_clip) and input_clip > 0.0):
            raise CheckpointError(f"input_clip must be a positive number or None, got {input_clip!r}")
        self.input_clip = None if input_clip is None else float(input_clip)
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
        if self.input_clip is not None:
            x = x.clamp(-self.input_clip, self.input_clip)
        y = self.out(self.dropout(self.act(self.hidden(x))))
        # Scaled to the labels' reach: a tanh saturating at ±1 would claim more than the labels teach.
        return torch.tanh(y) * self.output_scale if self.tanh else y

    def architecture(self) -> dict[str, Any]:
        """Constructor arguments, JSON-ready (`input_clip` only when set, so unclipped models keep their header)."""
        arch: dict[str, Any] = {
            "input_dim": self.input_dim,
            "hidden_dim": self.hidden_dim,
            "activation": self.activation,
            "dropout": self.dropout_p,
            "tanh": self.tanh,
            "output_scale": self.output_scale,
        }
        if self.input_clip is not None:
            arch["input_clip"] = self.input_clip
        return arch


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
        backend: the representations, as `midiva.representations.recipe` reads it: 'features',
            'musetok', 'hybrid' (features then latents) or names joined by '+'.
        feature_names: the bar features used, in order (empty without 'features').
        latent_dim: width of the MuseTok latents used (0 without 'musetok').
        context: blocks appended to each bar's row, each computed over the whole piece:
            'mean' (piece mean), 'std' (piece standard deviation), 'window<k>' (mean of bars b-k..b+k).
        dims: width of every other representation's block, as (name, dim) pairs.
    """

    backend: str
    feature_names: tuple[str, ...] = ()
    latent_dim: int = 0
    context: tuple[str, ...] = ()
    dims: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        try:
            parts = [rep.name for rep in representations.recipe(self.backend)]
        except ConfigError as err:
            raise CheckpointError(f"backend {self.backend!r}: {err}") from err
        if "features" in parts and not self.feature_names:
            raise DataError(f"backend {self.backend!r} needs at least one feature name")
        if "musetok" in parts and self.latent_dim < 1:
            raise DataError(f"backend {self.backend!r} needs latent_dim >= 1, got {self.latent_dim}")
        widths = dict(self.dims)
        for name in parts:
            if name not in ("features", "musetok") and widths.get(name, 0) < 1:
                raise DataError(
                    f"backend {self.backend!r} needs the width of its {name!r} block (dims), got {widths.get(name)}"
                )
        for block in self.context:
            if not _CONTEXT_PATTERN.match(block):
                raise DataError(f"unknown context block {block!r}; use 'mean', 'std' or 'window<k>' (e.g. window4)")

    @property
    def parts(self) -> tuple[str, ...]:
        """The representations whose blocks make up a bar's row, in column order."""
        return tuple(rep.name for rep in representations.recipe(self.backend))

    @property
    def uses_features(self) -> bool:
        """Whether bar features are part of the input."""
        return "features" in self.parts

    @property
    def uses_latents(self) -> bool:
        """Whether MuseTok latents are part of the input."""
        return "musetok" in self.parts

    def width(self, part: str) -> int:
        """Columns of one representation's block."""
        if part == "features":
            return len(self.feature_names)
        if part == "musetok":
            return self.latent_dim
        return dict(self.dims)[part]

    @property
    def base_dim(self) -> int:
        """Columns per bar before context blocks."""
        return sum(self.width(part) for part in self.parts)

    @property
    def input_dim(self) -> int:
        """Columns of `build`'s output."""
        return self.base_dim * (1 + len(self.context))

    def _feature_block(
        self, features: npt.NDArray[np.floating] | None, feature_names: Sequence[str] | None
    ) -> npt.NDArray[np.float32]:
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
        return feats[:, [position[n] for n in self.feature_names]]

    def _encoded_block(self, part: str, block: npt.NDArray[np.floating] | None) -> npt.NDArray[np.float32]:
        label = "MuseTok latents" if part == "musetok" else f"{part} blocks"
        if block is None:
            raise DataError(f"backend {self.backend!r} needs {label}, got none")
        array = np.asarray(block, dtype=np.float32)
        width = self.width(part)
        if array.ndim != 2 or array.shape[1] != width:
            hint = (
                "was it trained with another MuseTok checkpoint?"
                if part == "musetok"
                else f"was it trained with another {part} encoder?"
            )
            name = "latents" if part == "musetok" else f"{part} blocks"
            raise DataError(f"{name} have shape {array.shape}, the model expects (n_bars, {width}); {hint}")
        return array

    def feature_groups(self) -> dict[str, list[int]]:
        """Input columns of each bar feature: its own column, its ±2-bar (`_win5`) and whole-piece
        (`_song`) twins, and their copies in every context block; {} without features.

        What `feature_drivers` neutralises one at a time, and what training's feature dropout drops.
        """
        if not self.uses_features:
            return {}
        offset = 0
        for part in self.parts:
            if part == "features":
                break
            offset += self.width(part)
        groups: dict[str, list[int]] = {}
        for block in range(1 + len(self.context)):
            for i, name in enumerate(self.feature_names):
                base = name.removesuffix("_win5").removesuffix("_song")
                groups.setdefault(base, []).append(block * self.base_dim + offset + i)
        return groups

    def build(
        self,
        features: npt.NDArray[np.floating] | None,
        latents: npt.NDArray[np.floating] | None,
        feature_names: Sequence[str] | None = None,
        blocks: Mapping[str, npt.NDArray[np.floating]] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Model inputs (n_bars, input_dim) float32 for one whole piece.

        Args:
            features: (n_bars, n_features) bar features; needed when the backend has 'features'.
            latents: (n_bars, latent_dim) MuseTok latents; needed when the backend has 'musetok'.
            feature_names: column names of `features` (default `midiva.features.FEATURE_NAMES`).
            blocks: (n_bars, dim) blocks of the other representations, by name.

        Raises:
            DataError: a needed array is missing, has the wrong shape, lacks a feature, or is not finite.
        """
        given = {**(blocks or {}), "musetok": latents}
        parts: list[npt.NDArray[np.float32]] = []
        for part in self.parts:
            if part == "features":
                parts.append(self._feature_block(features, feature_names))
            else:
                parts.append(self._encoded_block(part, given.get(part)))
            if len(parts) > 1 and parts[-1].shape[0] != parts[0].shape[0]:
                first = "features" if self.parts[0] == "features" else self.parts[0]
                other = "latents" if part == "musetok" else part
                raise DataError(f"{first} have {parts[0].shape[0]} bars but {other} have {parts[-1].shape[0]}")
        base = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
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
        """JSON-ready form (`dims` only when the backend has other representations)."""
        out: dict[str, Any] = {
            "backend": self.backend,
            "feature_names": list(self.feature_names),
            "latent_dim": self.latent_dim,
            "context": list(self.context),
        }
        if self.dims:
            out["dims"] = dict(self.dims)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputRecipe:
        """Inverse of `to_dict`."""
        return cls(
            backend=str(data["backend"]),
            feature_names=tuple(data.get("feature_names", ())),
            latent_dim=int(data.get("latent_dim", 0)),
            context=tuple(data.get("context", ())),
            dims=tuple((str(k), int(v)) for k, v in dict(data.get("dims", {})).items()),
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
        """The representations it was trained on: 'features', 'musetok', 'hybrid' or a '+' recipe."""
        return self.recipe.backend

    @property
    def input_dim(self) -> int:
        """Width of `make_inputs`' output."""
        return self.module.input_dim

    @functools.cached_property
    def sha256(self) -> str:
        """The model's identity in resume fingerprints: the sha256 of the file it was loaded from, else of
        its tensors, recipe and label mapping (a model built in memory)."""
        if self.source:
            with contextlib.suppress(OSError):
                from midiva.config import sha256_file

                return sha256_file(self.source)
        digest = hashlib.sha256()
        for name, tensor in sorted(self.module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(
            json.dumps({"recipe": self.recipe.to_dict(), "labels": self.label_mapping}, sort_keys=True).encode()
        )
        return digest.hexdigest()

    @property
    def metrics(self) -> dict[str, Any]:
        """Metrics recorded at training time (e.g. {'val': {...}, 'test': {...}})."""
        return dict(self.metadata.get("metrics", {}))

    @property
    def domain_reference(self) -> float | None:
        """What `domain_distance` divides by (`metadata['domain']['train_median_rms_z']`); None for
        models trained before midiva recorded it."""
        domain = self.metadata.get("domain")
        reference = domain.get("train_median_rms_z") if isinstance(domain, dict) else None
        return float(reference) if reference else None

    @property
    def predictor(self) -> Predictor:
        """The model for inference only (`Predictor`: numpy arrays, no torch), small enough to send to
        every worker. Built from the module and metadata as they are now."""
        return Predictor(self.recipe, BarHead.of(self.module), self.domain_reference, self.source)

    def domain_distance(self, inputs: npt.NDArray[np.floating]) -> float | None:
        """See `Predictor.domain_distance`."""
        return self.predictor.domain_distance(inputs)

    def make_inputs(
        self,
        features: npt.NDArray[np.floating] | None = None,
        latents: npt.NDArray[np.floating] | None = None,
        feature_names: Sequence[str] | None = None,
        blocks: Mapping[str, npt.NDArray[np.floating]] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Model inputs (n_bars, input_dim) for one whole piece; see `InputRecipe.build`."""
        return self.recipe.build(features, latents, feature_names, blocks)

    def predict(
        self, inputs: npt.NDArray[np.floating], *, batch_size: int = 4096, device: str | torch.device = "cpu"
    ) -> npt.NDArray[np.float32]:
        """See `Predictor.predict` (`batch_size` and `device` are accepted for compatibility, unused)."""
        return self.predictor.predict(inputs)


@dataclass(frozen=True, eq=False)
class Predictor:
    """A regressor for inference: its input recipe, its MLP as float64 arrays (`BarHead`) and its
    training-domain reference. What annotation runs, in the parsing workers for the features backend.

    Attributes:
        recipe: how inputs are built from the bar representations.
        head: the MLP.
        domain_reference: the training clips' median RMS z-score (None: unknown, `domain_distance` is None).
        source: where the model was loaded from, for messages.
    """

    recipe: InputRecipe
    head: BarHead
    domain_reference: float | None = None
    source: str = ""

    @property
    def backend(self) -> str:
        """The representations the model reads (`InputRecipe.backend`)."""
        return self.recipe.backend

    @property
    def input_dim(self) -> int:
        """Width of `make_inputs`' output."""
        return int(self.head.w1.shape[1])

    def make_inputs(
        self,
        features: npt.NDArray[np.floating] | None = None,
        latents: npt.NDArray[np.floating] | None = None,
        feature_names: Sequence[str] | None = None,
        blocks: Mapping[str, npt.NDArray[np.floating]] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Model inputs (n_bars, input_dim) for one whole piece; see `InputRecipe.build`."""
        return self.recipe.build(features, latents, feature_names, blocks)

    def predict(self, inputs: npt.NDArray[np.floating], **_unused: Any) -> npt.NDArray[np.float32]:
        """Valence and arousal per bar; each bar's values depend on its own inputs only (`BarHead`).

        Args:
            inputs: (n_bars, input_dim) rows from `make_inputs`.

        Returns:
            (n_bars, 2) float32 in [-1, 1]; column 0 valence, column 1 arousal.

        Raises:
            DataError: inputs are not (n_bars, input_dim) or hold NaN, or the model predicts NaN.
        """
        x = np.asarray(inputs)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise DataError(
                f"inputs have shape {x.shape}, but the model ({self.source or 'in memory'}, backend "
                f"{self.backend!r}) expects (n_bars, {self.input_dim}); build them with make_inputs"
            )
        if not np.isfinite(x).all():
            raise DataError("inputs hold NaN or infinite values")
        out = self.head(x)
        if np.isnan(out).any():  # the clip in BarHead would let NaN through into the annotations
            raise DataError(f"the model ({self.source or 'in memory'}) predicted NaN; its weights are unusable")
        return out

    def domain_distance(self, inputs: npt.NDArray[np.floating]) -> float | None:
        """How far a piece's inputs lie from the training bars; 1.0 is a typical training clip.

        The median over bars of the RMS z-score of the inputs (the model's own train mean and std),
        divided by the median of that value over the training clips. None when the reference is
        unknown (models trained before midiva recorded it) or there are no bars.
        """
        if not self.domain_reference or len(inputs) == 0:
            return None
        return float(np.median(self.head.rms_z(inputs))) / self.domain_reference


@dataclass(frozen=True, eq=False)
class BarHead:
    """A `VARegressor`'s inference as float64 numpy arrays, small enough to send to every worker.

    Every operation is per row (normalise, two matrix products, activation, tanh), computed in
    float64 and rounded once to float32 at the end, so a bar's prediction does not depend on which
    or how many bars were predicted with it: the summation-order differences between BLAS kernels
    for different row counts (~1e-16) are far below float32's resolution (~6e-8) and the CSV's
    4 decimals. That makes annotations independent of batching, workers and resumes by
    construction.

    Attributes:
        mean / std: the input normalisation (std inf for a column constant in training).
        w1, b1: hidden layer (hidden_dim, input_dim), (hidden_dim,).
        w2, b2: output layer (2, hidden_dim), (2,).
        activation: 'relu' or 'gelu' (exact, erf-based, as torch's nn.GELU).
        tanh, output_scale: the output squashing, `tanh(y) * output_scale` when `tanh`.
        input_clip: the normalised inputs are clipped to [-input_clip, input_clip] (None: not clipped).
    """

    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]
    w1: npt.NDArray[np.float64]
    b1: npt.NDArray[np.float64]
    w2: npt.NDArray[np.float64]
    b2: npt.NDArray[np.float64]
    activation: str = "relu"
    tanh: bool = True
    output_scale: float = 1.0
    input_clip: float | None = None

    @classmethod
    def of(cls, module: VARegressor) -> BarHead:
        """The head of a (trained) module; its weights are copied to the CPU as float64."""

        def array(t: torch.Tensor) -> npt.NDArray[np.float64]:
            return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float64)

        return cls(
            array(module.input_mean),
            array(module.input_std),
            array(module.hidden.weight),
            array(module.hidden.bias),
            array(module.out.weight),
            array(module.out.bias),
            module.activation,
            module.tanh,
            module.output_scale,
            module.input_clip,
        )

    def __call__(self, inputs: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        """(n_bars, input_dim) -> (n_bars, 2) float32 in [-1, 1]: valence, arousal."""
        x = (np.asarray(inputs, np.float64) - self.mean) / self.std
        if self.input_clip is not None:
            x = np.clip(x, -self.input_clip, self.input_clip)
        h = x @ self.w1.T + self.b1
        if self.activation == "relu":
            h = np.maximum(h, 0.0)
        else:  # exact GELU, x * Phi(x), as torch computes it
            h = 0.5 * h * (1.0 + torch.special.erf(torch.from_numpy(h / math.sqrt(2.0))).numpy())
        y = h @ self.w2.T + self.b2
        if self.tanh:
            y = np.tanh(y) * self.output_scale
        return np.clip(y, -1.0, 1.0).astype(np.float32)

    def rms_z(self, inputs: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """Per bar, the root-mean-square z-score of its inputs over the columns that varied in training: (n_bars,)."""
        used = np.isfinite(self.std)
        if not used.any():
            return np.zeros(len(inputs))
        z = (np.asarray(inputs, np.float64)[:, used] - self.mean[used]) / self.std[used]
        return np.asarray(np.sqrt((z * z).mean(1)))


def bar_rms_z(module: VARegressor, inputs: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """Per bar, the root-mean-square z-score of its inputs over the columns that varied in training: (n_bars,)."""
    return BarHead.of(module).rms_z(inputs)


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
        **{
            k: v
            for k, v in regressor.metadata.items()
            if k not in ("format", "architecture", "recipe", "label_mapping")
        },
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in regressor.module.state_dict().items()}
    try:
        with atomic_output(path, what="the model", hint="choose a writable --out") as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header, sort_keys=True, allow_nan=False)})
            os.chmod(tmp, 0o644)  # a model is shareable data, whatever mode the writer created it with
    except SafetensorError as err:
        raise OutputError(f"cannot write the model to {str(path)!r}: {err}; choose a writable --out") from err
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
        raise CheckpointError(
            f"{str(path)!r} has no midiva metadata; is it a midiva regressor (not a MuseTok checkpoint)?"
        )
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise TypeError(f"the metadata is a JSON {type(header).__name__}, not an object")
        if header.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{str(path)!r} has format {header.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        recipe = InputRecipe.from_dict(header["recipe"])
        arch = _checked_architecture(header["architecture"], tensors, path)
        module = VARegressor(
            arch["input_dim"],
            arch["hidden_dim"],
            activation=arch["activation"],
            dropout=arch["dropout"],
            tanh=arch["tanh"],
            output_scale=arch["output_scale"],
            input_clip=arch["input_clip"],
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
        raise ValueError(
            f"tanh must be true/false and activation one of {ACTIVATIONS}, got {arch['tanh']!r}, {arch['activation']!r}"
        )
    weight = tensors.get("hidden.weight")
    expected = (sizes["hidden_dim"], sizes["input_dim"])
    if weight is None or tuple(weight.shape) != expected:
        found = None if weight is None else tuple(weight.shape)
        raise CheckpointError(
            f"{str(path)!r}: tensors do not match the stored architecture: hidden.weight "
            f"has shape {found}, the architecture says {expected}"
        )
    scale = arch.get("output_scale", 1.0)  # models from before output scaling reach ±1
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale <= 1.0:
        raise ValueError(f"output_scale must be a number in (0, 1], got {scale!r}")
    clip = arch.get("input_clip")  # models from before input clipping extrapolate freely
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (math.isfinite(clip) and clip > 0)
    ):
        raise ValueError(f"input_clip must be a positive number or absent, got {clip!r}")
    return {
        **sizes,
        "dropout": float(dropout),
        "tanh": arch["tanh"],
        "activation": arch["activation"],
        "output_scale": float(scale),
        "input_clip": None if clip is None else float(clip),
    }


def _check_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse weights that would make every prediction NaN: non-float, non-finite, or a zero input std.

    Raises:
        CheckpointError: which tensor is wrong and how.
    """
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"{str(path)!r}: tensor {name!r} is {tensor.dtype}, expected float32; the file is damaged"
            )
        values = tensor.float()
        # input_std may be inf (a column constant in training normalises to 0), never 0 or NaN
        bad = ~(values > 0) if name == "input_std" else ~torch.isfinite(values)
        if bool(bad.any()):
            what = "zero, negative or NaN" if name == "input_std" else "NaN or infinite"
            raise CheckpointError(
                f"{str(path)!r}: tensor {name!r} holds {int(bad.sum())} {what} values; "
                "predictions would be NaN — retrain or restore the model"
            )


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

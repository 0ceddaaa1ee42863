"""Stage 6: learn valence/arousal from EMOPIA clip sets — fit, evaluate, logs and reports.

Input: `ClipSet`s from `midiva.emopia` (model inputs (n_bars, input_dim) float32 and targets
(n_bars, 2) per clip), or a directory written by `preprocess_emopia` + `prepare_labels` for the
end-to-end `train_from_dir` and `evaluate_model` (what `midiva train` and `midiva evaluate` run).
Output: a trained `Regressor` with its training log, and evaluation reports (metrics.json,
predictions.csv, plots).
Units: valence and arousal in [-1, 1]; a bar is a MuseTok bar; a clip's prediction is the mean
of its bars' predictions; loss and metrics count real bars only, never padding.
Label files live in `midiva.labels`, metrics in `midiva.metrics`, their figures in `midiva.plots`.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva.atomic import atomic_output, write_csv_atomic, write_text_atomic
from midiva.config import DEFAULT_CONTEXT, DEFAULT_EXCLUDE_FEATURES, cpu_kind, versions  # noqa: F401 - recipe defaults re-exported
from midiva.emopia import (
    ClipSet,
    build_clip_set,
    load_split,
    pad_clips,
    recipe_for,
)
from midiva.errors import ConfigError, DataError, OutputError
from midiva.labels import DEFAULT_LABEL_MAPPING, prepare_labels, read_labels
from midiva.metrics import LevelMetrics, Metrics, masked_metrics, metrics_json, to_json_safe
from midiva.model import (
    InputRecipe,
    Regressor,
    VARegressor,
    bar_rms_z,
    load_regressor,
    save_regressor,
)
from midiva.preprocess import preprocess_emopia

log = logging.getLogger(__name__)

LOSSES = ("mse", "smooth_l1", "mse+l1")


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of `fit` (choose them on the validation split, never on test)."""

    hidden_dim: int | None = None
    activation: str = "relu"
    dropout: float = 0.2
    tanh: bool = True
    output_scale: float | None = None  # tanh reach; None: the largest |value| of the label mapping
    input_clip: float | None = None  # clip normalised inputs to ±input_clip (None: no clipping)
    # per training clip and step, the chance that each bar feature (all its columns) reads as the
    # training mean, so that no single descriptor can carry a reading on its own (0: off)
    feature_dropout: float = 0.0
    # fnmatch patterns naming the bar features (keys of `InputRecipe.feature_groups`) that feature
    # dropout may drop (empty: all of them)
    feature_dropout_features: tuple[str, ...] = ()
    loss: str = "smooth_l1"
    lr: float = 1e-3
    weight_decay: float = 1e-2
    max_epochs: int = 200
    patience: int = 30
    batch_clips: int = 32
    clip_weighting: bool = True
    monitor: str = "loss"  # 'loss' (val loss, lower is better) or a Metrics key such as 'clip.quadrant_accuracy'
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 1  # small MLPs train fastest single-threaded; more threads only contend


@dataclass(frozen=True)
class EpochLog:
    """One epoch of the training log."""

    epoch: int
    train_loss: float
    val_loss: float
    val_clip_mae_valence: float
    val_clip_mae_arousal: float
    val_clip_quadrant_accuracy: float
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """A fitted model (best validation epoch restored) and its history."""

    regressor: Regressor
    history: tuple[EpochLog, ...]
    best_epoch: int
    val_metrics: Metrics


def masked_loss(pred: Any, target: Any, mask: Any, kind: str = "mse", clip_weighting: bool = False) -> Any:
    """Mean loss over real bars only (torch tensors (n, T, 2), (n, T, 2), (n, T) bool).

    With clip_weighting, each clip's bars are averaged first so long clips count as much as short ones.
    """
    import torch.nn.functional as F

    if kind == "mse":
        per = (pred - target) ** 2
    elif kind == "smooth_l1":
        per = F.smooth_l1_loss(pred, target, reduction="none", beta=0.1)
    elif kind == "mse+l1":
        per = (pred - target) ** 2 + (pred - target).abs()
    else:
        raise DataError(f"unknown loss {kind!r}; choose one of {LOSSES}")
    import torch

    m = mask.to(per.dtype)
    # torch.where, not a product: garbage (even NaN) in padded positions can never leak into the loss.
    per_bar = torch.where(mask, per.mean(-1), torch.zeros((), dtype=per.dtype, device=per.device))
    if clip_weighting:
        counts = m.sum(1)
        per_clip = per_bar.sum(1) / counts.clamp(min=1)
        return per_clip[counts > 0].mean()
    return per_bar.sum() / m.sum().clamp(min=1)


def _monitor_value(name: str, val_loss: float, metrics: Metrics) -> float:
    """Lower is better: the loss, an error, or minus an accuracy/correlation."""
    if name == "loss":
        return val_loss
    value = metrics.to_dict()[name]
    return value if any(k in name for k in ("mae", "mse", "rmse")) else -value


def fit(
    train: ClipSet,
    val: ClipSet,
    recipe: InputRecipe,
    config: TrainConfig = TrainConfig(),
    *,
    label_mapping: Mapping[str, tuple[float, float]] = DEFAULT_LABEL_MAPPING,
    on_epoch: Callable[[EpochLog], None] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train a VARegressor with AdamW; stop early on the validation split and restore the best epoch.

    Normalisation is fitted on the training bars only. Loss and metrics count real bars only.

    Raises:
        DataError: an empty train or validation set, mismatched input widths, or an unknown loss/monitor.
    """
    import torch

    if train.n_clips == 0 or train.n_bars == 0:
        raise DataError("the training split has no bars; refusing to train on zero examples")
    if val.n_clips == 0 or val.n_bars == 0:
        raise DataError("the validation split has no bars; early stopping needs one")
    if config.loss not in LOSSES:
        raise DataError(f"unknown loss {config.loss!r}; choose one of {LOSSES}")
    keys = [f"{lvl}.{k}" for lvl in ("bar", "clip") for k in LevelMetrics.__dataclass_fields__ if k != "confusion"]
    if config.monitor != "loss" and config.monitor not in keys:
        raise DataError(f"unknown monitor {config.monitor!r}; use 'loss' or one of {keys}")
    dim = recipe.input_dim
    for name, data in (("train", train), ("val", val)):
        if data.inputs[0].shape[1] != dim:
            raise DataError(f"{name} inputs have {data.inputs[0].shape[1]} columns; the recipe gives {dim}")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        return _fit(train, val, recipe, config, label_mapping, on_epoch, metadata)
    finally:
        torch.set_num_threads(threads)


def _fit(
    train: ClipSet,
    val: ClipSet,
    recipe: InputRecipe,
    config: TrainConfig,
    label_mapping: Mapping[str, tuple[float, float]],
    on_epoch: Callable[[EpochLog], None] | None,
    metadata: Mapping[str, Any] | None,
) -> TrainResult:
    import torch

    dim = recipe.input_dim
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    all_train = np.concatenate(train.inputs)
    reach = config.output_scale or max(abs(x) for point in label_mapping.values() for x in point)
    module = VARegressor(
        dim,
        config.hidden_dim,
        activation=config.activation,
        dropout=config.dropout,
        tanh=config.tanh,
        output_scale=min(1.0, float(reach)),
        input_clip=config.input_clip,
    )
    module.set_normalisation(all_train.mean(0), all_train.std(0))
    module.to(config.device)
    opt = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    x, y, m = (torch.from_numpy(a).to(config.device) for a in train.padded())
    groups = _group_matrix(recipe, config)
    val_x, val_y, val_mask = val.padded()
    vx, vy, vm = (torch.from_numpy(a).to(config.device) for a in (val_x, val_y, val_mask))
    best = (math.inf, 0, {k: v.clone() for k, v in module.state_dict().items()})
    history: list[EpochLog] = []
    for epoch in range(1, config.max_epochs + 1):
        started = time.perf_counter()
        module.train()
        order = rng.permutation(train.n_clips)
        total, count = 0.0, 0
        for start in range(0, len(order), config.batch_clips):
            idx = torch.from_numpy(order[start : start + config.batch_clips]).to(config.device)
            batch = x[idx]
            if groups is not None:
                batch = _drop_features(batch, groups, module.input_mean, config.feature_dropout)
            loss = masked_loss(module(batch), y[idx], m[idx], config.loss, config.clip_weighting)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        module.eval()
        with torch.inference_mode():
            vpred = module(vx)
            val_loss = float(masked_loss(vpred, vy, vm, config.loss, config.clip_weighting))
        metrics = masked_metrics(vpred.cpu().numpy(), val_y, val_mask, val.quadrants)
        entry = EpochLog(
            epoch,
            total / count,
            val_loss,
            metrics.clip.mae_valence,
            metrics.clip.mae_arousal,
            metrics.clip.quadrant_accuracy,
            time.perf_counter() - started,
        )
        history.append(entry)
        if on_epoch is not None:
            on_epoch(entry)
        score = _monitor_value(config.monitor, val_loss, metrics)
        if score < best[0] - 1e-9:
            best = (score, epoch, {k: v.detach().clone() for k, v in module.state_dict().items()})
        elif epoch - best[1] >= config.patience:
            log.info("early stop at epoch %d (best %d)", epoch, best[1])
            break
    module.load_state_dict(best[2])
    module.cpu().eval()
    regressor = Regressor(
        module, recipe, dict(label_mapping), {**(metadata or {}), "domain": domain_reference(module, train)}
    )
    val_metrics = evaluate(regressor, val)
    return TrainResult(regressor, tuple(history), best[1], val_metrics)


# Options added after models were shipped: recorded only when set, so a model trained without them
# keeps the metadata (and the bytes) it had.
_RECORDED_WHEN_SET: dict[str, Any] = {"input_clip": None, "feature_dropout": 0.0, "feature_dropout_features": ()}


def training_record(config: TrainConfig) -> dict[str, Any]:
    """The hyperparameters a model's metadata records (`_RECORDED_WHEN_SET` options only when not off)."""
    return {k: v for k, v in vars(config).items() if k not in _RECORDED_WHEN_SET or v != _RECORDED_WHEN_SET[k]}


def _group_matrix(recipe: InputRecipe, config: TrainConfig) -> Any:
    """(n_features, input_dim) 0/1 float32 tensor of the columns of each bar feature that feature dropout
    may drop (those `feature_dropout_features` names, or all), or None when feature dropout is off.

    Raises:
        DataError: feature_dropout is outside [0, 1), feature_dropout_features is set while feature_dropout
            is 0 or has a pattern naming no feature, or the recipe has no bar features to drop.
    """
    import torch

    if not 0.0 <= config.feature_dropout < 1.0:
        raise DataError(f"feature_dropout must be in [0, 1), got {config.feature_dropout!r}")
    if config.feature_dropout == 0.0:
        if config.feature_dropout_features:
            raise DataError("feature_dropout_features needs feature_dropout > 0")
        return None
    groups = recipe.feature_groups()
    if not groups:
        raise DataError(f"feature_dropout needs bar features, but backend {recipe.backend!r} has none; set it to 0")
    if config.feature_dropout_features:
        patterns = config.feature_dropout_features
        for pattern in patterns:
            if not any(fnmatch(name, pattern) for name in groups):
                raise DataError(
                    f"feature_dropout_features pattern {pattern!r} matches no bar feature; available: {sorted(groups)}"
                )
        groups = {name: cols for name, cols in groups.items() if any(fnmatch(name, p) for p in patterns)}
    matrix = torch.zeros(len(groups), recipe.input_dim, dtype=torch.float32)  # float once, not every step
    for row, cols in enumerate(groups.values()):
        matrix[row, cols] = 1.0
    return matrix.to(config.device)


def _drop_features(batch: Any, groups: Any, mean: Any, p: float) -> Any:
    """`batch` (clips, bars, input_dim) with, per clip, each feature group set to `mean` with probability p."""
    import torch

    hit = torch.rand(batch.shape[0], groups.shape[0], device=batch.device) < p
    columns = (hit.to(groups.dtype) @ groups) > 0
    return torch.where(columns[:, None, :], mean, batch)


def domain_reference(module: VARegressor, train: ClipSet) -> dict[str, Any]:
    """What `Regressor.domain_distance` divides by: the median over training clips of each clip's
    median bar RMS z-score (plus its 95th percentile, in the same units as the distance)."""
    per_clip = np.array([np.median(bar_rms_z(module, x)) for x in train.inputs if len(x)])
    median = float(np.median(per_clip))
    return {
        "method": "median over bars of the RMS z-score of the model inputs, over the training clips' median",
        "train_median_rms_z": median,
        "train_p95_distance": float(np.percentile(per_clip, 95) / median) if median > 0 else None,
    }


def evaluate(regressor: Regressor, clips: ClipSet, *, batch_size: int = 4096, device: str = "cpu") -> Metrics:
    """Bar- and clip-level metrics of a regressor on a clip set.

    Raises:
        DataError: the clip set is empty or its inputs do not fit the model.
    """
    preds = predict_clips(regressor, clips, batch_size=batch_size, device=device)
    x, y, mask = pad_clips(preds, clips.targets)
    return masked_metrics(x, y, mask, clips.quadrants)


def predict_clips(
    regressor: Regressor, clips: ClipSet, *, batch_size: int = 4096, device: str = "cpu"
) -> list[npt.NDArray[np.float32]]:
    """Per-bar predictions (n_bars, 2) for every clip, in one batched pass.

    Raises:
        DataError: no clips, or inputs that do not fit the model.
    """
    if clips.n_clips == 0:
        raise DataError("no clips to evaluate; the split is empty")
    flat = regressor.predict(np.concatenate(clips.inputs), batch_size=batch_size, device=device)
    bounds = np.cumsum([0, *(x.shape[0] for x in clips.inputs)])
    return [flat[bounds[i] : bounds[i + 1]] for i in range(clips.n_clips)]


# ---------------------------------------------------------------- reports


def write_training_log(out_dir: Path | str, history: Sequence[EpochLog], extra: Mapping[str, Any]) -> Path:
    """train_log.csv (one row per epoch) and train_log.json (history + extra) in out_dir."""
    out = Path(out_dir)
    rows = [asdict(h) for h in history]
    write_csv_atomic(out / "train_log.csv", list(EpochLog.__dataclass_fields__), rows)
    write_text_atomic(out / "train_log.json", json.dumps(to_json_safe({**extra, "history": rows}), indent=2) + "\n")
    return out / "train_log.csv"


def _scatter_predictions(
    points: npt.NDArray[np.floating], quadrants: Sequence[str], ax: Any, label: str, unit: str
) -> Any:
    """Predicted (valence, arousal) points (n, 2), coloured by their true quadrant."""
    import polars as pl

    from midiva.labels import QUADRANTS
    from midiva.plots import plot_va_scatter

    points = np.asarray(points).reshape(-1, 2)
    frame = pl.DataFrame(
        {"valence": points[:, 0], "arousal": points[:, 1], "quadrant": [f"true {q}" for q in quadrants]}
    )
    ax = plot_va_scatter(frame, ax, group="quadrant", groups=[f"true {q}" for q in QUADRANTS], label=label, unit=unit)
    ax.set(xlabel="predicted valence", ylabel="predicted arousal")
    return ax


@dataclass(frozen=True)
class EvaluationReport:
    """Files written by `write_evaluation`."""

    metrics_path: Path
    plots: tuple[Path, ...] = field(default_factory=tuple)
    predictions_path: Path | None = None


def write_evaluation(
    out_dir: Path | str,
    metrics: Metrics,
    clips: ClipSet,
    preds: Sequence[npt.NDArray[np.float32]],
    extra: Mapping[str, Any] | None = None,
) -> EvaluationReport:
    """metrics.json, predictions.csv (one row per clip), scatter and confusion PNGs in out_dir."""
    from matplotlib.figure import Figure

    from midiva.plots import plot_confusion

    out = Path(out_dir)
    metrics_path = out / "metrics.json"
    write_text_atomic(metrics_path, json.dumps({**metrics_json(metrics), **(extra or {})}, indent=2) + "\n")
    clip_pred = np.stack([p.mean(0) for p in preds])
    rows = [
        {"clip": n, "quadrant": q, "n_bars": p.shape[0], "valence": f"{c[0]:.6f}", "arousal": f"{c[1]:.6f}"}
        for n, q, p, c in zip(clips.names, clips.quadrants, preds, clip_pred, strict=True)
    ]
    write_csv_atomic(out / "predictions.csv", ["clip", "quadrant", "n_bars", "valence", "arousal"], rows)
    bar_quads = [q for q, p in zip(clips.quadrants, preds, strict=True) for _ in range(p.shape[0])]
    plots = []
    for name, draw in (
        ("scatter_clip.png", lambda ax: _scatter_predictions(clip_pred, clips.quadrants, ax, "clip means", "clips")),
        ("scatter_bar.png", lambda ax: _scatter_predictions(np.concatenate(preds), bar_quads, ax, "bars", "bars")),
        ("confusion_clip.png", lambda ax: plot_confusion(metrics.clip.confusion, ax, "clip quadrants")),
        ("confusion_bar.png", lambda ax: plot_confusion(metrics.bar.confusion, ax, "bar quadrants")),
    ):
        fig = Figure(figsize=(5, 5), layout="tight")
        draw(fig.subplots())
        with atomic_output(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plots.append(out / name)
    return EvaluationReport(metrics_path, tuple(plots), out / "predictions.csv")


# ---------------------------------------------------------------- end to end, from a preprocessed directory


def _run_device(name: str) -> str:
    """'auto' trains and evaluates on the CPU; any other name must be usable here.

    Raises:
        ConfigError: CUDA was asked for but is absent, or the name is not a device.
    """
    if name == "auto":
        return "cpu"
    from midiva.latents import resolve_device

    return str(resolve_device(name))


def _check_writable_file(path: Path) -> None:
    """Fail before long work if `path` cannot be written (a directory, an uncreatable or read-only folder)."""
    if path.is_dir():
        raise OutputError(f"--out {str(path)!r} is a directory; give a file path inside it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".midiva-probe-"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write {str(path)!r}: {err.strerror or err}; choose a writable --out") from err


@dataclass(frozen=True)
class TrainOutcome:
    """What `train_from_dir` did: the fit, its metrics by split ('val', and 'test' if asked) and its files."""

    result: TrainResult
    metrics: dict[str, Any]
    model_path: Path
    log_dir: Path


def train_from_dir(
    data_dir: Path | str,
    out: Path | str,
    *,
    backend: str | None = None,
    features: Sequence[str] = (),
    exclude_features: Sequence[str] = (),
    context: Sequence[str] = (),
    config: TrainConfig = TrainConfig(),
    labels_path: Path | str | None = None,
    report_test: bool = False,
    log_dir: Path | str | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
    wandb_project: str | None = None,
) -> TrainOutcome:
    """Train on a preprocessed, labelled directory; save the model (metrics and provenance inside) and its log.

    Args:
        data_dir: output of `preprocess_emopia` with labels from `prepare_labels`.
        out: model file (.safetensors), checked to be writable before anything is read.
        backend: 'features', 'musetok' or 'hybrid' (None: the one the data was preprocessed with).
        features: feature globs to keep (empty: all); `exclude_features`: globs to leave out.
        context: context blocks of the input recipe ('mean', 'std', 'window<k>').
        config: hyperparameters; device 'auto' means the CPU.
        labels_path: label file (None: DATA/labels_bar.json).
        report_test: also score the test split and store it (never used for selection).
        log_dir: where train_log.csv/.json go (None: `out` without suffix + '_log').
        wandb_project: also log to this Weights & Biases project (None: off).

    Raises:
        OutputError: `out` cannot be written. DataError: missing labels, splits, representations or features.
        ConfigError: an unusable device, or `wandb_project` without the wandb package.
    """
    data, out = Path(data_dir), Path(out)
    _check_writable_file(out)  # before the epochs, not after them
    labels_path = Path(labels_path) if labels_path is not None else data / "labels_bar.json"
    _, mapping = read_labels(labels_path)
    info = json.loads((data / "preprocess.json").read_text()) if (data / "preprocess.json").is_file() else {}
    backend = backend or info.get("backend", "features")
    raw_train, raw_val = load_split(data, "train", labels_path), load_split(data, "val", labels_path)
    recipe = recipe_for(raw_train[0], backend, features, exclude_features, context)
    config = replace(config, device=_run_device(config.device))
    train_set, val_set = build_clip_set(raw_train, recipe), build_clip_set(raw_val, recipe)
    run = None
    if wandb_project is not None:
        try:
            import wandb
        except ImportError as err:
            raise ConfigError("--wandb needs the wandb package: pip install 'midiva[wandb]'") from err
        run = wandb.init(project=wandb_project, config={**vars(config), **recipe.to_dict()})

    def epoch_done(entry: EpochLog) -> None:
        log.info(
            "epoch %d: train %.4f val %.4f clip acc %.3f",
            entry.epoch,
            entry.train_loss,
            entry.val_loss,
            entry.val_clip_quadrant_accuracy,
        )
        if run is not None:
            run.log(dict(vars(entry)))
        if on_epoch is not None:
            on_epoch(entry)

    started = time.perf_counter()
    data_info: dict[str, Any] = {
        "dir": str(data),
        "labels": str(labels_path),
        "split_source": info.get("split_source"),
        "checkpoint_sha256": info.get("checkpoint_sha256"),
        **({"barseq_sha256": info["barseq_sha256"]} if info.get("barseq_sha256") else {}),
        "code_sha256": info.get("code_sha256"),
        "train": {"clips": train_set.n_clips, "bars": train_set.n_bars},
        "val": {"clips": val_set.n_clips, "bars": val_set.n_bars},
    }
    meta = {
        "training": {**training_record(config), "command": "midiva train"},
        "data": data_info,
        "versions": versions(),
        "cpu": cpu_kind(),  # the training's float rounding: a rebuild on this kind is bit for bit
    }
    result = fit(train_set, val_set, recipe, config, label_mapping=mapping, on_epoch=epoch_done, metadata=meta)
    metrics: dict[str, Any] = {"val": metrics_json(result.val_metrics)}
    if report_test:
        test_set = build_clip_set(load_split(data, "test", labels_path), recipe)
        metrics["test"] = metrics_json(evaluate(result.regressor, test_set))
        data_info["test"] = {"clips": test_set.n_clips, "bars": test_set.n_bars}  # the checkpoint's "data" entry
    result.regressor.metadata.update(
        metrics=metrics,
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        train_seconds=round(time.perf_counter() - started, 2),
    )
    save_regressor(out, result.regressor)
    logs = Path(log_dir) if log_dir is not None else out.with_name(out.stem + "_log")
    write_training_log(
        logs, result.history, {"best_epoch": result.best_epoch, "metrics": metrics, "recipe": recipe.to_dict()}
    )
    if run is not None:
        run.summary.update({f"val/{k}": v for k, v in metrics["val"].items() if not isinstance(v, list)})
        run.finish()
    return TrainOutcome(result, metrics, out, logs)


@dataclass(frozen=True)
class EvaluationOutcome:
    """What `evaluate_model` measured: the model, its metrics, the clips scored and their (n_bars, 2) predictions."""

    regressor: Regressor
    metrics: Metrics
    clips: ClipSet
    preds: list[npt.NDArray[np.float32]]
    report: EvaluationReport | None = None


def evaluate_model(
    model: Regressor | Path | str | None = None,
    *,
    data_dir: Path | str | None = None,
    labels_path: Path | str | None = None,
    emopia_dir: Path | str | None = None,
    split: str = "test",
    out_dir: Path | str | None = None,
    checkpoint: Path | str | None = None,
    device: str = "auto",
    batch_size: int = 4096,
    num_workers: int = 0,
    progress: bool = True,
) -> EvaluationOutcome:
    """Score a model on one split of a preprocessed directory, or of EMOPIA preprocessed on the fly.

    Args:
        model: a Regressor or its file (None: the bundled model).
        data_dir: preprocessed, labelled directory, with `labels_path` (None: DATA/labels_bar.json); or
        emopia_dir: EMOPIA as distributed, preprocessed into a temporary directory for the model's
            backend and labelled with the model's own label mapping.
        out_dir: also write metrics.json, predictions.csv and plots here.
        checkpoint: MuseTok tokenizer for a musetok/hybrid model on `emopia_dir` (None: the default path).
        device: 'auto' means the CPU.

    Raises:
        ConfigError: not exactly one of `data_dir` and `emopia_dir`, or an unusable device.
        DataError: an empty split or data the model cannot read. CheckpointError: an unreadable model.
    """
    if (data_dir is None) == (emopia_dir is None):
        raise ConfigError("give exactly one of data_dir (preprocessed) and emopia_dir (EMOPIA as distributed)")
    run_device = _run_device(device)
    regressor = model if isinstance(model, Regressor) else load_regressor(model)
    with tempfile.TemporaryDirectory(prefix="midiva-eval-") as tmp:
        data, labels = Path(data_dir if data_dir is not None else tmp), labels_path
        if emopia_dir is not None:
            summary = preprocess_emopia(
                emopia_dir,
                data,
                backend=regressor.backend,
                checkpoint=checkpoint,
                device=run_device,
                batch_size=batch_size,
                num_workers=num_workers,
                splits=[split],
                progress=progress,
            )
            if summary.n_failed:
                log.warning("%d clips failed and are not scored: %s", summary.n_failed, summary.failures_by_type)
            labels = prepare_labels(data, regressor.label_mapping).bar_path
        clips = build_clip_set(load_split(data, split, labels), regressor.recipe)
        preds = predict_clips(regressor, clips, batch_size=batch_size, device=run_device)
        metrics = masked_metrics(*pad_clips(preds, clips.targets), clips.quadrants)
    report = None
    if out_dir is not None:
        report = write_evaluation(out_dir, metrics, clips, preds, {"model": regressor.source, "split": split})
    return EvaluationOutcome(regressor, metrics, clips, preds, report)

"""Stage 7b: valence and arousal of MIDI files from Python, one call per file or a stream of files.

Input: MIDI paths, raw bytes or (name, bytes) pairs, and a model (None: the bundled regressor;
a path to a .safetensors regressor; a `Regressor`; or an `AnnotationModel`).
Output: `BarPredictions` per file: for every MuseTok bar (bar 0 = the bar of the first note) its
`bar_number`, `start_tick` (the file's own ticks), `start_seconds` (from the file's tempo map;
120 bpm where it has none), and `valence` / `arousal` in [-1, 1] (float32, unrounded; annotate
writes the same values rounded to 4 decimals).

The batch form is annotate's runner without its ledger (`midiva.runner.stream`): the same parsing
pool, the same batched encoders and the same fixed-chunk predictor, so a file gets the values
annotate gives it, whatever other files share its batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva import representations
from midiva.annotate import AnnotationModel, load_annotation_model
from midiva.errors import DataError
from midiva.midi import read_midi_bytes
from midiva.prepare import FileResult, PrepareOptions
from midiva.runner import RunOptions, check_backend, stream, torch_threads_for
from midiva.sources import MidiSource, rows_from_midi

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("bar_number", "start_tick", "start_seconds", "valence", "arousal")
_WIDTHS = (10, 10, 13, 8, 8)  # the text table's column widths
ModelSpec = AnnotationModel | Path | str | Any | None


@dataclass(frozen=True, eq=False)
class BarPredictions:
    """Valence and arousal of every bar of one file (or why the file failed).

    Attributes:
        name: file path as given, or the md5 for bytes; md5: hex md5 of the bytes.
        bar_number: (n_bars,) int64, MuseTok bars from 0, as in annotate's CSV.
        start_tick: (n_bars,) int64, bar starts in the file's own ticks (`ticks_per_quarter`).
        start_seconds: (n_bars,) float64, bar starts in seconds from the file's tempo map.
        valence / arousal: (n_bars,) float32 in [-1, 1].
        title / artist: from the data set row, when known (files: title is the file stem).
        error_type / error: set when the file could not be predicted (then there are no bars).
    """

    name: str
    md5: str
    bar_number: npt.NDArray[np.int64]
    start_tick: npt.NDArray[np.int64]
    start_seconds: npt.NDArray[np.float64]
    valence: npt.NDArray[np.float32]
    arousal: npt.NDArray[np.float32]
    ticks_per_quarter: int = 0
    time_signature: str = ""
    title: str = ""
    artist: str = ""
    error_type: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        """True when the file was predicted."""
        return not self.error_type

    @property
    def n_bars(self) -> int:
        """Number of bars."""
        return len(self.bar_number)

    def __len__(self) -> int:
        return self.n_bars

    def columns(self) -> dict[str, npt.NDArray[Any]]:
        """The bar table as `PREDICTION_COLUMNS` -> array."""
        return {name: getattr(self, name) for name in PREDICTION_COLUMNS}

    def to_pandas(self) -> Any:
        """The bar table as a pandas DataFrame (columns `PREDICTION_COLUMNS`)."""
        import pandas as pd

        return pd.DataFrame(self.columns())

    def to_polars(self) -> Any:
        """The bar table as a polars DataFrame (columns `PREDICTION_COLUMNS`)."""
        import polars as pl

        return pl.DataFrame(self.columns())

    def to_text(self) -> str:
        """A readable table: a heading line (file, title — artist, md5, bars), then one line per bar."""
        label = self.title or Path(self.name).name
        head = f"{self.name}: {label}" + (f" — {self.artist}" if self.artist else "")
        if not self.ok:
            return f"{head}: {self.error_type}: {self.error}\n"
        lines = [
            f"{head}; md5 {self.md5}, {self.n_bars} bars of {self.time_signature}, {self.ticks_per_quarter} ticks/quarter",
            " ".join(f"{c:>{w}}" for c, w in zip(PREDICTION_COLUMNS, _WIDTHS, strict=True)),
        ]
        lines += [
            f"{b:>10d} {t:>10d} {sec:>13.3f} {v:>+8.4f} {a:>+8.4f}"
            for b, t, sec, v, a in zip(*(c.tolist() for c in self.columns().values()), strict=True)
        ]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: file, md5, title, artist, n_bars, and the bar table as lists (or the error)."""
        head: dict[str, Any] = {"file": self.name, "md5": self.md5, "title": self.title, "artist": self.artist}
        if not self.ok:
            return {**head, "error": f"{self.error_type}: {self.error}"}
        bars = {
            k: [round(float(x), 6) if k != "bar_number" and k != "start_tick" else int(x) for x in v]
            for k, v in self.columns().items()
        }
        return {
            **head,
            "ticks_per_quarter": self.ticks_per_quarter,
            "time_signature": self.time_signature,
            "n_bars": self.n_bars,
            **bars,
        }


@functools.lru_cache(maxsize=1)
def _bundled_model(device: str) -> AnnotationModel:
    return load_annotation_model(None, device=device)


def resolve_model(
    model: ModelSpec = None, *, checkpoint: Path | str | None = None, device: str = "auto"
) -> AnnotationModel:
    """An `AnnotationModel` from None (the bundled model, loaded once), a path, a Regressor or an AnnotationModel.

    Raises:
        CheckpointError: the model or the MuseTok checkpoint its backend needs is missing or unreadable.
    """
    if isinstance(model, AnnotationModel):
        return model
    if model is None and checkpoint is None:
        return _bundled_model(device)
    if model is None or isinstance(model, (str, Path)):
        return load_annotation_model(model, checkpoint=checkpoint, device=device)
    backend = check_backend(model, None)
    batched = any(rep.batched for rep in representations.recipe(backend))
    run_device = device if batched else "cpu"
    if batched:
        from midiva.latents import resolve_device

        run_device = str(resolve_device(device))
    encoders = representations.load_encoders(backend, checkpoint=checkpoint, device=run_device)
    return AnnotationModel(model, encoders, backend, run_device)


def _result(f: FileResult, preds: npt.NDArray[np.float32]) -> BarPredictions:
    title, artist = str(f.meta.get("title", "") or ""), str(f.meta.get("artist", "") or "")
    if not f.ok:
        empty = np.zeros(0)
        return BarPredictions(
            f.name,
            f.md5,
            empty.astype(np.int64),
            empty.astype(np.int64),
            empty,
            empty.astype(np.float32),
            empty.astype(np.float32),
            title=title,
            artist=artist,
            error_type=f.error_type,
            error=f.error,
        )
    return BarPredictions(
        f.name,
        f.md5,
        np.arange(f.n_bars, dtype=np.int64),
        np.asarray(f.info["bar_start_ticks"], np.int64),
        np.asarray(f.info["bar_start_seconds"], np.float64),
        np.ascontiguousarray(preds[:, 0], np.float32),
        np.ascontiguousarray(preds[:, 1], np.float32),
        int(f.info.get("ticks_per_quarter", 0)),
        str(f.info.get("time_signature", "")),
        title,
        artist,
    )


def predict_files(
    sources: Iterable[MidiSource],
    model: ModelSpec = None,
    *,
    checkpoint: Path | str | None = None,
    device: str = "auto",
    batch_size: int = 4096,
    num_workers: int = 0,
    include_drums: bool = True,
    strict: bool = False,
    autocast: str | None = None,
) -> Iterator[BarPredictions]:
    """Predict many files with annotate's runner; one `BarPredictions` per source, in order.

    A file that fails yields a `BarPredictions` with `error_type` set and no bars (strict: the error is raised).

    Args:
        sources: paths, raw bytes, or (name, bytes) pairs.
        model: None (bundled), a .safetensors path, a Regressor, or an AnnotationModel.
        checkpoint: MuseTok tokenizer checkpoint, for musetok/hybrid models.
        num_workers: MIDI-parsing processes (0: in this process).
    """
    loaded = resolve_model(model, checkpoint=checkpoint, device=device)
    # annotate's torch threads for the model calls, so the sums run in the same order
    options = RunOptions(
        batch_size=batch_size,
        num_workers=num_workers,
        strict=strict,
        include_drums=include_drums,
        progress=False,
        device=loaded.device,
        autocast=autocast,
        torch_threads=torch_threads_for(loaded.backend, num_workers, 1),
    )
    needs = representations.needs_of(loaded.backend)
    parse = PrepareOptions(
        include_drums, "features" in needs, "tokens" in needs, pitched_tokens="pitched_tokens" in needs, bar_times=True
    )
    results = stream(
        rows_from_midi(sources),
        loaded.backend,
        encoders=loaded.encoders,
        regressor=loaded.regressor,
        options=options,
        parse=parse,
    )
    for f, _, preds in _with_torch_threads(results, options.torch_threads):
        yield _result(f, preds if preds is not None else np.zeros((0, 2), np.float32))


def _with_torch_threads(items: Iterator[Any], threads: int | None) -> Iterator[Any]:
    """Iterate with torch's intra-op threads set to `threads`, restored while the caller holds a result."""
    from midiva.runner import _set_torch_threads

    while True:
        previous = _set_torch_threads(threads)
        try:
            item = next(items, None)
        finally:
            _set_torch_threads(previous)
        if item is None:
            return
        yield item


def predict(source: Path | str | bytes, model: ModelSpec = None, **options: Any) -> BarPredictions:
    """Valence and arousal of every bar of one MIDI file.

    Args:
        source: path or raw bytes of a MIDI file.
        model: None (the bundled model), a .safetensors path, a Regressor, or an AnnotationModel.
        **options: as for `predict_files` (checkpoint, device, batch_size, include_drums, autocast).

    Raises:
        MidiReadError: unreadable file. EmptyScoreError: no notes. CheckpointError: bad model.
    """
    data, name = read_midi_bytes(source)
    label = str(source) if isinstance(source, (str, Path)) else name
    options.pop("strict", None)
    (result,) = predict_files([(label, data)], model, strict=True, **options)
    if not result.ok:  # strict raises per-file errors itself; this is the fallback for the rest
        raise DataError(f"{label!r}: {result.error_type}: {result.error}")
    return result


__all__ = ["PREDICTION_COLUMNS", "BarPredictions", "predict", "predict_files", "resolve_model"]

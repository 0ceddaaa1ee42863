"""Stage 7: annotate a corpus — valence and arousal for every bar of every file, exactly once.

Input: `SourceRow`s (`midiva.sources`: the GigaMIDI hub data set, local parquet, or MIDI files)
and a trained regressor (plus the encoders its backend needs, `midiva.representations`).
Output, beside `--out annotations.csv`:
  annotations.csv           md5,bar_number,valence,arousal — one row per bar, bar_number from 0
                            (MuseTok's bar 0 = the bar of the first note), valence and arousal in
                            [-1, 1] with 4 decimals; the rows of one file are contiguous
  annotations.meta.csv      one row per file (annotated or failed): split, title, artist, genre
                            fields (lists joined with '|'), bars, what the conversion dropped
  annotations.failures.csv  md5,name,stage,error_type,message
  annotations.csv.done      the ledger: one commit record per file (`midiva.ledger`)
  annotations.summary.json  the last run's `RunSummary`

The run itself (parsing pool, batched encoding, prediction, commits, resume, the lock) is
`midiva.runner.run`; this module is annotation's sink (`AnnotationSink`: the per-bar rows), its
model loading and the Parquet export. Files are committed in source order, so an interrupted and
resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva import representations
from midiva.atomic import atomic_output
from midiva.errors import CheckpointError, OutputError
from midiva.ledger import GENRE_COLUMNS, TABLE_HEADERS, OutputPaths, output_paths
from midiva.lock import OutputLock
from midiva.prepare import FileResult, PrepareFn
from midiva.runner import Regressor, RunOptions, RunSummary, check_backend, run
from midiva.sources import SkipUnread, SourceRow

log = logging.getLogger(__name__)

__all__ = [
    "AnnotateOptions",
    "AnnotationModel",
    "AnnotationSink",
    "RunSummary",
    "annotate_stream",
    "export_parquet",
    "format_rows",
    "load_annotation_model",
]


@dataclass(frozen=True)
class AnnotateOptions(RunOptions):
    """How an annotation run is carried out: `midiva.runner.RunOptions`, plus

    Attributes:
        parquet: also export the tables as Parquet at the end.
    """

    parquet: bool = False


_MAX_LOOKUP_BARS = 100_000  # midiva.events.MAX_BARS: every bar_number a file can have


@functools.cache
def _row_pieces() -> tuple[npt.NDArray[np.bytes_], npt.NDArray[np.bytes_]]:
    """b",<bar_number>," for every bar number, and the text of every 4-decimal value in [-1, 1]
    ("-1.0000" .. "1.0000", indexed by 10^4·value + 10^4)."""
    numbers = np.array([f",{i},".encode() for i in range(_MAX_LOOKUP_BARS)])
    values = np.array([f"{k / 1e4:.4f}".encode() for k in range(-10_000, 10_001)])
    return numbers, values


def format_rows(md5: str, predictions: npt.NDArray[np.floating]) -> bytes:
    """CSV rows `md5,bar_number,valence,arousal` of one file, values rounded to 4 decimals.

    The text is that of `f"{round(v, 4):.4f}"` with -0.0 written as 0.0000. Values in [-1, 1]
    (all of them, for a tanh head) are looked up and joined by numpy's string ufuncs instead
    of formatted row by row, which was the main process's largest per-bar cost.
    """
    rounded = np.round(np.asarray(predictions, dtype=np.float64), 4) + 0.0  # +0.0: no "-0.0000"
    steps = np.rint(rounded * 1e4)
    n = len(rounded)
    if (
        0 < n <= _MAX_LOOKUP_BARS
        and hasattr(np, "strings")  # numpy >= 2
        and np.isfinite(steps).all()
        and np.abs(steps).max() <= 10_000
    ):
        numbers, values = _row_pieces()
        index = steps.astype(np.intp) + 10_000
        text = np.strings.add(np.strings.add(numbers[:n], values[index[:, 0]]), b",")
        lines = np.strings.add(text, values[index[:, 1]]).tolist()
        prefix = md5.encode()
        return prefix + (b"\n" + prefix).join(lines) + b"\n"
    return "".join([f"{md5},{i},{v:.4f},{a:.4f}\n" for i, (v, a) in enumerate(rounded.tolist())]).encode()


class AnnotationSink:
    """Annotation's output: one CSV row per bar (`format_rows`), the metadata and failures tables."""

    headers = TABLE_HEADERS
    label = "annotate"
    format_rows = staticmethod(format_rows)  # the runner runs it beside the parse where it can

    def __init__(self, out: Path | str, *, parquet: bool = False) -> None:
        self.paths: OutputPaths = output_paths(out)
        self.parquet = parquet
        if self.paths.csv.is_dir():
            raise OutputError(
                f"--out {str(self.paths.csv)!r} is a directory; give a CSV file path such as "
                f"{str(self.paths.csv / 'annotations.csv')!r}"
            )

    def rows(
        self, result: FileResult, tensors: Mapping[str, Any], predictions: npt.NDArray[np.float32] | None
    ) -> tuple[bytes, int]:
        """The file's CSV rows (its predictions, one row per bar), as the worker made them when it did."""
        assert predictions is not None, "annotation needs a regressor"
        if result.rows is not None:
            return result.rows, len(predictions)
        return format_rows(result.md5, predictions), len(predictions)

    def finish(self, complete: bool) -> None:
        """Export Parquet copies of the committed tables when asked."""
        if self.parquet:
            export_parquet(self.paths)


@dataclass(frozen=True)
class AnnotationModel:
    """A loaded regressor and the encoders its backend needs.

    Attributes:
        regressor: the valence/arousal model.
        encoders: the loaded encoder of each batched representation, by name.
        backend: the model's backend (`midiva.representations.recipe`).
        device: where encoders and regressor run.
    """

    regressor: Any
    encoders: dict[str, Any] = field(default_factory=dict)
    backend: str = "features"
    device: str = "cpu"

    @property
    def encoder(self) -> Any:
        """The MuseTok encoder (None unless the backend has 'musetok')."""
        return self.encoders.get("musetok")

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the model and its encoders in a run's fingerprint (provenance)."""
        from midiva.runner import fingerprint

        full = fingerprint(self.backend, self.encoders, self.regressor, RunOptions())
        return {k: v for k, v in full.items() if k.endswith("sha256")}


def load_annotation_model(
    model: Path | str | None = None,
    *,
    backend: str | None = None,
    checkpoint: Path | str | None = None,
    device: str = "auto",
    storage_dir: Path | str | None = None,
) -> AnnotationModel:
    """Load a regressor (None: the bundled default, offline) and the encoders its backend needs.

    Raises:
        CheckpointError: the model or an encoder checkpoint is missing or unreadable, or the model was
            trained on other barseq weights than the bundled ones.
        ConfigError: `backend` differs from the model's, or the device is unusable.
    """
    from midiva.model import check_feature_names, default_model_path, load_regressor

    regressor = load_regressor(model)
    check_feature_names(regressor.recipe, model or default_model_path())
    chosen = check_backend(regressor, backend)
    batched = any(rep.batched for rep in representations.recipe(chosen))
    run_device = "cpu"  # the features MLP is tiny: CPU beats a transfer to the GPU
    if batched or device != "auto":
        from midiva.latents import resolve_device

        run_device = str(resolve_device(device))
    encoders = representations.load_encoders(chosen, checkpoint=checkpoint, device=run_device, storage_dir=storage_dir)
    check_encoder_weights(regressor, encoders, model)
    return AnnotationModel(regressor, encoders, chosen, run_device)


def check_encoder_weights(regressor: Any, encoders: Mapping[str, Any], model: Path | str | None) -> None:
    """Refuse a model trained on the outputs of other barseq weights than the ones loaded.

    Its inputs would be another representation of the same width: the predictions would be wrong
    without any error. Models record the weights they were trained on (`data.barseq_sha256`) since
    preprocess-emopia records them; older models carry nothing to check.

    Raises:
        CheckpointError: the recorded and the loaded barseq weights differ.
    """
    trained = ((getattr(regressor, "metadata", None) or {}).get("data") or {}).get("barseq_sha256")
    encoder = encoders.get("barseq")
    if trained and encoder is not None and encoder.sha256 != trained:
        raise CheckpointError(
            f"model {str(model or 'DEFAULT')!r} was trained on barseq weights {trained[:12]}..., but this midiva "
            f"bundles {encoder.sha256[:12]}...; retrain it on the bundled weights (midiva preprocess-emopia "
            "--backend ...barseq, then midiva train), or use the midiva version it was trained with"
        )


def annotate_stream(
    rows: Iterable[SourceRow],
    out: Path | str,
    regressor: Regressor,
    *,
    encoder: Any = None,
    encoders: Mapping[str, Any] | None = None,
    options: AnnotateOptions | None = None,
    prepare: PrepareFn | None = None,
    lock: OutputLock | None = None,
    stop: Callable[[], bool] | None = None,
    skip_unread: SkipUnread | None = None,
) -> RunSummary:
    """Annotate every bar of every row into the CSV at `out`, resumably and exactly once.

    Args:
        rows: files to annotate (see `midiva.sources`), in a stable order.
        out: the annotations CSV; the other tables are written beside it.
        regressor: `.backend`, `.make_inputs(...)`, `.predict(inputs, batch_size=, device=)`.
        encoder: the MuseTok encoder (musetok/hybrid backends); shorthand for `encoders={"musetok": encoder}`.
        encoders: the loaded encoder of each batched representation, by name.
        prepare / lock / stop / skip_unread: see `midiva.runner.run`.

    The resume fingerprint is computed by the runner (model weights, backend, encoders, drums, shard);
    resuming with another model or settings raises ConfigError naming what differs.

    Raises:
        OutputError: the outputs cannot be written (read-only, full disk); committed rows stay intact.
        OutputLockedError: another live process writes `out`.
        ConfigError: resuming outputs made with another model/options.
    """
    options = options or AnnotateOptions()
    all_encoders = {**({"musetok": encoder} if encoder is not None else {}), **(encoders or {})}
    sink = AnnotationSink(out, parquet=options.parquet)
    return run(
        rows,
        sink,
        regressor.backend,
        encoders=all_encoders,
        regressor=regressor,
        options=options,
        prepare=prepare,
        lock=lock,
        stop=stop,
        skip_unread=skip_unread,
    )


def export_parquet(paths: OutputPaths) -> list[Path]:
    """Write `<stem>.parquet` and `<stem>.meta.parquet` from the committed CSV tables.

    Raises:
        OutputError: a Parquet file cannot be written (the CSV outputs are untouched).
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    types = {"md5": pa.string(), "bar_number": pa.int32(), "valence": pa.float32(), "arousal": pa.float32()}
    meta_types = dict.fromkeys(
        ("md5", "status", "split", "name", "title", "artist", *GENRE_COLUMNS, "NOMML", "tempo"), pa.string()
    )
    written = []
    for source, column_types in ((paths.csv, types), (paths.meta, meta_types)):
        target = source.with_suffix(".parquet")
        try:
            with atomic_output(target, hint="the CSV outputs are intact") as tmp:
                reader = pacsv.open_csv(
                    source,
                    read_options=pacsv.ReadOptions(block_size=1 << 24),
                    parse_options=pacsv.ParseOptions(newlines_in_values=True),
                    convert_options=pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=False),
                )
                with pq.ParquetWriter(tmp, reader.schema) as sink:
                    for batch in reader:
                        sink.write_batch(batch)
        except pa.ArrowInvalid as err:
            raise OutputError(f"cannot write {str(target)!r}: {err}; the CSV outputs are intact") from err
        written.append(target)
    return written

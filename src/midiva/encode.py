"""Stage 4b: MIDI files -> per-file tensor files of a batched representation (MuseTok latents).

Input: MIDI files as paths, raw bytes or (name, bytes) pairs, and a loaded encoder (`MuseTokEncoder`).
Output, in the output directory, through `midiva.runner.run` (the one batch runner, so resume,
crash isolation, failures and `--no-resume` mean what they mean for annotate):
  <md5>.safetensors   latents (n_bars, d_latent) float32, indices (n_bars, n_quantizers) int64,
                      pre_quant (n_bars, d_latent) float32, plus string metadata; written atomically
  index.csv           md5,name,n_bars,file — one row per encoded file
  meta.csv            one row per file (encoded or failed), annotate's metadata columns
  failures.csv        md5,name,stage,error_type,message — annotate's failures schema
  index.csv.done      the ledger (`midiva.ledger`): a file is done once its record is fsynced
  encode.summary.json the last run's `RunSummary`
A file's tensors are written before its record, so a crash leaves at most a file that the next run
writes again with the same bytes. `iter_encoded_files` is the same pipeline without outputs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva import __version__
from midiva.errors import DataError
from midiva.latents import EncodedBars, MuseTokEncoder, save_bar_tensors
from midiva.ledger import FAILURE_FIELDS, META_FIELDS, OutputPaths, csv_line
from midiva.prepare import FileResult
from midiva.runner import RunOptions, RunSummary, run, stream
from midiva.sources import MidiSource, rows_from_midi

log = logging.getLogger(__name__)

INDEX_FIELDS = ("md5", "name", "n_bars", "file")


@dataclass(frozen=True)
class EncodedFile:
    """One MIDI file through events and the encoder; `encoded` on success, else the failure.

    Attributes:
        name: file name, or the md5 for nameless bytes.
        md5: hex md5 of the file's bytes (of its path when the bytes could not be read).
        encoded: per-bar encodings, on success.
        stage / error_type / error: where and why it failed (the failures table's columns).
        info: what parsing reported (ticks per quarter, time signature, leading bars dropped, ...).
    """

    name: str
    md5: str
    encoded: EncodedBars | None = None
    stage: str = ""
    error_type: str = ""
    error: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)


def _encoded(tensors: Mapping[str, npt.NDArray[Any]]) -> EncodedBars:
    return EncodedBars(latents=tensors["latents"], indices=tensors["indices"], pre_quant=tensors["pre_quant"])


def iter_encoded_files(
    encoder: MuseTokEncoder,
    sources: Iterable[MidiSource],
    *,
    batch_size: int = 4096,
    num_workers: int = 0,
    strict: bool = False,
    include_drums: bool = True,
    device: str | None = None,
    autocast: str | None = None,
) -> Iterator[EncodedFile]:
    """MIDI files -> events -> latents, bars of many files per forward pass; one EncodedFile per source, in order.

    Args:
        encoder: a loaded MuseTokEncoder.
        sources: paths, raw bytes, or (name, bytes) pairs.
        batch_size: bars gathered from consecutive files and encoded together.
        num_workers: processes that parse MIDI into events (0: in this process).
        strict: re-raise the first per-file error instead of recording it.
        include_drums: keep drum notes in the bars.
        device / autocast: where and in what precision the encoder runs (default: where it is).
    """
    run_device = device or str(next(encoder.parameters()).device)
    options = RunOptions(
        batch_size=batch_size,
        num_workers=num_workers,
        strict=strict,
        include_drums=include_drums,
        device=run_device,
        autocast=autocast,
        progress=False,
    )
    for f, tensors, _ in stream(rows_from_midi(sources), "musetok", encoders={"musetok": encoder}, options=options):
        if f.ok:
            yield EncodedFile(f.name, f.md5, _encoded(tensors), info=f.info)
        else:
            yield EncodedFile(f.name, f.md5, stage=f.stage, error_type=f.error_type, error=f.error, info=f.info)


@dataclass(frozen=True)
class EncodeSummary:
    """Counts of one `encode_files` run (what `midiva encode` prints as JSON).

    Attributes:
        out: the output directory.
        files: sources seen (written + resumed + failed + repeated md5s).
        written: `<md5>.safetensors` files written by this run.
        resumed: sources skipped because they were committed (encoded or failed) before.
        failed: sources recorded in failures.csv by this run.
        failures_by_type: failed sources per error type name.
        bars: bars encoded by this run.
        seconds: wall time of the run.
    """

    out: str
    files: int
    written: int
    resumed: int
    failed: int
    failures_by_type: dict[str, int] = field(default_factory=dict)
    bars: int = 0
    seconds: float = 0.0

    @classmethod
    def from_run(cls, out: Path, summary: RunSummary) -> EncodeSummary:
        """The counts of a runner summary, in encode's terms."""
        files = summary.files_done + summary.files_failed + summary.files_skipped_done + summary.files_skipped_duplicate
        return cls(
            str(out),
            files,
            summary.files_done,
            summary.files_skipped_done,
            summary.files_failed,
            dict(summary.failures_by_type),
            summary.bars,
            summary.elapsed_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in the CLI's key order (JSON-ready)."""
        return {
            "out": self.out,
            "files": self.files,
            "written": self.written,
            "resumed": self.resumed,
            "failed": self.failed,
            "failures_by_type": dict(self.failures_by_type),
            "bars": self.bars,
            "seconds": self.seconds,
        }


def tensor_paths(out_dir: Path | str) -> OutputPaths:
    """The tables, ledger and summary of a tensor output directory."""
    out = Path(out_dir)
    return OutputPaths(
        out / "index.csv", out / "meta.csv", out / "failures.csv", out / "index.csv.done", out / "encode.summary.json"
    )


class TensorSink:
    """`<out>/<md5>.safetensors` per file, indexed in index.csv (`midiva.runner.Sink`)."""

    headers = (csv_line(INDEX_FIELDS), csv_line(META_FIELDS), csv_line(FAILURE_FIELDS))
    label = "encode"

    def __init__(self, out_dir: Path | str, metadata: Mapping[str, str]) -> None:
        self.out = Path(out_dir)
        self.paths = tensor_paths(self.out)
        self.metadata = dict(metadata)
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"--out {str(self.out)!r} is a file; give a directory")

    def rows(self, result: FileResult, tensors: Mapping[str, npt.NDArray[Any]], predictions: Any) -> tuple[bytes, int]:
        """Write the file's tensors; its index row."""
        name = f"{result.md5}.safetensors"
        n_bars = int(tensors["latents"].shape[0])
        metadata = {
            "md5": result.md5,
            "source_file": result.name,
            "n_bars": str(n_bars),
            "leading_bars_dropped": str(result.info.get("leading_bars_dropped", 0)),
            "time_signature": str(result.info.get("time_signature", "")),
            "midiva_version": __version__,
            **self.metadata,
        }
        arrays = {k: np.ascontiguousarray(tensors[k]) for k in ("latents", "indices", "pre_quant")}
        save_bar_tensors(self.out / name, arrays, metadata)
        return csv_line([result.md5, result.name, n_bars, name]), 1

    def finish(self, complete: bool) -> None:
        """Nothing to do: every file was written before its commit."""


def encode_files(
    sources: Iterable[MidiSource],
    out_dir: Path | str,
    encoder: MuseTokEncoder,
    *,
    checkpoint_sha256: str = "",
    backend: str = "musetok",
    resume: bool = True,
    strict: bool = False,
    include_drums: bool = True,
    batch_size: int = 4096,
    num_workers: int = 0,
    autocast: str | None = None,
    progress: bool = False,
    device: str | None = None,
) -> EncodeSummary:
    """Encode MIDI files into `<out_dir>/<md5>.safetensors` through the batch runner (see the module docstring).

    Args:
        sources: paths, raw bytes, or (name, bytes) pairs; a path's metadata source_file is the path as given.
        out_dir: output directory (created if needed).
        encoder: a loaded MuseTokEncoder.
        checkpoint_sha256: sha256 of the checkpoint, stored in each file's metadata and the fingerprint.
        backend: the representation encoded (stored in each file's metadata); only 'musetok' today.
        resume: skip files committed before (encoded or failed); False starts over.
        strict: re-raise the first per-file error instead of recording it.
        include_drums: keep drum notes in the bars.
        batch_size: bars per forward pass (bars of many files share one).
        num_workers: processes that parse MIDI into events (0: in this process).
        autocast: None or 'none' (float32), 'bf16' or 'fp16' (CUDA); stored in the metadata.
        progress: show a tqdm bar on stderr (only when stderr is a terminal).
        device: where the encoder runs (default: where it is).

    Raises:
        OutputError: the output directory, a table or a tensor file cannot be written.
        ConfigError: resuming an output made with another checkpoint or settings.
    """
    from midiva.errors import ConfigError, OutputError

    if backend != "musetok":
        raise ConfigError(f"encode writes MuseTok latents; got backend {backend!r}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot write to {str(out)!r}: {err.strerror or err}; choose a writable --out") from err
    if checkpoint_sha256:
        encoder.checkpoint_sha256 = checkpoint_sha256
    autocast_name = autocast or "none"
    items = sources if isinstance(sources, list) else list(sources)
    metadata = {
        "backend": backend,
        "checkpoint_sha256": checkpoint_sha256,
        "autocast": autocast_name,
        "encoder_config": json.dumps(encoder.config.to_dict()),
    }
    options = RunOptions(
        batch_size=batch_size,
        num_workers=num_workers,
        resume=resume,
        strict=strict,
        include_drums=include_drums,
        progress=progress,
        device=device or str(next(encoder.parameters()).device),
        autocast=None if autocast_name == "none" else autocast_name,
        total_files=len(items),
        cpu_threads=0,
    )
    sink = TensorSink(out, metadata)
    summary = run(rows_from_midi(items), sink, "musetok", encoders={"musetok": encoder}, options=options)
    return EncodeSummary.from_run(out, summary)

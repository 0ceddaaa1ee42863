"""Stage 4b: MIDI files -> per-file latent files (the file-level MuseTok pipeline).

Input: MIDI files as paths, raw bytes or (name, bytes) pairs, and a loaded `MuseTokEncoder`.
Output: `iter_encoded_files` yields one `EncodedFile` per source (events, per-bar latents or the
error); `encode_files` writes `<out>/<md5>.safetensors` per file — latents (n_bars, d_latent)
float32, indices (n_bars, n_quantizers) int64, pre_quant (n_bars, d_latent) float32, plus string
metadata — appends each failure to `<out>/failures.csv` (md5, stage, error_type, message), skips
files already done (resume) and returns an `EncodeSummary` of counts. Bars of many files share each
forward pass. This module builds on `midiva.latents`; latents never imports it.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from midiva import __version__
from midiva.errors import MidivaError, OutputError, WorkerCrash
from midiva.events import BarEvents, midi_to_bars
from midiva.latents import EncodedBars, MuseTokEncoder, encode_songs, save_bar_tensors
from midiva.midi import read_midi_bytes
from midiva.workers import map_in_order

log = logging.getLogger(__name__)

LEDGER_NAME = "failures.csv"
LEDGER_HEADER = ("md5", "stage", "error_type", "message")


@dataclass(frozen=True)
class EncodedFile:
    """One MIDI file through events and the encoder; `encoded` on success, else `error` (stage 'events').

    Attributes:
        name: file name, or the md5 for nameless bytes.
        md5: hex md5 of the file's bytes ('' when they could not be read).
        bars: the file's events, when tokenisation succeeded.
        encoded: per-bar encodings, on success.
        error: a MidivaError, or an unexpected exception when not strict.
    """

    name: str
    md5: str
    bars: BarEvents | None = None
    encoded: EncodedBars | None = None
    error: Exception | None = None


MidiSource = Path | str | bytes | tuple[str, bytes]


def _tokenize_source(source: MidiSource, strict: bool, events_options: Mapping[str, Any]) -> EncodedFile:
    if isinstance(source, tuple):
        name, data = source
    else:
        try:
            data, name = read_midi_bytes(source)
        except MidivaError as err:
            return EncodedFile(name=str(source), md5="", error=err)
    md5 = hashlib.md5(data).hexdigest()
    try:
        return EncodedFile(name=name, md5=md5, bars=midi_to_bars(data, name=name, **events_options))
    except MidivaError as err:
        return EncodedFile(name=name, md5=md5, error=err)
    except Exception as err:  # one unforeseen file must not stop a two-million-file run
        if strict:
            raise
        log.debug("unexpected error tokenizing %s", name, exc_info=True)
        return EncodedFile(name=name, md5=md5, error=err)


def iter_encoded_files(
    encoder: MuseTokEncoder,
    sources: Iterable[MidiSource],
    *,
    chunk_bars: int = 16384,
    num_workers: int = 0,
    strict: bool = False,
    events_options: Mapping[str, Any] | None = None,
    **encode_options: Any,
) -> Iterator[EncodedFile]:
    """MIDI files -> events -> latents, bars of many files per forward pass; one EncodedFile per source, in order.

    Args:
        encoder: a loaded MuseTokEncoder.
        sources: paths, raw bytes, or (name, bytes) pairs.
        chunk_bars: bars gathered from consecutive files before they are encoded together.
        num_workers: processes that parse MIDI into events (0: in this process).
        strict: re-raise unexpected (non-midiva) exceptions instead of recording them.
        events_options: keyword options of `midiva.events.midi_to_bars`.
        **encode_options: batch_size, batch_tokens, device, autocast (see `encode_bars`).
    """
    pending: list[EncodedFile] = []

    def flush() -> Iterator[EncodedFile]:
        songs = [item.bars.bar_token_ids(encoder.config.max_len) for item in pending if item.bars is not None]
        encoded = iter(encode_songs(encoder, songs, **encode_options))
        for item in pending:
            yield item if item.bars is None else EncodedFile(item.name, item.md5, item.bars, next(encoded))

    tokenize = functools.partial(_tokenize_source, strict=strict, events_options=dict(events_options or {}))
    n_bars = 0
    for item in map_in_order(tokenize, iter(sources), num_workers, _crashed, chunk_size=4):
        pending.append(item)
        n_bars += item.bars.n_bars if item.bars is not None else 0
        if n_bars >= chunk_bars:
            yield from flush()
            pending, n_bars = [], 0
    if pending:
        yield from flush()


def _crashed(source: MidiSource) -> EncodedFile:
    """The record of a source whose parsing worker died (md5 of its bytes when they are at hand)."""
    name, data = source if isinstance(source, tuple) else (str(source), source if isinstance(source, bytes) else None)
    md5 = hashlib.md5(data).hexdigest() if data is not None else ""
    return EncodedFile(name=name, md5=md5, error=WorkerCrash(
        f"{name!r} crashed the parsing worker process (e.g. a segfault in the MIDI parser); skipped"))


@dataclass(frozen=True)
class EncodeSummary:
    """Counts of one `encode_files` run (what `midiva encode` prints as JSON).

    Attributes:
        out: the output directory.
        files: sources seen (written + resumed + failed).
        written: `<md5>.safetensors` files written by this run.
        resumed: sources skipped because their output or failure record already existed.
        failed: sources recorded in failures.csv by this run.
        failures_by_type: failed sources per error type name.
        bars: bars encoded by this run.
        seconds: wall time of the encoding loop.
    """

    out: str
    files: int
    written: int
    resumed: int
    failed: int
    failures_by_type: dict[str, int] = field(default_factory=dict)
    bars: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in the CLI's key order (JSON-ready)."""
        return {
            "out": self.out, "files": self.files, "written": self.written, "resumed": self.resumed,
            "failed": self.failed, "failures_by_type": dict(self.failures_by_type), "bars": self.bars,
            "seconds": self.seconds,
        }  # fmt: skip


def _done_md5s(out: Path, ledger: Path) -> set[str]:
    """md5s with an output file in `out` or a row in the failures ledger."""
    done = {p.name.removesuffix(".safetensors") for p in out.glob("*.safetensors")}
    if ledger.exists():
        with open(ledger, newline="", encoding="utf-8") as handle:
            done.update(row["md5"] for row in csv.DictReader(handle) if row.get("md5"))
    return done


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
) -> EncodeSummary:
    """Encode MIDI files into `<out_dir>/<md5>.safetensors`, recording failures in `<out_dir>/failures.csv`.

    Args:
        sources: paths, raw bytes, or (name, bytes) pairs; a path's metadata source_file is the path as given.
        out_dir: output directory (created if needed).
        encoder: a loaded MuseTokEncoder.
        checkpoint_sha256: sha256 of the checkpoint, stored in each file's metadata ('' when unknown).
        backend: stored in each file's metadata.
        resume: skip sources whose md5 already has an output file or a failures.csv row.
        strict: re-raise unexpected (non-midiva) exceptions instead of recording them.
        include_drums: keep drum notes in the bars (`midiva.events.midi_to_bars`'s include_drums).
        batch_size: most bars per forward pass.
        num_workers: processes that parse MIDI into events (0: in this process).
        autocast: None or 'none' (float32), 'bf16' or 'fp16' (CUDA); stored in the metadata.
        progress: show a tqdm bar on stderr (only when stderr is a terminal).

    Returns:
        EncodeSummary with the counts of this run.

    Raises:
        OutputError: the output directory, the ledger or an output file cannot be written.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    ledger = out / LEDGER_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        new_ledger = not ledger.exists()
        ledger_handle = open(ledger, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError as err:
        raise OutputError(f"cannot write to {str(out)!r}: {err.strerror or err}; choose a writable --out") from err
    done: set[str] = _done_md5s(out, ledger) if resume else set()
    writer = csv.writer(ledger_handle)
    if new_ledger:
        writer.writerow(LEDGER_HEADER)
    autocast_name = autocast or "none"
    encoder_config = json.dumps(encoder.config.to_dict())
    paths: dict[str, Path | str] = {}
    counts: Counter[str] = Counter()

    def pending() -> Iterator[MidiSource]:
        for source in sources:
            counts["files"] += 1
            if isinstance(source, tuple):
                name, data = source
            else:
                try:
                    data, name = read_midi_bytes(source)
                except MidivaError:
                    yield source  # recorded as a failure downstream
                    continue
            md5 = hashlib.md5(data).hexdigest()
            if md5 in done:
                counts["resumed"] += 1
                continue
            if isinstance(source, (Path, str)):
                paths[md5] = source
            yield name, data

    total = len(sources) if isinstance(sources, (list, tuple)) else None
    started = time.perf_counter()
    bar = tqdm(total=total, unit="file", file=sys.stderr, disable=not progress or not sys.stderr.isatty())
    failures: Counter[str] = Counter()
    with ledger_handle, bar:
        for item in iter_encoded_files(encoder, pending(), strict=strict, batch_size=batch_size, num_workers=num_workers,
                                       autocast=None if autocast_name == "none" else autocast_name,
                                       events_options={"include_drums": include_drums}):  # fmt: skip
            if item.encoded is None or item.bars is None:
                kind, message = type(item.error).__name__, str(item.error)
                failures[kind] += 1
                writer.writerow([item.md5, "events", kind, message])
                ledger_handle.flush()
                log.warning("skipped %s: %s: %s", item.name, kind, message)
            else:
                encoded = item.encoded
                metadata = {
                    "md5": item.md5, "source_file": str(paths.get(item.md5, item.name)), "n_bars": str(encoded.n_bars),
                    "backend": backend, "checkpoint_sha256": checkpoint_sha256, "midiva_version": __version__,
                    "leading_bars_dropped": str(item.bars.leading_bars_dropped),
                    "time_signature": "{}/{}".format(*item.bars.time_signature), "autocast": autocast_name,
                    "encoder_config": encoder_config,
                }  # fmt: skip
                tensors: dict[str, Any] = {"latents": encoded.latents, "indices": encoded.indices, "pre_quant": encoded.pre_quant}
                save_bar_tensors(out / f"{item.md5}.safetensors", tensors, metadata)
                counts["written"] += 1
                counts["bars"] += encoded.n_bars
            bar.update(1)
            bar.set_postfix(bars_per_s=f"{counts['bars'] / max(time.perf_counter() - started, 1e-9):.0f}")
    return EncodeSummary(
        out=str(out), files=counts["files"], written=counts["written"], resumed=counts["resumed"],
        failed=sum(failures.values()), failures_by_type=dict(failures), bars=counts["bars"],
        seconds=round(time.perf_counter() - started, 3),
    )  # fmt: skip

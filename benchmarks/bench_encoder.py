"""Throughput of the MuseTok encoder: bars/s (encoder only) and files/s (MIDI bytes -> latents, end to end).

Uses the full-size architecture (12 layers, 8 heads, d_model 512, d_ff 2048, latent 128, 16 x 2048 codes)
with random weights unless --checkpoint is given; random weights cost the same time as the real ones.
MIDI files are read into memory before timing. On CUDA, timings synchronise the device.

    python benchmarks/bench_encoder.py                                   # CPU, a small sample
    python benchmarks/bench_encoder.py --device cuda --autocast bf16 --max-files 0 --repeat 4

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from midiva.encode import iter_encoded_files
from midiva.events import midi_to_bars
from midiva.latents import (
    FULL_CONFIG,
    EncodedBars,
    MuseTokEncoder,
    encode_bars,
    load_encoder,
    random_encoder,
    resolve_device,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _collect(paths: list[Path], max_files: int) -> list[tuple[str, bytes]]:
    files: list[Path] = []
    for path in paths:
        files += sorted(path.rglob("*.mid")) if path.is_dir() else [path]
    if max_files:
        files = files[:max_files]
    return [(f.name, f.read_bytes()) for f in files]


def _deviation(test: EncodedBars, ref: EncodedBars) -> dict[str, float]:
    return {
        "max_abs_latents": float(np.abs(test.latents - ref.latents).max(initial=0.0)),
        "max_abs_pre_quant": float(np.abs(test.pre_quant - ref.pre_quant).max(initial=0.0)),
        "bars_all_codes_equal": float((test.indices == ref.indices).all(axis=1).mean()) if ref.n_bars else 1.0,
        "codes_equal": float((test.indices == ref.indices).mean()) if ref.n_bars else 1.0,
        "first_code_equal": float((test.indices[:, 0] == ref.indices[:, 0]).mean()) if ref.n_bars else 1.0,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--batch-size", type=int, default=4096, help="most bars per forward pass")
    parser.add_argument("--batch-tokens", type=int, default=None, help="most padded tokens per forward pass")
    parser.add_argument(
        "--files", type=Path, nargs="*", default=[SHARED / "emopia" / "midis", SHARED / "gigamidi_sample"]
    )
    parser.add_argument("--max-files", type=int, default=24, help="0: every file found")
    parser.add_argument(
        "--repeat", type=int, default=1, help="encode the bar list this many times (steadier GPU timings)"
    )
    parser.add_argument("--num-workers", type=int, default=0, help="MIDI-parsing processes in the end-to-end run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--checkpoint", type=Path, help="a real checkpoint instead of random weights")
    parser.add_argument("--skip-end-to-end", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    autocast = None if args.autocast == "none" else args.autocast
    encoder: MuseTokEncoder = load_encoder(args.checkpoint) if args.checkpoint else random_encoder(FULL_CONFIG, seed=0)
    encoder.to(device)
    sources = _collect(args.files, args.max_files)
    options: dict[str, Any] = {"batch_size": args.batch_size, "batch_tokens": args.batch_tokens, "autocast": autocast}
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": encoder.config.to_dict(),
        "weights": str(args.checkpoint or "random"),
        **{k: v for k, v in options.items()},
    }

    # 1. Events only (CPU, single process): what feeds the encoder.
    t0 = time.perf_counter()
    songs = []
    for name, data in sources:
        try:
            songs.append(midi_to_bars(data, name=name).bar_token_ids())
        except Exception as err:  # a benchmark counts failures and goes on
            print(f"skipped {name}: {type(err).__name__}: {err}", file=sys.stderr)
    t_events = time.perf_counter() - t0
    bars = [bar for song in songs for bar in song]
    report["files"], report["bars"] = len(sources), len(bars)
    report["mean_tokens_per_bar"] = float(np.mean([min(len(b), 128) for b in bars])) if bars else 0.0
    report["events_files_per_s"] = len(sources) / t_events
    report["events_bars_per_s"] = len(bars) / t_events

    # 2. Encoder only: bars already tokenised; warm up kernels first.
    encode_bars(encoder, bars[:64], **options)
    _sync(device)
    work = bars * args.repeat
    t0 = time.perf_counter()
    encoded = encode_bars(encoder, work, **options)
    _sync(device)
    t_encode = time.perf_counter() - t0
    report["encode_bars"] = len(work)
    report["encode_seconds"] = t_encode
    report["encode_bars_per_s"] = len(work) / t_encode
    if device.type == "cuda":
        report["cuda_max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if autocast:
        reference = encode_bars(encoder, bars, **{**options, "autocast": None})
        report["autocast_vs_float32"] = _deviation(encoded.slice(0, len(bars)), reference)

    # 3. End to end: MIDI bytes -> events -> latents, bars of many files per forward pass.
    if not args.skip_end_to_end:
        t0 = time.perf_counter()
        n_files = n_bars = 0
        for item in iter_encoded_files(
            encoder,
            sources,
            num_workers=args.num_workers,
            batch_size=args.batch_size,
            device=str(device),
            autocast=autocast,
        ):
            n_files += 1
            n_bars += item.encoded.n_bars if item.encoded is not None else 0
        _sync(device)
        t_e2e = time.perf_counter() - t0
        report["end_to_end_seconds"] = t_e2e
        report["end_to_end_files_per_s"] = n_files / t_e2e
        report["end_to_end_bars_per_s"] = n_bars / t_e2e
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

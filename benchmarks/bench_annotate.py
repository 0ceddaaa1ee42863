"""Throughput of `midiva annotate`: files/s and bars/s, peak memory, and where the time goes.

Usage:
    python benchmarks/bench_annotate.py [--files 2000] [--workers 1 2] [--batch-size 4096]
    python benchmarks/bench_annotate.py --backend musetok --device cuda --workers 15 --batch-size 8192

The corpus is EMOPIA and/or the GigaMIDI sample (../shared/data), repeated to `--files` rows; each
repeat gets its own md5 key so nothing is skipped as a duplicate (the MIDI bytes are unchanged).
Rows come from memory, as they do from a streamed parquet, so disk reads are not measured.

The features backend uses the bundled default model when present, else a random-weight model of
the same shape. `--backend musetok` uses `--checkpoint` when given, else a random-weight encoder
of the full MuseTok size (the same cost per bar as the real weights) and a random regressor.
Per-stage seconds: read/events/features are summed over workers (CPU time in the pool); encode,
predict and write are in the main process. Peak RSS is the maximum of this process and of any
worker (ru_maxrss), in MiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from midiva import representations
from midiva.annotate import AnnotateOptions, annotate_stream, load_annotation_model
from midiva.prepare import FileResult, PrepareOptions, prepare_file
from midiva.runner import torch_threads_for
from midiva.sources import SourceRow, list_midi_files

REPO = Path(__file__).resolve().parents[1]


def corpus(shared: Path, n_files: int, which: str) -> list[SourceRow]:
    """EMOPIA and/or the GigaMIDI sample, repeated to n_files rows with distinct md5 keys."""
    dirs = {"emopia": ["emopia/midis"], "gigamidi": ["gigamidi_sample"], "both": ["emopia/midis", "gigamidi_sample"]}
    paths = list_midi_files([shared / "data" / d for d in dirs[which]])
    blobs = [(p.name, p.read_bytes()) for p in paths]
    rows = []
    for i in range(n_files):
        name, data = blobs[i % len(blobs)]
        md5 = hashlib.md5(data + i.to_bytes(8, "little")).hexdigest()
        rows.append(SourceRow(md5, f"{i}:{name}", "train", data, {"title": name}))
    return rows


class CachedPrepare:
    """Parses each distinct file once, then replays the result: times the main process alone."""

    def __init__(self) -> None:
        self.cache: dict[bytes, FileResult] = {}

    def __call__(self, row: SourceRow, options: PrepareOptions, strict: bool) -> FileResult:
        key = hashlib.md5(row.music or b"").digest()
        if key not in self.cache:
            self.cache[key] = prepare_file(row, options, strict)
        return dataclasses.replace(self.cache[key], md5=row.md5, name=row.name, seconds={})


def features_model() -> tuple[Any, str]:
    from midiva.model import default_model_path, load_regressor

    if default_model_path().is_file():
        return load_regressor(None), "bundled default model"
    import torch

    from midiva.features import FEATURE_NAMES
    from midiva.model import InputRecipe, Regressor, VARegressor

    torch.manual_seed(0)
    recipe = InputRecipe("features", tuple(FEATURE_NAMES), 0, ("mean", "window4"))
    return Regressor(VARegressor(recipe.input_dim, 128).eval(), recipe), "random-weight features model"


def musetok_model(checkpoint: str | None, device: str) -> tuple[Any, Any, str]:
    import torch

    from midiva.latents import load_encoder, random_encoder
    from midiva.model import InputRecipe, Regressor, VARegressor

    encoder = load_encoder(checkpoint, device=device) if checkpoint else random_encoder().to(device)
    recipe = InputRecipe("musetok", (), encoder.config.d_latent, ())
    torch.manual_seed(0)
    regressor = Regressor(VARegressor(recipe.input_dim, 64).eval(), recipe)
    label = f"MuseTok encoder ({'checkpoint' if checkpoint else 'random weights, full size'}) on {device}"
    return regressor, encoder, label


def peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def bench_scan_ledger(n: int) -> None:
    """Resume cost at corpus scale: scan a synthetic n-file ledger (2% failed)."""
    from midiva.ledger import LEDGER_MAGIC, scan_ledger

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.csv.done"
        with open(path, "wb") as handle:
            handle.write(LEDGER_MAGIC + json.dumps({"fingerprint": {}, "ends": [31, 100, 34]}).encode() + b"\n")
            lines = []
            for i in range(n):
                md5 = hashlib.md5(i.to_bytes(8, "little")).hexdigest()
                lines.append(f"{md5},{'failed' if i % 50 == 0 else 'ok'},40,{31 + 2000 * (i + 1)},{100 + 200 * i},34\n")
                if len(lines) == 100_000:
                    handle.write("".join(lines).encode())
                    lines = []
            handle.write("".join(lines).encode())
        t0 = time.perf_counter()
        state = scan_ledger(path)
        wall = time.perf_counter() - t0
        assert state is not None
        t0 = time.perf_counter()
        hits = sum(
            state.is_done(hashlib.md5(i.to_bytes(8, "little")).hexdigest()) for i in range(0, 2 * n, 2 * n // 100_000)
        )
        lookup_us = (time.perf_counter() - t0) / 100_000 * 1e6
        keys_mib = (state.ok_keys._hi.nbytes + state.ok_keys._lo.nbytes) / 2**20
        print(
            f"scan of {n} ledger entries ({path.stat().st_size / 2**20:.0f} MiB): {wall:.1f} s; {state.n_files} files, "
            f"ok keys {keys_mib:.1f} MiB; membership {lookup_us:.1f} us per md5 (incl. hashing); {hits} hits"
        )


def bench_merge(rows: list[SourceRow], regressor: Any, shards: int) -> None:
    """`midiva merge` speed: annotate `shards` shards (parsing replayed), then merge them."""
    from midiva.merge import merge_outputs

    with tempfile.TemporaryDirectory() as tmp:
        prepare, outs = CachedPrepare(), []
        for i in range(shards):
            out = Path(tmp) / f"shard{i}" / "a.csv"
            options = AnnotateOptions(num_shards=shards, shard_index=i, torch_threads=1, progress=False)
            annotate_stream(rows, out, regressor, options=options, prepare=prepare)
            outs.append(out)
        t0 = time.perf_counter()
        report = merge_outputs(outs, Path(tmp) / "merged" / "a.csv")
        wall = time.perf_counter() - t0
    files = report.files + report.failed
    print(
        f"merge of {shards} shards: {files} files, {report.bars} rows in {wall:.1f} s -> "
        f"{report.bars / wall:,.0f} rows/s, {files / wall:,.0f} files/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument(
        "--corpus",
        choices=["both", "emopia", "gigamidi"],
        default="both",
        help="EMOPIA clips (~22 bars) and/or the GigaMIDI sample (~230 bars per file)",
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--backend", choices=["features", "musetok"], default="features")
    parser.add_argument("--model", help="a trained regressor of any backend (its encoders loaded as annotate does)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", help="real MuseTok model.pt (default: random full-size weights)")
    parser.add_argument("--autocast", choices=["bf16", "fp16"], help="encoder precision on CUDA")
    parser.add_argument("--json", action="store_true", help="print one JSON line per run instead of text")
    parser.add_argument(
        "--main-only",
        action="store_true",
        help="replay parsed files (each parsed once, untimed): the main process's ceiling",
    )
    parser.add_argument("--scan-ledger", type=int, metavar="N", help="only time a resume scan of an N-file ledger")
    parser.add_argument("--merge-shards", type=int, metavar="K", help="only time `merge` of K shards of the corpus")
    args = parser.parse_args()
    if args.scan_ledger:
        bench_scan_ledger(args.scan_ledger)
        return

    rows = corpus(args.shared, args.files, args.corpus)
    if args.merge_shards:
        bench_merge(rows, features_model()[0], args.merge_shards)
        return
    encoders: dict[str, Any] = {}
    if args.model:
        loaded = load_annotation_model(args.model, checkpoint=args.checkpoint, device=args.device)
        regressor, encoders, label, args.backend = loaded.regressor, loaded.encoders, args.model, loaded.backend
    elif args.backend == "features":
        regressor, label = features_model()
    else:
        regressor, encoder, label = musetok_model(args.checkpoint, args.device)
        encoders = {"musetok": encoder}
    print(f"{len(rows)} files ({args.corpus}), backend {args.backend} ({label}), batch {args.batch_size}", flush=True)
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            threads = torch_threads_for(args.backend, workers, 1)  # as `midiva annotate` does
            options = AnnotateOptions(
                batch_size=args.batch_size,
                num_workers=workers,
                progress=False,
                device=args.device,
                torch_threads=threads,
                autocast=args.autocast,
            )
            prepare = None
            if args.main_only:
                prepare = CachedPrepare()
                options = dataclasses.replace(options, num_workers=0)
                needs = representations.needs_of(args.backend)
                parse = PrepareOptions(True, "features" in needs, "tokens" in needs, "pitched_tokens" in needs)
                for row in rows[: len({r.music for r in rows})]:  # warm the cache outside the timing
                    prepare(row, parse, False)
            t0 = time.perf_counter()
            summary = annotate_stream(
                rows, Path(tmp) / "a.csv", regressor, encoders=encoders, options=options, prepare=prepare
            )
            wall = time.perf_counter() - t0
            csv_mib = (Path(tmp) / "a.csv").stat().st_size / 2**20
        record = {
            "workers": workers,
            "files": summary.files_done + summary.files_failed,
            "failed": summary.files_failed,
            "bars": summary.bars,
            "wall_s": round(wall, 2),
            "files_per_s": round(summary.files_per_s, 1),
            "bars_per_s": round(summary.bars_per_s),
            "peak_rss_mib": round(peak_rss_mib()),
            "csv_mib": round(csv_mib, 1),
            "seconds_by_stage": summary.seconds_by_stage,
        }
        if args.json:
            print(json.dumps(record))
            continue
        stages = ", ".join(f"{k} {v:.1f}" for k, v in sorted(summary.seconds_by_stage.items(), key=lambda kv: -kv[1]))
        print(
            f"workers={workers}: {record['files']} files ({record['failed']} failed), {record['bars']} bars in "
            f"{wall:.1f} s -> {record['files_per_s']} files/s, {record['bars_per_s']} bars/s; "
            f"peak RSS {record['peak_rss_mib']} MiB; CSV {csv_mib:.1f} MiB\n  seconds by stage: {stages}"
        )


if __name__ == "__main__":
    main()

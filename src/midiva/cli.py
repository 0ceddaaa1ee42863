"""Command-line interface: parse flags, resolve Settings, call the library, return an exit code.

Exit codes: 0 the run finished (skipped files are recorded, not fatal); 1 a fatal error such
as a missing checkpoint or an unwritable output; 2 usage. Data goes to stdout, logs to stderr.
Heavy imports (torch, datasets) happen inside the subcommands so `midiva --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from midiva import __version__
from midiva.config import BACKENDS, ResolvedSettings, resolve_settings
from midiva.errors import MidivaError

log = logging.getLogger("midiva")

Handler = Callable[[argparse.Namespace], int]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default unless it is None/False or its help already names one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


# ---------------------------------------------------------------- shared helpers


def _number(kind: Callable[[str], Any], expected: str, accept: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse type: `kind(text)` if `accept` says yes, else 'expected <expected>, got ...'."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from err
        if not accept(value):  # written so that NaN is refused too
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


positive_int: Callable[[str], int] = _number(int, "a positive integer", lambda v: v >= 1)
non_negative_int: Callable[[str], int] = _number(int, "an integer >= 0", lambda v: v >= 0)
_unit_float: Callable[[str], float] = _number(float, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
_positive_float: Callable[[str], float] = _number(float, "a positive number", lambda v: v > 0)
_non_negative_float: Callable[[str], float] = _number(float, "a number >= 0", lambda v: v >= 0)


def existing_path(text: str) -> Path:
    """argparse type: a path that exists."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return path


def add_settings_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add flags backed by Settings; their default is None so env/file/default can apply."""
    specs = {
        "device": (("--device",), {"help": "auto, cpu, cuda or cuda:N (env MIDIVA_DEVICE; default auto)"}),
        "checkpoint": (
            ("--checkpoint",),
            {"help": "MuseTok tokenizer checkpoint model.pt (env MIDIVA_CHECKPOINT; default: the storage dir)"},
        ),
        "model": (("--model",), {"help": "regressor .safetensors (env MIDIVA_MODEL; default: the bundled model)"}),
        "backend": (
            ("--backend",),
            {"choices": list(BACKENDS), "help": "bar representation (default features)"},
        ),
        "batch_size": (
            ("--batch-size",),
            {"type": positive_int, "help": "bars per forward pass (env MIDIVA_BATCH_SIZE; default 4096)"},
        ),
        "num_workers": (
            ("--num-workers",),
            {"type": non_negative_int, "help": "MIDI-parsing worker processes (env MIDIVA_NUM_WORKERS; default 0)"},
        ),
        "storage_dir": (
            ("--storage-dir",),
            {"help": "weights directory (env VALENCE_AROUSAL_STORAGE_DIR; default: per-user data dir)"},
        ),
        "hf_token": (("--hf-token",), {"help": "Hugging Face token for gated data (env HF_TOKEN)"}),
    }
    for name in names:
        flags, kwargs = specs[name]
        parser.add_argument(*flags, dest=name, default=None, **kwargs)  # type: ignore[arg-type]


def say(args: argparse.Namespace, message: str, *values: object) -> None:
    """A one-line run summary on stderr for the person at the terminal (silenced by -q)."""
    if not getattr(args, "quiet", False):
        print(message % values if values else message, file=sys.stderr)


def settings_from_args(args: argparse.Namespace) -> ResolvedSettings:
    """Resolve Settings from this invocation's flags, the environment and --config (TOML).

    `midiva encode --config X.json` names the encoder's JSON config instead (the interface
    MuseTok users know), so a .json there is not read as settings.
    """
    config = getattr(args, "config", None)
    if config is not None and args.command == "encode" and Path(config).suffix.lower() == ".json":
        config = None
    return resolve_settings(vars(args), os.environ, config)


def say_batch(args: argparse.Namespace, n_bars: int, n_files: int, failures: Counter[str], verb: str) -> None:
    """The batch's one-line summary on stderr: bars, files, and failures by type (silenced by -q)."""
    by_type = ", ".join(f"{name}: {count}" for name, count in sorted(failures.items()))
    say(args, f"{args.command}: {n_bars} bars from {n_files} files"
        + (f"; {verb} {sum(failures.values())} ({by_type})" if failures else ""))  # fmt: skip


# ---------------------------------------------------------------- events (stage: events)


def _add_events_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "events",
        help="MIDI -> MuseTok REMI events per bar",
        description="MuseTok's REMI events and token ids per bar. With --json, one JSON object per file "
        "on stdout (file, md5, bar_starts, events, token_ids, report, ...); a file that fails gives "
        '{"file", "md5" (null if unreadable), "error": "<Type>: message"} instead. Exit code 0 once '
        "every file was tried, failures included; 1 only under --strict.",
    )
    p.add_argument("files", nargs="+", type=Path, help="MIDI files")
    p.add_argument(
        "--json", action=argparse.BooleanOptionalAction, default=False,
        help="JSON Lines on stdout instead of a per-bar summary",
    )
    p.add_argument(
        "--drums", action=argparse.BooleanOptionalAction, default=True,
        help="keep drum notes as pitched notes, as MuseTok does",
    )
    p.add_argument(
        "--drop-out-of-range", action=argparse.BooleanOptionalAction, default=True,
        help="drop pitches outside 21..108 (--no-drop-out-of-range fails the file, as MuseTok does)",
    )
    p.add_argument(
        "--drop-oov", action=argparse.BooleanOptionalAction, default=True,
        help="replace events outside MuseTok's vocabulary (--no-drop-oov fails the file, as MuseTok does)",
    )
    p.add_argument(
        "--strict", action=argparse.BooleanOptionalAction, default=False,
        help="stop at the first file that fails instead of recording it",
    )
    p.set_defaults(handler=_cmd_events)


def _cmd_events(args: argparse.Namespace) -> int:
    import hashlib

    from midiva.events import MAX_TOKENS_PER_BAR, midi_to_bars
    from midiva.midi import read_midi_bytes

    options = {"include_drums": args.drums, "drop_out_of_range": args.drop_out_of_range, "drop_oov": args.drop_oov}
    failures: Counter[str] = Counter()
    n_files = n_bars = 0
    for path in args.files:
        md5: str | None = None
        try:
            data, _ = read_midi_bytes(path)
            md5 = hashlib.md5(data).hexdigest()
            bars = midi_to_bars(data, name=path.name, **options)
        except Exception as err:  # skip-and-record: one bad file must not stop a batch
            if args.strict:
                raise
            failures[type(err).__name__] += 1
            if not isinstance(err, MidivaError):
                log.debug("traceback of %s", path, exc_info=True)
            if args.json:
                _print_json({"file": str(path), "md5": md5, "error": f"{type(err).__name__}: {err}"})
            else:
                log.warning("%s: %s", type(err).__name__, err)
            continue
        n_files += 1
        n_bars += bars.n_bars
        if args.json:
            _print_json({**bars.to_json(), "file": str(path)})
            continue
        report = {k: v for k, v in bars.report.to_dict().items() if v and k != "n_notes"}
        lines = [
            f"{path}: md5 {bars.md5}, {bars.n_bars} bars of {bars.time_signature[0]}/{bars.time_signature[1]}, "
            f"{bars.report.n_notes} notes, {len(bars.events)} events" + (f"; {report}" if report else "")
        ]
        for b in range(bars.n_bars):
            events = bars.bar_events(b)
            pitches = [int(e.rsplit("_", 1)[1]) for e in events if e.startswith("Note_Pitch_")]
            span = f", pitch {min(pitches)}-{max(pitches)}" if pitches else ""
            cut = f" (encoder keeps {MAX_TOKENS_PER_BAR})" if len(events) > MAX_TOKENS_PER_BAR else ""
            lines.append(f"  bar {b:4d} (MIDI bar {b + bars.leading_bars_dropped}): {len(pitches):3d} notes, "
                         f"{len(events):3d} tokens{cut}{span}")
        sys.stdout.write("\n".join(lines) + "\n")
    say_batch(args, n_bars, n_files, failures, "failed")
    return 0


# ---------------------------------------------------------------- features (stage: features)


def _add_features_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="MIDI -> handcrafted features per bar (CSV on stdout)",
        description="One CSV row per MuseTok bar: file,md5,bar_number,<features>. bar_number is MuseTok's "
        "bar index from 0 (bar 0 holds the first note), as in `midiva annotate`. Unreadable or empty "
        "files are logged and skipped.",
    )
    p.add_argument("files", nargs="+", type=Path, help="MIDI files")
    p.add_argument("--out", type=Path, default=None, help="CSV file to write; stdout when omitted")
    p.add_argument(
        "--drums", action=argparse.BooleanOptionalAction, default=True,
        help="keep drum notes in MuseTok's bars (features count drums in densities either way)",
    )
    p.add_argument(
        "--strict", action=argparse.BooleanOptionalAction, default=False,
        help="stop at the first file that fails instead of skipping it",
    )
    p.set_defaults(handler=_cmd_features)


def _cmd_features(args: argparse.Namespace) -> int:
    import csv

    from tqdm import tqdm

    from midiva.errors import OutputError
    from midiva.features import FEATURE_NAMES, midi_to_features

    failures: Counter[str] = Counter()
    n_files = n_bars = 0
    try:
        stream = sys.stdout if args.out is None else args.out.open("w", newline="", encoding="utf-8")
    except OSError as err:
        raise OutputError(f"cannot write {str(args.out)!r}: {err.strerror or err}; choose a writable --out") from err
    try:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["file", "md5", "bar_number", *FEATURE_NAMES])
        no_progress = bool(args.quiet) or not sys.stderr.isatty()
        progress = tqdm(args.files, unit="file", file=sys.stderr, disable=no_progress)
        for path in progress:
            try:
                bars, feats = midi_to_features(path, include_drums=args.drums)
            except Exception as err:  # skip-and-record: one bad file must not stop a batch
                if args.strict:
                    raise
                failures[type(err).__name__] += 1
                if isinstance(err, MidivaError):
                    log.warning("%s: %s", type(err).__name__, err)
                else:
                    log.warning("unexpected %s on %s: %s", type(err).__name__, path, err)
                    log.debug("traceback", exc_info=True)
                continue
            for b, row in enumerate(feats.values):
                writer.writerow([str(path), bars.md5, b, *(f"{v:.6g}" for v in row.tolist())])
            n_files += 1
            n_bars += feats.n_bars
            progress.set_postfix(bars=n_bars)
        stream.flush()
    except OSError as err:
        raise OutputError(f"writing features to {str(args.out or 'stdout')!r} failed: {err}") from err
    finally:
        if stream is not sys.stdout:
            stream.close()
    say_batch(args, n_bars, n_files, failures, "skipped")
    return 0


# ---------------------------------------------------------------- MuseTok latents (stage: latents)


def _add_encode_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="MIDI -> MuseTok per-bar latents (.safetensors per file)",
        description="Write OUT/<md5>.safetensors per MIDI file: latents (n_bars, 128) float32, indices "
        "(n_bars, 16) int64 and pre_quant (n_bars, 128) float32, with string metadata (md5, source_file, "
        "n_bars, backend, checkpoint_sha256, midiva_version, ...). Bars of many files share each forward "
        "pass. Files that fail are recorded in OUT/failures.csv; reruns skip files already done.",
    )
    p.add_argument("files", nargs="+", type=Path, help="MIDI files")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--backend", choices=["musetok"], default="musetok", help="bar representation to encode")
    add_settings_flags(p, "checkpoint", "device", "batch_size", "num_workers", "storage_dir")
    p.add_argument("--encoder-config", type=existing_path,
                   help="JSON with the checkpoint's enc_n_head (default: config.json beside it, else 8 heads); "
                   "`--config FILE.json` is accepted as a synonym")  # fmt: skip
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none",
                   help="reduced-precision transformer on CUDA (quantisation stays float32)")  # fmt: skip
    p.add_argument("--drums", action=argparse.BooleanOptionalAction, default=True, help="keep drum notes in the bars")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip files whose output or failure record already exists")  # fmt: skip
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                   help="stop at the first unexpected error instead of recording it")  # fmt: skip
    p.set_defaults(handler=_cmd_encode)


def _cmd_encode(args: argparse.Namespace) -> int:
    from midiva.config import sha256_file, write_run_json
    from midiva.encode import encode_files
    from midiva.errors import OutputError
    from midiva.latents import load_encoder

    resolved = settings_from_args(args)
    s = resolved.settings
    checkpoint = _musetok_checkpoint(s)
    encoder_config = args.encoder_config
    if encoder_config is None and args.config is not None and Path(args.config).suffix.lower() == ".json":
        encoder_config = args.config
    encoder = load_encoder(checkpoint, config=encoder_config, device=s.device, storage_dir=s.storage_dir)
    checkpoint_sha256 = sha256_file(checkpoint)
    out: Path = args.out
    try:
        write_run_json(out, resolved, command="encode", checkpoint=checkpoint,
                       extra={"files": len(args.files), "autocast": args.autocast, "encoder": encoder.config.to_dict()})  # fmt: skip
    except OSError as err:
        raise OutputError(f"cannot write to {str(out)!r}: {err.strerror or err}; choose a writable --out") from err
    summary = encode_files(
        args.files, out, encoder, checkpoint_sha256=checkpoint_sha256, backend=args.backend, resume=args.resume,
        strict=args.strict, include_drums=args.drums, batch_size=s.batch_size, num_workers=s.num_workers,
        autocast=args.autocast, progress=not args.quiet,
    )  # fmt: skip
    sys.stdout.write(json.dumps(summary.to_dict()) + "\n")
    return 0


def _add_download_musetok_parser(sub: argparse._SubParsersAction) -> None:
    from midiva.config import STORAGE_ENV

    p = sub.add_parser(
        "download-musetok",
        help="fetch the official MuseTok tokenizer checkpoint",
        description="Download MuseTok's tokenizer zip from Google Drive (gdown), unpack best_tokenizer/model.pt "
        f"into <storage>/musetok/ and verify it loads. Storage: --storage-dir, else ${STORAGE_ENV}, else the "
        "per-user data directory. Prints the checkpoint path on stdout.",
    )
    add_settings_flags(p, "storage_dir")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=False,
                   help="download again even if a loadable checkpoint is present")  # fmt: skip
    p.set_defaults(handler=_cmd_download_musetok)


def _cmd_download_musetok(args: argparse.Namespace) -> int:
    from midiva.latents import download_musetok

    settings = settings_from_args(args).settings
    path = download_musetok(settings.storage_dir, force=args.force, quiet=args.quiet)
    sys.stdout.write(f"{path}\n")
    return 0


# ---------------------------------------------------------------- training (stage: train)


def _add_train_parsers(sub: argparse._SubParsersAction) -> None:
    splits = ("train", "val", "test")
    p = sub.add_parser("preprocess-emopia", help="EMOPIA clips -> per-clip bar representations")
    p.add_argument("--emopia-dir", type=existing_path, required=True, help="EMOPIA directory: midis/, optional split/ and label.csv")
    p.add_argument("--out", type=Path, required=True, help="output directory (clips/*.safetensors, clips.csv, failures.csv)")
    add_settings_flags(p, "backend", "checkpoint", "device", "batch_size", "num_workers", "storage_dir")
    p.add_argument("--split", nargs="+", choices=splits, default=list(splits), help="splits to process")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True, help="skip clips already written")
    p.add_argument("--strict", action="store_true", help="stop at the first failing clip")
    p.set_defaults(handler=_cmd_preprocess_emopia)

    p = sub.add_parser("prepare-labels", help="EMOPIA quadrants -> valence/arousal label files")
    p.add_argument("--data", type=existing_path, required=True, help="output directory of preprocess-emopia")
    p.add_argument("--mapping", type=existing_path, help="YAML/TOML file: Q1..Q4 -> [valence, arousal] (default: built-in)")
    p.add_argument("--out", type=Path, help="where to write labels_clip.json/labels_bar.json (default: --data)")
    p.set_defaults(handler=_cmd_prepare_labels)

    p = sub.add_parser("train", help="train the valence/arousal MLP")
    p.add_argument("--data", type=existing_path, required=True, help="output directory of preprocess-emopia")
    p.add_argument("--out", type=Path, required=True, help="model file to write (.safetensors)")
    p.add_argument("--labels", type=existing_path, help="label file (default: DATA/labels_bar.json)")
    add_settings_flags(p, "backend", "device")
    p.add_argument("--features", default="", help="comma-separated feature names or globs, e.g. 'velocity_*,mode*' (empty: all)")
    p.add_argument("--exclude-features", default="*_song,tempo_bpm*,note_count*,*_per_beat*,duration_beats*",
                   help="comma-separated names or globs to leave out (empty: none); by default whole-piece columns "
                   "and those that depend on the tempo, which EMOPIA's transcriptions fix at 120 bpm")
    p.add_argument("--context", default="window16",
                   help="comma-separated context blocks appended per bar: mean, std, window<k> (mean of bars b-k..b+k)")
    p.add_argument("--hidden-dim", type=positive_int, help="hidden units (default: input_dim // 2)")
    p.add_argument("--activation", choices=["relu", "gelu"], default="relu", help="hidden activation")
    p.add_argument("--dropout", type=_unit_float, default=0.2, help="dropout after the hidden layer")
    p.add_argument("--tanh", action=argparse.BooleanOptionalAction, default=True, help="squash outputs with tanh")
    p.add_argument("--loss", choices=["mse", "smooth_l1", "mse+l1"], default="smooth_l1", help="training loss")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=_non_negative_float, default=1e-2, help="AdamW weight decay")
    p.add_argument("--max-epochs", type=positive_int, default=200, help="epoch limit")
    p.add_argument("--patience", type=positive_int, default=30, help="epochs without validation improvement before stopping")
    p.add_argument("--batch-clips", type=positive_int, default=32, help="clips per optimisation step")
    p.add_argument("--clip-weighting", action=argparse.BooleanOptionalAction, default=True,
                   help="weight each clip equally in the loss (--no-clip-weighting: each bar)")
    p.add_argument("--monitor", default="loss", help="early-stopping criterion on val: 'loss' or a metric key such as clip.quadrant_accuracy")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    p.add_argument("--log-dir", type=Path, help="training log directory (default: OUT without suffix + '_log')")
    p.add_argument("--report-test", action=argparse.BooleanOptionalAction, default=False,
                   help="after training, also record test-split metrics in the model (never used for selection)")
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False, help="log to Weights & Biases")
    p.add_argument("--wandb-project", default="midiva", help="W&B project name")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a model on EMOPIA's test split")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=existing_path, help="output directory of preprocess-emopia (+ prepare-labels)")
    source.add_argument("--emopia-dir", type=existing_path, help="EMOPIA directory; representations are computed on the fly")
    p.add_argument("--labels", type=existing_path, help="label file for --data (default: DATA/labels_bar.json)")
    p.add_argument("--split", choices=splits, default="test", help="split to evaluate")
    p.add_argument("--out", type=Path, help="write metrics.json, predictions.csv and plots here")
    add_settings_flags(p, "model", "checkpoint", "device", "batch_size", "num_workers", "storage_dir")
    p.set_defaults(handler=_cmd_evaluate)


def _musetok_checkpoint(settings: Any) -> Path:
    """The MuseTok checkpoint named by the settings, or the default one in the storage dir."""
    from midiva.latents import default_checkpoint_path

    return Path(settings.checkpoint) if settings.checkpoint else default_checkpoint_path(settings.storage_dir)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, allow_nan=False) + "\n")
    sys.stdout.flush()


def _cmd_preprocess_emopia(args: argparse.Namespace) -> int:
    from midiva.config import write_run_json
    from midiva.emopia import preprocess_emopia

    resolved = settings_from_args(args)
    s = resolved.settings
    checkpoint = _musetok_checkpoint(s) if s.backend != "features" else None
    summary = preprocess_emopia(
        args.emopia_dir, args.out, backend=s.backend, checkpoint=checkpoint, device=s.device,
        batch_size=s.batch_size, num_workers=s.num_workers, resume=args.resume, splits=args.split,
        progress=not args.quiet, strict=args.strict,
    )
    write_run_json(args.out, resolved, command="preprocess-emopia", checkpoint=checkpoint,
                   extra={"emopia_dir": str(args.emopia_dir), "seconds": round(summary.seconds, 2)})
    say(args, "preprocess-emopia: %d clips (%d written, %d resumed), %d failed %s in %.1f s -> %s",
                summary.n_clips, summary.n_written, summary.n_resumed, summary.n_failed,
                summary.failures_by_type or "", summary.seconds, args.out)
    return 0


def _cmd_prepare_labels(args: argparse.Namespace) -> int:
    from midiva.model import DEFAULT_LABEL_MAPPING, prepare_labels, read_label_mapping

    mapping = read_label_mapping(args.mapping) if args.mapping else DEFAULT_LABEL_MAPPING
    files = prepare_labels(args.data, mapping, args.out)
    say(args, "prepare-labels: %d clips -> %s, %s", files.n_clips, files.clip_path, files.bar_path)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from midiva.config import write_run_json
    from midiva.train import TrainConfig, train_from_dir

    def names(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.split(",") if x.strip())

    resolved = settings_from_args(args)
    s = resolved.settings
    # Tuning flags carry TrainConfig's field names (one name per thing); --device is a Setting.
    tuning = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "device" and hasattr(args, f.name)}
    config = TrainConfig(**tuning, device=s.device)
    outcome = train_from_dir(
        args.data, args.out, backend=s.backend if resolved.sources["backend"] != "default" else None,
        features=names(args.features), exclude_features=names(args.exclude_features), context=names(args.context),
        config=config, labels_path=args.labels, report_test=args.report_test, log_dir=args.log_dir,
        wandb_project=args.wandb_project if args.wandb else None,
    )  # fmt: skip
    write_run_json(outcome.log_dir, resolved, command="train", extra={"model": str(args.out), "args": {
        k: str(v) for k, v in vars(args).items() if k != "handler"}})
    result = outcome.result
    say(args, "train: best epoch %d of %d; val clip quadrant accuracy %.3f -> %s", result.best_epoch,
                len(result.history), result.val_metrics.clip.quadrant_accuracy, args.out)
    _print_json(outcome.metrics)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from midiva.config import write_run_json
    from midiva.model import metrics_json
    from midiva.train import evaluate_model

    resolved = settings_from_args(args)
    s = resolved.settings
    outcome = evaluate_model(
        s.model, data_dir=args.data, labels_path=args.labels, emopia_dir=args.emopia_dir, split=args.split,
        out_dir=args.out, checkpoint=_musetok_checkpoint(s), device=s.device, batch_size=s.batch_size,
        num_workers=s.num_workers, progress=not args.quiet,
    )  # fmt: skip
    if args.out is not None:
        write_run_json(args.out, resolved, command="evaluate", extra={"model": outcome.regressor.source, "split": args.split})
    _print_json(metrics_json(outcome.metrics))
    return 0


# ---------------------------------------------------------------- annotation (stage: annotate)


def _add_annotate_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "annotate",
        help="valence/arousal for every bar of a corpus -> resumable CSV",
        description="Annotate MIDI files/directories, local GigaMIDI parquet, or the GigaMIDI hub data set. "
        "Reruns resume; shards (--num-shards/--shard-index, split by md5) combine with `midiva merge`. "
        "Without --num-workers (or MIDIVA_NUM_WORKERS), fewer than 64 files parse in-process and larger "
        "inputs use min(4, CPUs - 1) worker processes.",
    )
    p.add_argument("inputs", nargs="*", type=Path, help="MIDI files or directories (or use --dataset)")
    p.add_argument("--dataset", help="hub data set name (Metacreation/GigaMIDI) or a parquet file/directory")
    p.add_argument("--dataset-config", default="v1.0.0", help="hub config: v1.0.0, or the extended release (v2.0.0)")
    p.add_argument("--split", action="append", help="split to read (repeatable); 'all', or none given: every split")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True, help="stream data set rows")
    p.add_argument("--out", type=Path, default=Path("annotations.csv"), help="annotations CSV (tables are written beside it)")
    add_settings_flags(p, "model", "backend", "checkpoint", "device", "batch_size", "num_workers", "storage_dir", "hf_token")
    p.add_argument("--num-shards", type=positive_int, default=1, help="split the input by md5 into this many shards")
    p.add_argument("--shard-index", type=non_negative_int, default=0, help="the shard this run annotates")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip files already in --out (--no-resume: discard those outputs and start over)")  # fmt: skip
    p.add_argument("--retry-failures", action="store_true", help="on resume, try files recorded as failed again")
    p.add_argument("--parquet", action=argparse.BooleanOptionalAction, default=False, help="also write Parquet tables")
    p.add_argument("--limit", type=positive_int, help="annotate at most this many new files")
    p.add_argument("--strict", action="store_true", help="stop at the first failing file, with its traceback")
    p.add_argument("--drums", action=argparse.BooleanOptionalAction, default=True, help="keep drum notes in the bars")
    p.add_argument("--autocast", choices=["bf16", "fp16"], help="MuseTok encoder in reduced precision on CUDA (faster)")
    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}") from err
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
        return value

    p.add_argument("--commit-interval", type=seconds, default=1.0,
                   help="seconds between fsynced commits (a kill loses at most this much work)")  # fmt: skip
    p.set_defaults(handler=_cmd_annotate, parser=p)
    p = sub.add_parser("merge", help="combine shard outputs; check completeness and uniqueness")
    p.add_argument("shards", nargs="+", type=Path, help="annotations CSVs of the shards (ledgers beside them)")
    p.add_argument("--out", type=Path, required=True, help="merged annotations CSV")
    p.add_argument("--allow-incomplete", action="store_true", help="merge shards whose run did not finish")
    p.add_argument("--parquet", action=argparse.BooleanOptionalAction, default=False, help="also write Parquet tables")
    p.set_defaults(handler=_cmd_merge, parser=p)


def _cmd_annotate(args: argparse.Namespace) -> int:
    from midiva.annotate import AnnotateOptions, annotate_stream, load_annotation_model
    from midiva.config import write_run_json
    from midiva.errors import OutputError
    from midiva.sources import iter_files, list_midi_files, open_dataset

    def _usage_error(args: argparse.Namespace, message: str) -> int:
        args.parser.print_usage(sys.stderr)
        sys.stderr.write(f"{args.parser.prog}: error: {message}\n")
        return 2

    if bool(args.inputs) == bool(args.dataset):
        return _usage_error(args, "give MIDI files/directories or --dataset NAME|PATH (exactly one of them)")
    if args.shard_index >= args.num_shards:
        return _usage_error(args, f"--shard-index {args.shard_index} must be below --num-shards {args.num_shards}")
    splits = None if not args.split or "all" in args.split else list(dict.fromkeys(args.split))
    resolved = settings_from_args(args)
    settings = resolved.settings
    n_files: int | None = None
    if args.inputs:
        paths = list_midi_files(args.inputs)
        n_files = len(paths)
        rows = iter_files(paths)
    else:
        rows = open_dataset(args.dataset, config=args.dataset_config, splits=splits, streaming=args.streaming,
                            token=settings.hf_token)  # fmt: skip
    backend = settings.backend if resolved.sources["backend"] != "default" else None
    model = load_annotation_model(
        settings.model, backend=backend, checkpoint=settings.checkpoint, device=settings.device,
        storage_dir=settings.storage_dir,
    )  # fmt: skip
    num_workers = settings.num_workers
    if resolved.sources["num_workers"] == "default":  # small inputs parse faster than a pool starts
        num_workers = 0 if n_files is not None and n_files < 64 else min(4, max(0, (os.cpu_count() or 1) - 1))
    options = AnnotateOptions(
        batch_size=settings.batch_size, num_workers=num_workers, num_shards=args.num_shards,
        shard_index=args.shard_index, resume=args.resume, retry_failures=args.retry_failures, strict=args.strict,
        include_drums=args.drums, limit=args.limit, parquet=args.parquet, commit_interval_s=args.commit_interval,
        progress=not args.quiet, device=model.device,
        torch_threads=1 if model.backend == "features" or num_workers > 0 else None, autocast=args.autocast,
    )  # fmt: skip
    extra = {"inputs": [str(p) for p in args.inputs], "dataset": args.dataset, "dataset_config": args.dataset_config,
             "splits": splits, "options": vars(options), "fingerprint": model.fingerprint}  # fmt: skip
    try:
        write_run_json(args.out.parent, resolved, command="annotate", extra=extra, checkpoint=settings.checkpoint)
    except OSError as err:
        raise OutputError(f"cannot write run.json beside {str(args.out)!r}: {err.strerror or err}; choose a writable --out") from err
    summary = annotate_stream(rows, args.out, model.regressor, encoder=model.encoder, options=options,
                              fingerprint=model.fingerprint)  # fmt: skip
    sys.stdout.write(json.dumps(summary.to_json()) + "\n")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from midiva.annotate import merge_outputs
    from midiva.sources import export_parquet, output_paths

    report = merge_outputs(args.shards, args.out, allow_incomplete=args.allow_incomplete)
    if args.parquet:
        export_parquet(output_paths(args.out))
    sys.stdout.write(json.dumps(dataclasses.asdict(report)) + "\n")
    return 0


# ---------------------------------------------------------------- analysis (stage: analysis)


def _add_analysis_parsers(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser, out_help: str) -> None:
        p.add_argument("annotations", type=existing_path, help="annotations CSV (md5,bar_number,valence,arousal)")
        meta = p.add_mutually_exclusive_group()
        meta.add_argument("--meta", type=existing_path, default=None, metavar="PATH", help="metadata table; None: X.meta.csv beside X.csv if present")
        meta.add_argument("--no-meta", action="store_true", help="ignore any metadata table (no genre or metadata analyses)")
        p.add_argument("--failures", type=existing_path, default=None, metavar="PATH", help="failures ledger; None: X.failures.csv beside X.csv if present")
        p.add_argument("--out", type=Path, required=True, metavar="DIR", help=out_help)
        p.add_argument("--n-boot", type=positive_int, default=1000, metavar="N", help="bootstrap resamples per confidence interval")
        p.add_argument("--seed", type=non_negative_int, default=0, metavar="N", help="seed of the bootstrap and of the example songs")
        p.add_argument("--min-songs-per-genre", type=positive_int, default=20, metavar="N", help="smaller genres are listed but not ranked")
        p.add_argument("--min-bars-dynamics", type=positive_int, default=8, metavar="N", help="shorter songs get no within-song dynamics")
        p.add_argument("--examples", type=non_negative_int, default=4, metavar="N", help="example songs whose VA curves are kept and plotted")
        p.add_argument("--max-rows-in-memory", type=positive_int, default=50_000_000, metavar="N", help="rows per pass; larger CSVs take several passes")

    p = sub.add_parser("stats", help="statistics of an annotations CSV, by genre (CSV/JSON tables; summary JSON on stdout)")
    common(p, "directory for the tables and summary.json")
    p.set_defaults(handler=_cmd_stats)
    p = sub.add_parser("plot", help="plots of an annotations CSV (PNG and/or SVG)")
    common(p, "directory for the figures")
    p.add_argument("--format", choices=["png", "svg", "both"], default="png", help="figure file format")
    p.set_defaults(handler=_cmd_plot)
    p = sub.add_parser("report", help="one self-contained HTML report (OUT/report.html)")
    common(p, "directory for report.html")
    p.set_defaults(handler=_cmd_report)


def _analysis_stats(args: argparse.Namespace) -> Any:
    """compute_stats for an analysis subcommand, finding the sidecar tables beside the CSV."""
    from midiva.analysis import compute_stats, sidecar_paths

    default_meta, default_failures = sidecar_paths(args.annotations)
    meta = None if args.no_meta else args.meta or (default_meta if default_meta.is_file() else None)
    failures = args.failures or (default_failures if default_failures.is_file() else None)
    if meta is None and not args.no_meta:
        log.warning("no metadata table (%s not found; pass --meta PATH): genre and metadata analyses are skipped", default_meta)
    return compute_stats(
        args.annotations, meta, failures, n_boot=args.n_boot, seed=args.seed, min_songs_per_genre=args.min_songs_per_genre,
        min_bars_dynamics=args.min_bars_dynamics, n_examples=args.examples, max_rows_in_memory=args.max_rows_in_memory,
        progress=not args.quiet,
    )


def _cmd_stats(args: argparse.Namespace) -> int:
    from midiva.config import write_run_json
    from midiva.report import full_summary, write_tables

    stats = _analysis_stats(args)
    files = write_tables(stats, args.out)
    write_run_json(args.out, settings_from_args(args), command="stats", extra={"files": [p.name for p in files]})
    sys.stdout.write(json.dumps(full_summary(stats), indent=2, ensure_ascii=False) + "\n")
    log.info("wrote %d tables to %s", len(files), args.out)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from midiva.config import write_run_json
    from midiva.report import write_plots

    formats = ("png", "svg") if args.format == "both" else (args.format,)
    files = write_plots(_analysis_stats(args), args.out, formats)
    write_run_json(args.out, settings_from_args(args), command="plot", extra={"files": [p.name for p in files]})
    sys.stdout.write("".join(f"{p}\n" for p in files))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from midiva.config import write_run_json
    from midiva.report import write_report

    target = write_report(_analysis_stats(args), args.out)
    write_run_json(args.out, settings_from_args(args), command="report", extra={"files": [target.name]})
    sys.stdout.write(f"{target}\n")
    return 0


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all subcommands)."""
    def global_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
        # Subcommands repeat the global flags with SUPPRESS defaults so `midiva -v events`
        # and `midiva events -v` both work without the subparser resetting the value.
        d = argparse.SUPPRESS
        parser.add_argument("-v", "--verbose", action="count", default=d if suppress else 0, help="more log output (-vv: debug)")
        parser.add_argument("-q", "--quiet", action="store_true", default=d if suppress else False, help="only errors; no progress bars")
        parser.add_argument("--config", type=existing_path, default=d if suppress else None, help="TOML settings file (flags override it)")

    common = argparse.ArgumentParser(add_help=False)
    global_flags(common, suppress=True)
    parser = argparse.ArgumentParser(
        prog="midiva",
        description="Bar-level valence and arousal for symbolic music.",
        formatter_class=HelpFormatter,
    )
    global_flags(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"midiva {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    original_add = sub.add_parser

    def add_parser(name: str, **kwargs: object) -> argparse.ArgumentParser:
        kwargs.setdefault("parents", [common])
        kwargs.setdefault("formatter_class", HelpFormatter)
        return original_add(name, **kwargs)  # type: ignore[arg-type]

    sub.add_parser = add_parser  # type: ignore[method-assign]
    for register in (
        _add_events_parser,
        _add_features_parser,
        _add_encode_parser,
        _add_download_musetok_parser,
        _add_train_parsers,
        _add_annotate_parsers,
        _add_analysis_parsers,
    ):
        register(sub)
    return parser


def configure_logging(verbose: int, quiet: bool) -> None:
    """Send midiva's logs to stderr at the level chosen by -v/-q."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("midiva")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting (testable without a subprocess)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)
    configure_logging(args.verbose, args.quiet)
    handler: Handler = args.handler
    try:
        return handler(args)
    except MidivaError as err:
        log.error("%s: %s", type(err).__name__, err)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; outputs written so far are complete and a rerun resumes")
        return 130
    except OSError as err:  # a filesystem failure no stage mapped: still one line, never a traceback
        log.debug("traceback", exc_info=True)
        where = f" ({err.filename!r})" if getattr(err, "filename", None) else ""
        log.error("OSError: %s%s; check the paths and free space, rerun with -vv for details", err.strerror or err, where)
        return 1
    except Exception as err:  # a bug of ours: say so plainly, keep the traceback for -vv
        log.debug("traceback", exc_info=True)
        log.error("unexpected %s: %s; this is a midiva bug, please report it with the output of -vv",
                  type(err).__name__, err)
        return 1

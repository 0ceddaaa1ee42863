"""Command-line interface: parse flags, resolve Settings, call the library, return an exit code.

One contract for every subcommand:
  inputs   MIDI files, directories (recursive), glob patterns (quoted: `'data/**/*.mid'`), and `-`
           for a list of paths on stdin, one per line (`midi_inputs`). An input that does not
           exist, or a directory or pattern without MIDI files, stops the run before any output.
  exit     0 the run finished (files that failed are skipped and recorded); 1 nothing usable was
           given (every input file failed, or none was found) or a fatal error (missing
           checkpoint, unwritable output); 2 usage (bad flags, `--out` of the wrong kind);
           141 stdout was closed early (`midiva features x.mid | head`), quietly.
  outputs  parent directories are created; `--out -` is stdout where the output is one stream
           (features, predict, report), and is refused as a usage error elsewhere.
  streams  stdout carries the command's data only (events, the features CSV, the predict table,
           the report with `--out -`); JSON results go to stdout only with `--json` (the explicit
           flag, as gh, pip and ruff do, never guessed from whether stdout is a terminal); a human
           summary of every run goes to stderr (silenced by -q), progress bars too.
Heavy imports (torch, datasets) happen inside the subcommands so `midiva --help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from midiva import __version__, representations
from midiva.config import ResolvedSettings, Settings, resolve_settings
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


def backend_name(text: str) -> str:
    """argparse type: a backend `midiva.representations.recipe` knows."""
    if not representations.is_backend(text):
        raise argparse.ArgumentTypeError(
            f"unknown backend {text!r}; choose from {', '.join(representations.backend_names())} "
            "or join representations with '+'"
        )
    return text


non_negative_int: Callable[[str], int] = _number(int, "an integer >= 0", lambda v: v >= 0)
_unit_float: Callable[[str], float] = _number(float, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
_scale_float: Callable[[str], float] = _number(float, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0)
_positive_float: Callable[[str], float] = _number(float, "a positive number", lambda v: v > 0)
_non_negative_float: Callable[[str], float] = _number(float, "a number >= 0", lambda v: v >= 0)


def existing_path(text: str) -> Path:
    """argparse type: a path that exists."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return path


STDOUT = "-"


def output_path(kind: str, *, stdout: bool = False, example: str = "out/x.csv") -> Callable[[str], Any]:
    """argparse type of an `--out`: a 'file' or a 'dir' path of the right kind, or `-` when `stdout` is allowed.

    Refused as usage errors: `-` where the command writes several files, and an existing directory
    where a file is written. (A file where a directory is meant is an unwritable output: exit 1.)
    """

    def parse(text: str) -> Path | str:
        if text == STDOUT:
            if stdout:
                return STDOUT
            raise argparse.ArgumentTypeError(
                f"'-' (stdout) is not supported here: this command writes its outputs to files; give a path such as {example!r}"
            )
        path = Path(text)
        if kind == "file" and path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{text!r} is a directory; give a file path such as {str(path / Path(example).name)!r}"
            )
        return path

    return parse


def midi_inputs(items: Sequence[Path | str]) -> list[Path]:
    """The MIDI files named by files, directories (recursive), glob patterns and `-` (paths on stdin).

    Raises:
        SourceError: an input does not exist, a directory or pattern holds no MIDI files, or stdin lists no path.
    """
    from midiva.errors import SourceError
    from midiva.sources import list_midi_files

    expanded: list[Path | str] = []
    for item in items:
        if str(item) != STDOUT:
            expanded.append(item)
            continue
        listed = [line.rstrip("\r\n") for line in sys.stdin]
        listed = [line for line in listed if line.strip()]
        if not listed:
            raise SourceError("'-' reads MIDI paths from stdin, one per line, but stdin listed none")
        expanded.extend(listed)
    return list_midi_files(expanded)


def finished(args: argparse.Namespace, *, usable: int, failed: int, ledger: object = None) -> int:
    """The exit code of a finished batch: 0 when some file was usable (now or in an earlier run), else 1."""
    if usable == 0 and failed > 0:
        where = f"; see {ledger}" if ledger else ""
        log.error("nothing usable: all %d input file(s) failed%s", failed, where)
        return 1
    return 0


def say_summary(
    args: argparse.Namespace,
    *,
    done: int,
    failed: int,
    skipped: int = 0,
    bars: int | None = None,
    seconds: float | None = None,
    outputs: Sequence[object] = (),
    failures: Mapping[str, int] | None = None,
    noun: str = "files",
) -> None:
    """The run's human summary on stderr: counts, bars, rate, where the outputs are, top failure reasons."""
    line = f"{args.command}: {done:,} {noun[:-1] if done == 1 else noun} done, {failed:,} failed"
    if skipped:
        line += f", {skipped:,} skipped (done before, or other shards)"
    if bars is not None:
        line += f"; {bars:,} bars"
    if seconds:
        rate = f"{(done + failed) / seconds:,.1f} {noun}/s" + (f", {bars / seconds:,.0f} bars/s" if bars else "")
        line += f" in {seconds:,.1f} s ({rate})"
    lines = [line]
    if outputs:
        lines.append("  outputs: " + ", ".join(str(o) for o in outputs))
    if failures:
        top = sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        lines.append(
            "  top failure reasons: "
            + ", ".join(f"{name} ({count:,})" for name, count in top)
            + (f", and {len(failures) - 3} other kinds" if len(failures) > 3 else "")
        )
    say(args, "\n".join(lines))


def print_json(args: argparse.Namespace, data: Any) -> None:
    """A run's JSON result on stdout, only under --json (the one JSON rule of every subcommand)."""
    if getattr(args, "json", False):
        _print_json(data)


# What `annotate` does when --num-workers is not set anywhere (flag, env, file): `runner.default_num_workers`.
AUTO_NUM_WORKERS_HELP = "0 below 64 files, else min(4, CPUs - 1)"


def add_settings_flags(parser: argparse.ArgumentParser, *names: str, defaults: Mapping[str, str] | None = None) -> None:
    """Add flags backed by Settings; their default is None so env/file/default can apply.

    Args:
        defaults: what the help says a setting defaults to, where the command decides when it is
            unset (e.g. annotate's backend: the model's); others show `Settings`' default.
    """
    shown = {f.name: str(f.default) for f in dataclasses.fields(Settings)} | dict(defaults or {})
    specs: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
        "device": (("--device",), {"help": "auto, cpu, cuda or cuda:N (env MIDIVA_DEVICE; default: {device})"}),
        "checkpoint": (
            ("--checkpoint",),
            {"help": "MuseTok tokenizer checkpoint model.pt (env MIDIVA_CHECKPOINT; default: the storage dir)"},
        ),
        "model": (("--model",), {"help": "regressor .safetensors (env MIDIVA_MODEL; default: the bundled model)"}),
        "backend": (
            ("--backend",),
            {
                "type": backend_name,
                "metavar": "BACKEND",
                "help": f"bar representation: {', '.join(representations.backend_names())}, or names joined by '+' "
                "(default: {backend})",
            },
        ),
        "batch_size": (
            ("--batch-size",),
            {
                "type": positive_int,
                "help": "bars per encoder pass, musetok/barseq backends (env MIDIVA_BATCH_SIZE; default: {batch_size})",
            },
        ),
        "num_workers": (
            ("--num-workers",),
            {
                "type": non_negative_int,
                "help": "worker processes that parse (and, for the features backend, predict and format) files "
                "(env MIDIVA_NUM_WORKERS; default: {num_workers})",
            },
        ),
        "cpu_threads": (
            ("--cpu-threads",),
            {
                "type": non_negative_int,
                "help": "BLAS/torch threads per process; 0: one per core "
                "(env MIDIVA_CPU_THREADS; default: {cpu_threads})",
            },
        ),
        "storage_dir": (
            ("--storage-dir",),
            {"help": "weights directory (env VALENCE_AROUSAL_STORAGE_DIR; default: per-user data dir)"},
        ),
        "hf_token": (("--hf-token",), {"help": "Hugging Face token for gated data (env HF_TOKEN)"}),
    }
    for name in names:
        flags, kwargs = specs[name]
        parser.add_argument(*flags, dest=name, default=None, **{**kwargs, "help": kwargs["help"].format(**shown)})


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


# ---------------------------------------------------------------- events (stage: events)

INPUTS_HELP = "MIDI files, directories (recursive), glob patterns, or - for paths on stdin"


def _add_events_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "events",
        help="MIDI -> MuseTok REMI events per bar",
        description="MuseTok's REMI events and token ids per bar. Without --json, a per-bar summary per file on "
        "stdout; with --json, one JSON object per file (file, md5, bar_starts, events, token_ids, report, ...); "
        'a file that fails gives {"file", "md5" (null if unreadable), "error": "<Type>: message"} instead. '
        "Exit code 0 once every file was tried, failures included; 1 when every file failed or under --strict.",
        epilog="example: midiva events song.mid --json",
    )
    p.add_argument("files", nargs="+", help=INPUTS_HELP)
    p.add_argument(
        "--drums",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep drum notes as pitched notes, as MuseTok does",
    )
    p.add_argument(
        "--drop-out-of-range",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="drop pitches outside 21..108 (--no-drop-out-of-range fails the file, as MuseTok does)",
    )
    p.add_argument(
        "--drop-oov",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replace events outside MuseTok's vocabulary (--no-drop-oov fails the file, as MuseTok does)",
    )
    p.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stop at the first file that fails instead of recording it",
    )
    p.set_defaults(handler=_cmd_events)


def _cmd_events(args: argparse.Namespace) -> int:
    import hashlib
    import time

    from midiva.events import MAX_TOKENS_PER_BAR, midi_to_bars
    from midiva.midi import read_midi_bytes

    paths = midi_inputs(args.files)
    options = {"include_drums": args.drums, "drop_out_of_range": args.drop_out_of_range, "drop_oov": args.drop_oov}
    failures: Counter[str] = Counter()
    n_files = n_bars = 0
    started = time.perf_counter()
    for path in paths:
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
            lines.append(
                f"  bar {b:4d} (MIDI bar {b + bars.leading_bars_dropped}): {len(pitches):3d} notes, "
                f"{len(events):3d} tokens{cut}{span}"
            )
        sys.stdout.write("\n".join(lines) + "\n")
    say_summary(
        args,
        done=n_files,
        failed=sum(failures.values()),
        bars=n_bars,
        seconds=time.perf_counter() - started,
        outputs=["stdout"],
        failures=failures,
    )
    return finished(args, usable=n_files, failed=sum(failures.values()))


# ---------------------------------------------------------------- features (stage: features)


def _add_features_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="MIDI -> handcrafted features per bar (CSV on stdout)",
        description="One CSV row per MuseTok bar: file,md5,bar_number,<features>. bar_number is MuseTok's "
        "bar index from 0 (bar 0 holds the first note), as in `midiva annotate`. The CSV goes to stdout, or to "
        "--out (parent directories are created). Unreadable or empty files are logged and skipped.",
        epilog="example: midiva features songs/ --out out/features.csv",
    )
    p.add_argument("files", nargs="+", help=INPUTS_HELP)
    p.add_argument(
        "--out",
        type=output_path("file", stdout=True, example="out/features.csv"),
        default=STDOUT,
        help="CSV file to write, or - for stdout",
    )
    p.add_argument(
        "--drums",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep drum notes in MuseTok's bars (features count drums in densities either way)",
    )
    p.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stop at the first file that fails instead of skipping it",
    )
    p.set_defaults(handler=_cmd_features)


@contextlib.contextmanager
def table_output(args: argparse.Namespace, what: str) -> Iterator[TextIO]:
    """The text stream a command writes its table to: the file at --out (directories created) or stdout.

    Raises:
        OutputError: the file cannot be opened or written (a closed pipe is left to `main`, exit 141).
    """
    from midiva.errors import OutputError

    to_stdout = args.out == STDOUT
    try:
        if not to_stdout:
            args.out.parent.mkdir(parents=True, exist_ok=True)
        stream = sys.stdout if to_stdout else args.out.open("w", newline="", encoding="utf-8")
    except OSError as err:
        raise OutputError(f"cannot write {str(args.out)!r}: {err.strerror or err}; choose a writable --out") from err
    try:
        yield stream
        stream.flush()
    except BrokenPipeError:
        raise
    except OSError as err:
        raise OutputError(f"writing {what} to {str(args.out)!r} failed: {err}") from err
    finally:
        if stream is not sys.stdout:
            stream.close()


def _cmd_features(args: argparse.Namespace) -> int:
    import csv
    import time

    from tqdm import tqdm

    from midiva.features import FEATURE_NAMES

    to_stdout = args.out == STDOUT
    if to_stdout and args.json:
        args.parser.error("--json prints the run summary on stdout, where the CSV goes too; give --out FILE")
    paths = midi_inputs(args.files)
    failures: Counter[str] = Counter()
    n_files = n_bars = 0
    started = time.perf_counter()
    with table_output(args, "features") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["file", "md5", "bar_number", *FEATURE_NAMES])
        progress = tqdm(paths, unit="file", file=sys.stderr, disable=bool(args.quiet) or not sys.stderr.isatty())
        for path in progress:
            written = _write_feature_rows(writer, path, args, failures)
            n_files += written > 0
            n_bars += written
            progress.set_postfix(bars=n_bars)
    n_failed = sum(failures.values())
    seconds = time.perf_counter() - started
    if n_files == 0 and not to_stdout:  # a header-only CSV would look like a result
        args.out.unlink(missing_ok=True)
    say_summary(
        args,
        done=n_files,
        failed=n_failed,
        bars=n_bars,
        seconds=seconds,
        outputs=["stdout" if to_stdout else args.out],
        failures=failures,
    )
    print_json(
        args,
        {
            "out": str(args.out),
            "files": n_files,
            "failed": n_failed,
            "bars": n_bars,
            "failures_by_type": dict(failures),
            "seconds": round(seconds, 3),
        },
    )
    return finished(args, usable=n_files, failed=n_failed)


def _write_feature_rows(writer: Any, path: Path, args: argparse.Namespace, failures: Counter[str]) -> int:
    """One file's feature rows; its bars written (0 when it failed: counted in `failures`, unless --strict)."""
    from midiva.features import midi_to_features
    from midiva.sources import display_name

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
        return 0
    for b, row in enumerate(feats.values):
        writer.writerow([display_name(path), bars.md5, b, *(f"{v:.6g}" for v in row.tolist())])
    return feats.n_bars


# ---------------------------------------------------------------- MuseTok latents (stage: latents)


def _add_encode_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="MIDI -> MuseTok per-bar latents (.safetensors per file)",
        description="Write OUT/<md5>.safetensors per MIDI file: latents (n_bars, 128) float32, indices "
        "(n_bars, 16) int64 and pre_quant (n_bars, 128) float32, with string metadata (md5, source_file, "
        "n_bars, backend, checkpoint_sha256, midiva_version, ...). Bars of many files share each forward "
        "pass. OUT/index.csv lists the files written; files that fail are recorded in OUT/failures.csv "
        "(annotate's columns); reruns skip files already done (--no-resume starts over).",
        epilog="example: midiva encode songs/ --out out/latents/ --device cuda --autocast bf16",
    )
    p.add_argument("files", nargs="+", help=INPUTS_HELP)
    p.add_argument(
        "--out", type=output_path("dir", example="out/latents/"), required=True, help="output directory (created)"
    )
    p.add_argument("--backend", choices=["musetok"], default="musetok", help="bar representation to encode")
    add_settings_flags(p, "checkpoint", "device", "batch_size", "num_workers", "storage_dir")
    p.add_argument(
        "--encoder-config",
        type=existing_path,
        help="JSON with the checkpoint's enc_n_head (default: config.json beside it, else 8 heads); "
        "`--config FILE.json` is accepted as a synonym",
    )
    p.add_argument(
        "--autocast",
        choices=["none", "bf16", "fp16"],
        default="none",
        help="reduced-precision transformer on CUDA (quantisation stays float32)",
    )
    p.add_argument("--drums", action=argparse.BooleanOptionalAction, default=True, help="keep drum notes in the bars")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip files committed before, encoded or failed (--no-resume: start over)",
    )
    p.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stop at the first unexpected error instead of recording it",
    )
    p.set_defaults(handler=_cmd_encode)


def _cmd_encode(args: argparse.Namespace) -> int:
    from midiva.config import sha256_file, write_run_json
    from midiva.encode import encode_files, tensor_paths
    from midiva.errors import OutputError
    from midiva.latents import load_encoder

    files = midi_inputs(args.files)
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
        write_run_json(
            out,
            resolved,
            command="encode",
            checkpoint=checkpoint,
            extra={"files": len(files), "autocast": args.autocast, "encoder": encoder.config.to_dict()},
        )
    except OSError as err:
        raise OutputError(f"cannot write to {str(out)!r}: {err.strerror or err}; choose a writable --out") from err
    summary = encode_files(
        files,
        out,
        encoder,
        checkpoint_sha256=checkpoint_sha256,
        backend=args.backend,
        resume=args.resume,
        strict=args.strict,
        include_drums=args.drums,
        batch_size=s.batch_size,
        num_workers=s.num_workers,
        autocast=args.autocast,
        progress=not args.quiet,
    )
    paths = tensor_paths(out)
    say_summary(
        args,
        done=summary.written,
        failed=summary.failed,
        skipped=summary.resumed,
        bars=summary.bars,
        seconds=summary.seconds,
        outputs=[f"{out}/<md5>.safetensors", *paths.tables],
        failures=summary.failures_by_type,
    )
    print_json(args, summary.to_dict())
    return finished(args, usable=summary.written + summary.resumed, failed=summary.failed, ledger=paths.failures)


def _add_download_musetok_parser(sub: argparse._SubParsersAction) -> None:
    from midiva.config import STORAGE_ENV

    p = sub.add_parser(
        "download-musetok",
        help="fetch the official MuseTok tokenizer checkpoint",
        description="Download MuseTok's tokenizer zip from Google Drive (gdown), unpack best_tokenizer/model.pt "
        f"into <storage>/musetok/ and verify it loads. Storage: --storage-dir, else ${STORAGE_ENV}, else the "
        "per-user data directory. Prints the checkpoint path on stdout. If the download fails, the error says "
        "where to put the file by hand.",
        epilog="example: midiva download-musetok --storage-dir ~/midiva-weights",
    )
    add_settings_flags(p, "storage_dir")
    p.add_argument(
        "--force",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="download again even if a loadable checkpoint is present",
    )
    p.set_defaults(handler=_cmd_download_musetok)


def _cmd_download_musetok(args: argparse.Namespace) -> int:
    from midiva.latents import download_musetok

    settings = settings_from_args(args).settings
    path = download_musetok(settings.storage_dir, force=args.force, quiet=args.quiet)
    if args.json:
        _print_json({"checkpoint": str(path)})
    else:
        sys.stdout.write(f"{path}\n")
    return 0


# ---------------------------------------------------------------- training (stage: train)


def _add_train_parsers(sub: argparse._SubParsersAction) -> None:
    from midiva.config import DEFAULT_CONTEXT, DEFAULT_EXCLUDE_FEATURES

    splits = ("train", "val", "test")
    p = sub.add_parser(
        "preprocess-emopia",
        help="EMOPIA clips -> per-clip bar representations",
        description="Turn every EMOPIA clip into its per-bar features and/or MuseTok latents: OUT/clips/<clip>.safetensors "
        "(shape (n_bars, dim)), clips.csv and failures.csv. Keeps EMOPIA's split (or makes a song-disjoint one) and "
        "resumes by default. --backend musetok or hybrid also needs --checkpoint.",
        epilog="example: midiva preprocess-emopia --emopia-dir ../shared/data/emopia --out out/emopia-features",
    )
    p.add_argument(
        "--emopia-dir",
        type=existing_path,
        required=True,
        help="EMOPIA directory: midis/, optional split/ and label.csv",
    )
    p.add_argument(
        "--out",
        type=output_path("dir", example="out/emopia-features"),
        required=True,
        help="output directory (clips/*.safetensors, clips.csv, failures.csv)",
    )
    add_settings_flags(p, "backend", "checkpoint", "device", "batch_size", "num_workers", "storage_dir")
    p.add_argument("--split", nargs="+", choices=splits, default=list(splits), help="splits to process")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True, help="skip clips already written")
    p.add_argument("--strict", action="store_true", help="stop at the first failing clip")
    p.add_argument(
        "--augment",
        type=int,
        default=0,
        metavar="N",
        help="also write N random authoring rewrites of every train clip (flat velocities, retiming, "
        "tracks, transposition, ...; see midiva.authoring)",
    )
    p.add_argument(
        "--medleys",
        type=int,
        default=0,
        metavar="N",
        help="also write N medleys of train clips (2-4 clips of different songs and quadrants joined at bar "
        "lines), each bar labelled by its own segment",
    )
    p.add_argument("--augment-seed", type=int, default=0, help="seed of the rewrites and medleys")
    p.add_argument(
        "--augment-backing",
        action="store_true",
        help="let the rewrites also add a band backing (pad and power-chord guitar) of the clip's own harmony",
    )
    p.add_argument(
        "--augment-sequenced",
        action="store_true",
        help="let some rewrites be a sequenced file's whole authoring at once (quantized, notated lengths, "
        "flat velocities, no pedal, spread tracks)",
    )
    p.set_defaults(handler=_cmd_preprocess_emopia)

    p = sub.add_parser(
        "prepare-labels",
        help="EMOPIA quadrants -> valence/arousal label files",
        description="Map each clip's EMOPIA quadrant to a (valence, arousal) point and write labels_clip.json and "
        "labels_bar.json (every bar of a clip gets its clip's point). The default points are Q1 (0.8, 0.6), "
        "Q2 (-0.6, 0.8), Q3 (-0.8, -0.4), Q4 (0.4, -0.6); --mapping changes them.",
        epilog="example: midiva prepare-labels --data out/emopia-features --mapping map.yaml",
    )
    p.add_argument("--data", type=existing_path, required=True, help="output directory of preprocess-emopia")
    p.add_argument(
        "--mapping", type=existing_path, help="YAML/TOML file: Q1..Q4 -> [valence, arousal] (default: built-in)"
    )
    p.add_argument(
        "--out",
        type=output_path("dir", example="out/labels"),
        help="where to write labels_clip.json/labels_bar.json (default: --data)",
    )
    p.set_defaults(handler=_cmd_prepare_labels)

    p = sub.add_parser(
        "train",
        help="train the valence/arousal MLP",
        description="Train the per-bar MLP on preprocessed EMOPIA clips with early stopping on the validation "
        "split, and write the model (.safetensors with its recipe and metrics) plus <model>_log/. The defaults "
        "rebuild the bundled model. With --json the metrics go to stdout.",
        epilog="example: midiva train --data out/emopia-features --out out/model.safetensors --seed 0",
    )
    p.add_argument("--data", type=existing_path, required=True, help="output directory of preprocess-emopia")
    p.add_argument(
        "--out",
        type=output_path("file", example="out/model.safetensors"),
        required=True,
        help="model file to write (.safetensors)",
    )
    p.add_argument("--labels", type=existing_path, help="label file (default: DATA/labels_bar.json)")
    add_settings_flags(p, "backend", "device", defaults={"backend": "the one the data was preprocessed with"})
    p.add_argument(
        "--features", default="", help="comma-separated feature names or globs, e.g. 'velocity_*,mode*' (empty: all)"
    )
    p.add_argument(
        "--exclude-features",
        default=",".join(DEFAULT_EXCLUDE_FEATURES),
        help="comma-separated names or globs to leave out (empty: none); by default whole-piece columns, "
        "those that depend on the tempo (EMOPIA's transcriptions fix 120 bpm) and those that follow authoring "
        "rather than music (absolute and relative velocity, drum-including densities, note-count polyphony)",
    )
    p.add_argument(
        "--context",
        default=",".join(DEFAULT_CONTEXT),
        help="comma-separated context blocks appended per bar: mean, std, window<k> (mean of bars b-k..b+k)",
    )
    p.add_argument("--hidden-dim", type=positive_int, help="hidden units (default: input_dim // 2)")
    p.add_argument("--activation", choices=["relu", "gelu"], default="relu", help="hidden activation")
    p.add_argument("--dropout", type=_unit_float, default=0.2, help="dropout after the hidden layer")
    p.add_argument("--tanh", action=argparse.BooleanOptionalAction, default=True, help="squash outputs with tanh")
    p.add_argument(
        "--output-scale",
        type=_scale_float,
        default=None,
        help="reach of the tanh output (default: the largest |value| of the label mapping, 0.8)",
    )
    p.add_argument(
        "--feature-dropout",
        type=_unit_float,
        default=0.0,
        help="chance per training clip and step that each bar feature reads as the training mean (default 0: off)",
    )
    p.add_argument(
        "--feature-dropout-features",
        nargs="+",
        default=(),
        metavar="PATTERN",
        help="names or globs of the bar features --feature-dropout may drop, e.g. 'onsets_*' 'chord_*' "
        "(commas also separate; default: all)",
    )
    p.add_argument(
        "--input-clip",
        type=_positive_float,
        default=None,
        help="clip each normalised input column to ±this many training standard deviations (default: no clipping)",
    )
    p.add_argument("--loss", choices=["mse", "smooth_l1", "mse+l1"], default="smooth_l1", help="training loss")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=_non_negative_float, default=1e-2, help="AdamW weight decay")
    p.add_argument("--max-epochs", type=positive_int, default=200, help="epoch limit")
    p.add_argument(
        "--patience", type=positive_int, default=30, help="epochs without validation improvement before stopping"
    )
    p.add_argument("--batch-clips", type=positive_int, default=32, help="clips per optimisation step")
    p.add_argument(
        "--clip-weighting",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="weight each clip equally in the loss (--no-clip-weighting: each bar)",
    )
    p.add_argument(
        "--monitor",
        default="loss",
        help="early-stopping criterion on val: 'loss' or a metric key such as clip.quadrant_accuracy",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    p.add_argument("--log-dir", type=Path, help="training log directory (default: OUT without suffix + '_log')")
    p.add_argument(
        "--report-test",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="after training, also record test-split metrics in the model (never used for selection)",
    )
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False, help="log to Weights & Biases")
    p.add_argument("--wandb-project", default="midiva", help="W&B project name")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="evaluate a model on EMOPIA's test split",
        description="Score a regressor (default: the bundled model) on an EMOPIA split: clip and bar MAE, RMSE, "
        "Pearson, CCC, sign and quadrant accuracy. The headline numbers go to stderr; --json prints every metric "
        "on stdout; --out also writes metrics.json, predictions.csv and plots.",
        epilog="example: midiva evaluate --emopia-dir ../shared/data/emopia --json",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=existing_path, help="output directory of preprocess-emopia (+ prepare-labels)")
    source.add_argument(
        "--emopia-dir", type=existing_path, help="EMOPIA directory; representations are computed on the fly"
    )
    p.add_argument("--labels", type=existing_path, help="label file for --data (default: DATA/labels_bar.json)")
    p.add_argument("--split", choices=splits, default="test", help="split to evaluate")
    p.add_argument(
        "--out", type=output_path("dir", example="out/eval"), help="write metrics.json, predictions.csv and plots here"
    )
    add_settings_flags(p, "model", "checkpoint", "device", "batch_size", "num_workers", "storage_dir")
    p.set_defaults(handler=_cmd_evaluate)


def _musetok_checkpoint(settings: Any) -> Path:
    """The MuseTok checkpoint named by the settings, or the default one in the storage dir."""
    from midiva.latents import default_checkpoint_path

    return Path(settings.checkpoint) if settings.checkpoint else default_checkpoint_path(settings.storage_dir)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, allow_nan=False, default=str) + "\n")
    sys.stdout.flush()


def _cmd_preprocess_emopia(args: argparse.Namespace) -> int:
    from midiva.config import write_run_json
    from midiva.preprocess import preprocess_emopia

    resolved = settings_from_args(args)
    s = resolved.settings
    checkpoint = _musetok_checkpoint(s) if s.backend != "features" else None
    summary = preprocess_emopia(
        args.emopia_dir,
        args.out,
        backend=s.backend,
        checkpoint=checkpoint,
        device=s.device,
        batch_size=s.batch_size,
        num_workers=s.num_workers,
        resume=args.resume,
        splits=args.split,
        progress=not args.quiet,
        strict=args.strict,
        augment=args.augment,
        augment_seed=args.augment_seed,
        medleys=args.medleys,
        augment_backing=args.augment_backing,
        augment_sequenced=args.augment_sequenced,
    )
    write_run_json(
        args.out,
        resolved,
        command="preprocess-emopia",
        checkpoint=checkpoint,
        extra={"emopia_dir": str(args.emopia_dir), "seconds": round(summary.seconds, 2)},
    )
    say(
        args,
        "preprocess-emopia: %d clips (%d written, %d resumed), %d failed %s in %.1f s -> %s",
        summary.n_clips,
        summary.n_written,
        summary.n_resumed,
        summary.n_failed,
        summary.failures_by_type or "",
        summary.seconds,
        args.out,
    )
    print_json(args, dataclasses.asdict(summary))
    return 0


def _cmd_prepare_labels(args: argparse.Namespace) -> int:
    from midiva.labels import DEFAULT_LABEL_MAPPING, prepare_labels, read_label_mapping

    mapping = read_label_mapping(args.mapping) if args.mapping else DEFAULT_LABEL_MAPPING
    files = prepare_labels(args.data, mapping, args.out)
    say(args, "prepare-labels: %d clips -> %s, %s", files.n_clips, files.clip_path, files.bar_path)
    print_json(args, {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(files).items()})
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from midiva.config import write_run_json
    from midiva.train import TrainConfig, train_from_dir

    def names(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.split(",") if x.strip())

    resolved = settings_from_args(args)
    s = resolved.settings
    # Tuning flags carry TrainConfig's field names (one name per thing); --device is a Setting.
    tuning = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name != "device" and hasattr(args, f.name)
    }
    tuning["feature_dropout_features"] = tuple(p for text in args.feature_dropout_features for p in names(text))
    config = TrainConfig(**tuning, device=s.device)
    outcome = train_from_dir(
        args.data,
        args.out,
        backend=s.backend if resolved.sources["backend"] != "default" else None,
        features=names(args.features),
        exclude_features=names(args.exclude_features),
        context=names(args.context),
        config=config,
        labels_path=args.labels,
        report_test=args.report_test,
        log_dir=args.log_dir,
        wandb_project=args.wandb_project if args.wandb else None,
    )
    write_run_json(
        outcome.log_dir,
        resolved,
        command="train",
        extra={"model": str(args.out), "args": {k: str(v) for k, v in vars(args).items() if k != "handler"}},
    )
    result = outcome.result
    say(
        args,
        "train: best epoch %d of %d; val clip quadrant accuracy %.3f -> %s",
        result.best_epoch,
        len(result.history),
        result.val_metrics.clip.quadrant_accuracy,
        args.out,
    )
    print_json(args, outcome.metrics)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from midiva.config import write_run_json
    from midiva.metrics import metrics_json
    from midiva.train import evaluate_model

    resolved = settings_from_args(args)
    s = resolved.settings
    outcome = evaluate_model(
        s.model,
        data_dir=args.data,
        labels_path=args.labels,
        emopia_dir=args.emopia_dir,
        split=args.split,
        out_dir=args.out,
        checkpoint=_musetok_checkpoint(s),
        device=s.device,
        batch_size=s.batch_size,
        num_workers=s.num_workers,
        progress=not args.quiet,
    )
    if args.out is not None:
        write_run_json(
            args.out, resolved, command="evaluate", extra={"model": outcome.regressor.source, "split": args.split}
        )
    metrics = metrics_json(outcome.metrics)
    headline = ", ".join(
        f"{k} {metrics[k]:.3f}"
        for k in ("clip.quadrant_accuracy", "clip.mae_valence", "clip.mae_arousal")
        if isinstance(metrics.get(k), float)
    )
    say(
        args,
        "evaluate: %s split, %s clips: %s%s",
        args.split,
        metrics.get("clip.n"),
        headline,
        f"; tables and plots in {args.out}" if args.out is not None else "; --json prints every metric",
    )
    print_json(args, metrics)
    return 0


# ---------------------------------------------------------------- annotation (stage: annotate)


def _add_annotate_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "annotate",
        help="valence/arousal for every bar of a corpus -> resumable CSV",
        description="Annotate MIDI files/directories, local GigaMIDI parquet, or the GigaMIDI hub data set. "
        "Reruns resume; shards (--num-shards/--shard-index, split by md5) combine with `midiva merge`. "
        "Without --num-workers (or MIDIVA_NUM_WORKERS), fewer than 64 files parse in-process and larger "
        "inputs use min(4, CPUs - 1) worker processes. A summary goes to stderr; --json prints the run's "
        "summary on stdout.",
        epilog="example: midiva annotate songs/ --out out/annotations.csv",
    )
    p.add_argument("inputs", nargs="*", help=f"{INPUTS_HELP} (or use --dataset)")
    p.add_argument("--dataset", help="hub data set name (Metacreation/GigaMIDI) or a parquet file/directory")
    p.add_argument("--dataset-config", default="v1.0.0", help="hub config: v1.0.0, or the extended release (v2.0.0)")
    p.add_argument("--split", action="append", help="split to read (repeatable); 'all', or none given: every split")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True, help="stream data set rows")
    p.add_argument(
        "--out",
        type=output_path("file", example="out/annotations.csv"),
        default=Path("annotations.csv"),
        help="annotations CSV (tables are written beside it; directories are created)",
    )
    add_settings_flags(
        p,
        "model",
        "backend",
        "checkpoint",
        "device",
        "batch_size",
        "num_workers",
        "cpu_threads",
        "storage_dir",
        "hf_token",
        defaults={"backend": "the model's", "num_workers": AUTO_NUM_WORKERS_HELP},
    )
    p.add_argument("--num-shards", type=positive_int, default=1, help="split the input by md5 into this many shards")
    p.add_argument("--shard-index", type=non_negative_int, default=0, help="the shard this run annotates")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip files already in --out (--no-resume: discard those outputs and start over)",
    )
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

    p.add_argument(
        "--commit-interval",
        type=seconds,
        default=1.0,
        help="seconds between fsynced commits (a kill loses at most this much work)",
    )
    p.add_argument(
        "--lock",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="lock --out so that one process writes it (--no-lock: for filesystems without locks)",
    )
    p.set_defaults(handler=_cmd_annotate, parser=p)
    p = sub.add_parser(
        "merge",
        help="combine shard outputs; check completeness and uniqueness",
        description="Combine the outputs of `annotate --num-shards N` runs into one: checks that every shard is "
        "present and finished, that no md5 appears twice and that every file has bars 0..n-1, and exits 1 "
        "otherwise (nothing is written then).",
        epilog="example: midiva merge giga/shard-*/annotations.csv --out giga/annotations.csv",
    )
    p.add_argument("shards", nargs="+", type=Path, help="annotations CSVs of the shards (ledgers beside them)")
    p.add_argument(
        "--out", type=output_path("file", example="giga/annotations.csv"), required=True, help="merged annotations CSV"
    )
    p.add_argument("--allow-incomplete", action="store_true", help="merge shards whose run did not finish")
    p.add_argument("--parquet", action=argparse.BooleanOptionalAction, default=False, help="also write Parquet tables")
    p.set_defaults(handler=_cmd_merge, parser=p)


def _cmd_annotate(args: argparse.Namespace) -> int:
    from midiva.lock import acquire_output_lock

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
    # Inputs are found, and a data set's first row read, before anything is written (the lock included):
    # a missing path or an unreachable hub leaves nothing behind.
    source = _annotate_rows(args, splits, resolved.settings)
    with acquire_output_lock(args.out, label=_run_label(args), enabled=args.lock) as lock, _StopSignals() as stop:
        try:
            return _annotate_locked(args, resolved, source, splits, lock, stop)
        finally:
            if source.md5_cache is not None:
                source.md5_cache.save()


@dataclasses.dataclass(frozen=True)
class _AnnotateSource:
    """`annotate`'s rows, their number when known, and the hooks that skip finished files unread."""

    rows: Any
    n_files: int | None
    skip_unread: Any
    md5_cache: Any


def _annotate_rows(args: argparse.Namespace, splits: list[str] | None, settings: Any) -> _AnnotateSource:
    """The source rows of `annotate`: finished files are skipped before their bytes are read."""
    import itertools

    from midiva.errors import SourceError
    from midiva.sources import (
        FileMd5Cache,
        SkipUnread,
        count_dataset_rows,
        iter_files,
        md5_cache_path,
        open_dataset,
    )

    skip_unread = SkipUnread()
    if args.inputs:
        paths = midi_inputs(args.inputs)
        md5_cache = FileMd5Cache.load(md5_cache_path(args.out))
        return _AnnotateSource(iter_files(paths, skip_unread, md5_cache=md5_cache), len(paths), skip_unread, md5_cache)
    rows = open_dataset(
        args.dataset,
        config=args.dataset_config,
        splits=splits,
        streaming=args.streaming,
        token=settings.hf_token,
        skip=skip_unread,
    )
    first = next(rows, None)
    if first is None:
        raise SourceError(
            f"--dataset {args.dataset!r} holds no rows for split(s) {splits or 'all'}; nothing to annotate"
        )
    n_files = count_dataset_rows(args.dataset, config=args.dataset_config, splits=splits, token=settings.hf_token)
    return _AnnotateSource(itertools.chain([first], rows), n_files, skip_unread, None)


def _annotate_locked(
    args: argparse.Namespace,
    resolved: Any,
    source: _AnnotateSource,
    splits: list[str] | None,
    lock: Any,
    stop: _StopSignals,
) -> int:
    """`annotate` once its output is locked: a run refused by the lock loads nothing and writes nothing."""
    from midiva.annotate import AnnotateOptions, annotate_stream, load_annotation_model
    from midiva.config import write_run_json
    from midiva.errors import OutputError
    from midiva.ledger import output_paths
    from midiva.runner import default_num_workers, torch_threads_for

    settings = resolved.settings
    rows, n_files = source.rows, source.n_files
    backend = settings.backend if resolved.sources["backend"] != "default" else None
    model = load_annotation_model(
        settings.model,
        backend=backend,
        checkpoint=settings.checkpoint,
        device=settings.device,
        storage_dir=settings.storage_dir,
    )
    num_workers = settings.num_workers if resolved.sources["num_workers"] != "default" else default_num_workers(n_files)
    options = AnnotateOptions(
        batch_size=settings.batch_size,
        num_workers=num_workers,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        resume=args.resume,
        retry_failures=args.retry_failures,
        strict=args.strict,
        include_drums=args.drums,
        limit=args.limit,
        parquet=args.parquet,
        commit_interval_s=args.commit_interval,
        progress=not args.quiet,
        device=model.device,
        torch_threads=torch_threads_for(model.backend, num_workers, settings.cpu_threads),
        autocast=args.autocast,
        cpu_threads=settings.cpu_threads,
        total_files=n_files,
    )
    options = dataclasses.replace(options, lock=args.lock, lock_label=_run_label(args))
    extra = {
        "inputs": [str(p) for p in args.inputs],
        "dataset": args.dataset,
        "dataset_config": args.dataset_config,
        "splits": splits,
        "options": vars(options),
        "fingerprint": model.fingerprint,
    }
    out_paths = output_paths(args.out)
    try:
        write_run_json(
            args.out.parent,
            resolved,
            command="annotate",
            extra=extra,
            checkpoint=settings.checkpoint,
            filename=out_paths.run.name,
        )
    except (OSError, OutputError) as err:
        reason = err.__cause__ if isinstance(err, OutputError) and err.__cause__ else err
        raise OutputError(
            f"cannot write {out_paths.run.name} beside {str(args.out)!r}: {getattr(reason, 'strerror', None) or reason}; choose a writable --out"
        ) from err
    summary = annotate_stream(
        rows,
        args.out,
        model.regressor,
        encoders=model.encoders,
        options=options,
        lock=lock,
        stop=stop,
        skip_unread=source.skip_unread,
    )
    outputs: list[object] = [*out_paths.tables, out_paths.summary, out_paths.run]
    if args.parquet:
        outputs += [out_paths.csv.with_suffix(".parquet"), out_paths.meta.with_suffix(".parquet")]
    skipped = summary.files_skipped_done + summary.files_skipped_shard + summary.files_skipped_duplicate
    say_summary(
        args,
        done=summary.files_done,
        failed=summary.files_failed,
        skipped=skipped,
        bars=summary.bars,
        seconds=summary.elapsed_s,
        outputs=outputs,
        failures=summary.failures_by_type,
    )
    if not summary.complete and not stop.signum:
        say(args, f"  stopped by --limit {args.limit}; rerun without it (or with a larger one) to continue")
    print_json(args, summary.to_json())
    if stop.signum and not summary.complete:  # a signal during the last commit: the run still finished
        log.warning(
            "stopped by %s after committing %d files; rerun the same command to resume",
            signal.Signals(stop.signum).name,
            summary.total_files,
        )
        return 128 + stop.signum
    return finished(
        args,
        usable=summary.files_done + summary.files_skipped_done,
        failed=summary.files_failed,
        ledger=out_paths.failures,
    )


def _run_label(args: argparse.Namespace) -> str:
    """What this run is, for the lock record: its shard and its Slurm task."""
    parts = [f"shard {args.shard_index} of {args.num_shards}"] if args.num_shards > 1 else []
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        parts.append(f"Slurm job {env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}")
    elif env.get("SLURM_JOB_ID"):
        parts.append(f"Slurm job {env['SLURM_JOB_ID']}")
    return ", ".join(parts)


class _StopSignals:
    """SIGTERM and SIGUSR1 (Slurm's requeue, time limit, `--signal`) ask the run to commit and stop."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.signum != 0

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _cmd_merge(args: argparse.Namespace) -> int:
    from midiva.annotate import export_parquet
    from midiva.ledger import output_paths
    from midiva.merge import merge_outputs

    report = merge_outputs(args.shards, args.out, allow_incomplete=args.allow_incomplete)
    if args.parquet:
        export_parquet(output_paths(args.out))
    say(
        args,
        f"merge: {report.inputs} inputs -> {report.files:,} files, {report.failed:,} failed, {report.bars:,} bars "
        f"in {report.out}" + ("" if report.complete else " (incomplete: --allow-incomplete)"),
    )
    print_json(args, dataclasses.asdict(report))
    return 0


def _add_status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="progress of annotation outputs, e.g. the shards of a Slurm array (read-only)",
        description="One line per output: complete / running (with its lock holder) / stopped / not started, "
        "files, failures and bars committed; then totals. Safe while the runs write. --json prints one JSON "
        "object per output on stdout instead of the table.",
        epilog="example: midiva status giga/shard-*/annotations.csv",
    )
    p.add_argument("outputs", nargs="+", type=Path, help="annotations CSVs, e.g. giga/shard-*/annotations.csv")
    p.set_defaults(handler=_cmd_status, parser=p)


def _cmd_status(args: argparse.Namespace) -> int:
    from midiva.status import outputs_status, status_table

    statuses = outputs_status(args.outputs)
    if getattr(args, "json", False):
        sys.stdout.write("".join(json.dumps(s.to_json()) + "\n" for s in statuses))
    else:
        sys.stdout.write(status_table(statuses))
    return 0


# ---------------------------------------------------------------- analysis (stage: analysis)


def _add_analysis_parsers(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser, out_help: str, *, stdout: bool = False) -> None:
        example = f"out/{p.prog.split()[-1]}/"
        p.add_argument(
            "annotations",
            type=Path,
            help="annotations table, CSV or Parquet (told apart by content): md5,bar_number,valence,arousal",
        )
        meta = p.add_mutually_exclusive_group()
        meta.add_argument(
            "--meta",
            type=existing_path,
            default=None,
            metavar="PATH",
            help="metadata table; None: X.meta.csv (or X.meta.parquet) beside X if present",
        )
        meta.add_argument(
            "--no-meta", action="store_true", help="ignore any metadata table (no genre or metadata analyses)"
        )
        p.add_argument(
            "--failures",
            type=existing_path,
            default=None,
            metavar="PATH",
            help="failures ledger; None: X.failures.csv beside X if present",
        )
        p.add_argument(
            "--out",
            type=output_path("dir", stdout=stdout, example=example),
            required=True,
            metavar="DIR",
            help=out_help,
        )
        p.add_argument(
            "--n-boot", type=positive_int, default=1000, metavar="N", help="bootstrap resamples per confidence interval"
        )
        p.add_argument(
            "--seed",
            type=non_negative_int,
            default=0,
            metavar="N",
            help="seed of the bootstrap and of the example songs",
        )
        p.add_argument(
            "--min-songs-per-genre",
            type=positive_int,
            default=20,
            metavar="N",
            help="smaller genres are listed but not ranked",
        )
        p.add_argument(
            "--min-bars-dynamics",
            type=positive_int,
            default=8,
            metavar="N",
            help="shorter songs get no within-song dynamics",
        )
        p.add_argument(
            "--examples",
            type=non_negative_int,
            default=4,
            metavar="N",
            help="example songs whose VA curves are kept and plotted",
        )
        p.add_argument(
            "--max-rows-in-memory",
            type=positive_int,
            default=50_000_000,
            metavar="N",
            help="rows per pass; larger tables take several passes",
        )
        p.add_argument(
            "--max-domain-distance",
            type=_positive_float,
            default=None,
            metavar="X",
            help="genre tables use only songs whose domain_distance (metadata; 1 = a typical training clip) is at most X",
        )

    p = sub.add_parser(
        "stats",
        help="statistics of annotations, by genre (CSV tables + summary.json)",
        description="Statistics of an annotations table (CSV or the Parquet `annotate --parquet` writes): bar- and "
        "song-level distributions, quadrants, genres with bootstrap confidence intervals, correlations with the "
        "metadata, within-song dynamics. Writes CSV tables and summary.json into --out; the observations go to "
        "stderr, and --json prints the whole summary on stdout.",
        epilog="example: midiva stats out/annotations.csv --out out/stats/",
    )
    common(p, "directory for the tables and summary.json (created)")
    p.set_defaults(handler=_cmd_stats)
    p = sub.add_parser(
        "plot",
        help="plots of annotations (PNG and/or SVG)",
        description="Figures of an annotations table (CSV or Parquet): valence/arousal histograms and heat maps, "
        "song means by genre, genre box plots, the profile along the song, and example songs named by title and "
        "artist from the metadata (md5 without it).",
        epilog="example: midiva plot out/annotations.csv --out out/plots/ --format both",
    )
    common(p, "directory for the figures (created)")
    p.add_argument("--format", choices=["png", "svg", "both"], default="png", help="figure file format")
    p.set_defaults(handler=_cmd_plot)
    p = sub.add_parser(
        "report",
        help="one self-contained HTML report (OUT/report.html)",
        description="One self-contained HTML page (figures embedded) with the observations, tables and figures of "
        "`midiva stats` and `midiva plot`. --out - writes the HTML to stdout.",
        epilog="example: midiva report out/annotations.csv --out out/report/",
    )
    common(p, "directory for report.html (created), or - for the HTML on stdout", stdout=True)
    p.set_defaults(handler=_cmd_report)


def _analysis_stats(args: argparse.Namespace) -> Any:
    """compute_stats for an analysis subcommand, finding the sidecar tables beside the annotations."""
    from midiva.analysis import compute_stats, sidecar_paths

    default_meta, default_failures = sidecar_paths(args.annotations)
    meta = None if args.no_meta else args.meta or (default_meta if default_meta.is_file() else None)
    failures = args.failures or (default_failures if default_failures.is_file() else None)
    if meta is None and not args.no_meta:
        log.warning(
            "no metadata table (%s not found; pass --meta PATH): genre and metadata analyses are skipped", default_meta
        )
    return compute_stats(
        args.annotations,
        meta,
        failures,
        n_boot=args.n_boot,
        seed=args.seed,
        min_songs_per_genre=args.min_songs_per_genre,
        min_bars_dynamics=args.min_bars_dynamics,
        n_examples=args.examples,
        max_rows_in_memory=args.max_rows_in_memory,
        max_domain_distance=args.max_domain_distance,
        progress=not args.quiet,
    )


def _cmd_stats(args: argparse.Namespace) -> int:
    from midiva.config import write_run_json
    from midiva.report import full_summary, write_tables

    stats = _analysis_stats(args)
    files = write_tables(stats, args.out)
    write_run_json(args.out, settings_from_args(args), command="stats", extra={"files": [p.name for p in files]})
    summary = full_summary(stats)
    say(
        args,
        "stats: "
        + "\n  ".join(summary["observations"])
        + f"\n  outputs: {len(files)} tables and summary.json in {args.out}",
    )
    print_json(args, summary)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from midiva.config import write_run_json
    from midiva.report import write_plots

    formats = ("png", "svg") if args.format == "both" else (args.format,)
    files = write_plots(_analysis_stats(args), args.out, formats)
    write_run_json(args.out, settings_from_args(args), command="plot", extra={"files": [p.name for p in files]})
    say(args, f"plot: {len(files)} figures in {args.out}: " + ", ".join(p.name for p in files))
    print_json(args, {"out": str(args.out), "files": [str(p) for p in files]})
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from midiva.config import write_run_json
    from midiva.report import render_report, write_report

    stats = _analysis_stats(args)
    if args.out == STDOUT:
        if args.json:
            args.parser.error("--json prints a summary on stdout, where --out - puts the HTML; give --out DIR")
        sys.stdout.write(render_report(stats))
        return 0
    target = write_report(stats, args.out)
    write_run_json(args.out, settings_from_args(args), command="report", extra={"files": [target.name]})
    say(args, f"report: {target} ({stats.quality.n_songs:,} songs, {stats.quality.n_valid_rows:,} bars)")
    print_json(args, {"report": str(target)})
    return 0


# ---------------------------------------------------------------- predictions of single files (stage: predict)


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="valence/arousal per bar of a few files, as a table (and a plot)",
        description="Predict valence and arousal for every bar of the given MIDI files and print a table per file "
        "(bar_number, bar start in ticks and seconds, valence, arousal) on stdout; --out FILE.csv writes one CSV "
        "instead (file,md5,bar_number,start_tick,start_seconds,valence,arousal), --json one JSON object per file, "
        "--plot FILE.png the curves. Uses annotate's runner and model, so the values are annotate's.",
        epilog="example: midiva predict song.mid --plot out/song.png",
    )
    p.add_argument("files", nargs="+", help=INPUTS_HELP)
    p.add_argument(
        "--out",
        type=output_path("file", stdout=True, example="out/predictions.csv"),
        default=STDOUT,
        help="CSV file for all bars, or - for a readable table per file on stdout",
    )
    p.add_argument(
        "--plot",
        type=output_path("file", example="out/curve.png"),
        metavar="PNG",
        help="also draw each file's valence/arousal curve into this PNG (one panel per file, at most 16)",
    )
    add_settings_flags(p, "model", "checkpoint", "device", "batch_size", "num_workers")
    p.add_argument("--drums", action=argparse.BooleanOptionalAction, default=True, help="keep drum notes in the bars")
    p.add_argument("--strict", action="store_true", help="stop at the first failing file, with its traceback")
    p.set_defaults(handler=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    import time

    from midiva.prediction import predict_files

    to_stdout = args.out == STDOUT
    paths = midi_inputs(args.files)
    settings = settings_from_args(args).settings
    started = time.perf_counter()
    results = predict_files(
        paths,
        settings.model,
        checkpoint=settings.checkpoint,
        device=settings.device,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        include_drums=args.drums,
        strict=args.strict,
    )
    failures, done, n_bars = _write_predictions(args, results, to_stdout)
    n_done = len(paths) - sum(failures.values())
    if n_done == 0 and not to_stdout:  # a header-only CSV would look like a result
        args.out.unlink(missing_ok=True)
    outputs: list[object] = ["stdout" if to_stdout else args.out]
    if args.plot is not None and done:
        from midiva.report import write_curves

        outputs.append(write_curves(done, args.plot))
    say_summary(
        args,
        done=n_done,
        failed=sum(failures.values()),
        bars=n_bars,
        seconds=time.perf_counter() - started,
        outputs=outputs,
        failures=failures,
    )
    return finished(args, usable=n_done, failed=sum(failures.values()))


def _write_predictions(args: argparse.Namespace, results: Any, to_stdout: bool) -> tuple[Counter[str], list[Any], int]:
    """Write `predict`'s results (a CSV at --out, a table or JSON on stdout); (failures by type, the first
    16 files for the plot, bars written)."""
    import csv

    from midiva.prediction import PREDICTION_COLUMNS

    failures: Counter[str] = Counter()
    done: list[Any] = []
    n_bars = 0
    with table_output(args, "predictions") as stream:
        writer = None if to_stdout else csv.writer(stream, lineterminator="\n")
        if writer is not None:
            writer.writerow(["file", "md5", *PREDICTION_COLUMNS])
        for result in results:
            if args.json:
                _print_json(result.to_json())
            if not result.ok:
                failures[result.error_type] += 1
                log.warning("%s: %s", result.error_type, result.error)
                continue
            n_bars += result.n_bars
            if len(done) < 16:
                done.append(result)
            if writer is not None:
                for b, t, sec, v, a in zip(*(c.tolist() for c in result.columns().values()), strict=True):
                    writer.writerow([result.name, result.md5, b, t, f"{sec:.6f}", f"{v:.6f}", f"{a:.6f}"])
            elif not args.json:
                stream.write(result.to_text())
    return failures, done, n_bars


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all subcommands)."""

    def global_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
        # Subcommands repeat the global flags with SUPPRESS defaults so `midiva -v events`
        # and `midiva events -v` both work without the subparser resetting the value.
        d = argparse.SUPPRESS
        parser.add_argument(
            "-v", "--verbose", action="count", default=d if suppress else 0, help="more log output (-vv: debug)"
        )
        parser.add_argument(
            "-q", "--quiet", action="store_true", default=d if suppress else False, help="only errors; no progress bars"
        )
        parser.add_argument(
            "--config",
            type=existing_path,
            default=d if suppress else None,
            help="TOML settings file (flags override it)",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            default=d if suppress else False,
            help="print the result as JSON on stdout (without it: data only on stdout, a summary on stderr)",
        )

    common = argparse.ArgumentParser(add_help=False)
    global_flags(common, suppress=True)
    parser = argparse.ArgumentParser(
        prog="midiva",
        description="Bar-level valence and arousal for symbolic music. `midiva COMMAND --help` describes each "
        "command; all of them take inputs, write outputs and exit alike (see the module docstring of midiva.cli).",
        epilog="example: midiva annotate songs/ --out out/annotations.csv && midiva report out/annotations.csv --out out/report/",
        formatter_class=HelpFormatter,
    )
    global_flags(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"midiva {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    original_add = sub.add_parser

    def add_parser(name: str, **kwargs: object) -> argparse.ArgumentParser:
        kwargs.setdefault("parents", [common])
        kwargs.setdefault("formatter_class", HelpFormatter)
        p = original_add(name, **kwargs)  # type: ignore[arg-type]
        p.set_defaults(parser=p)
        return p

    sub.add_parser = add_parser  # type: ignore[method-assign]
    for register in (
        _add_events_parser,
        _add_features_parser,
        _add_encode_parser,
        _add_download_musetok_parser,
        _add_train_parsers,
        _add_annotate_parsers,
        _add_status_parser,
        _add_analysis_parsers,
        _add_predict_parser,
    ):
        register(sub)
    return parser


def configure_logging(verbose: int, quiet: bool) -> None:
    """Send midiva's logs to stderr at the level chosen by -v/-q."""
    level = (
        logging.ERROR if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("midiva")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture): nothing to flush
        pass


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
    except BrokenPipeError:  # `midiva features x.mid | head`: the reader has what it wanted
        _silence_stdout()
        return 141
    except OSError as err:  # a filesystem failure no stage mapped: still one line, never a traceback
        log.debug("traceback", exc_info=True)
        where = f" ({err.filename!r})" if getattr(err, "filename", None) else ""
        log.error(
            "OSError: %s%s; check the paths and free space, rerun with -vv for details", err.strerror or err, where
        )
        return 1
    except Exception as err:  # a bug of ours: say so plainly, keep the traceback for -vv
        log.debug("traceback", exc_info=True)
        log.error(
            "unexpected %s: %s; this is a midiva bug, please report it with the output of -vv", type(err).__name__, err
        )
        return 1

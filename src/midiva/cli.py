"""Command-line interface: parse flags, resolve Settings, call the library, return an exit code.

Exit codes: 0 the run finished (skipped files are recorded, not fatal); 1 a fatal error such
as a missing checkpoint or an unwritable output; 2 usage. Data goes to stdout, logs to stderr.
Heavy imports (torch, datasets) happen inside the subcommands so `midiva --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from midiva import __version__
from midiva.config import ResolvedSettings, resolve_settings
from midiva.errors import MidivaError

log = logging.getLogger("midiva")

Handler = Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------- shared helpers


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


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
            {"choices": ["features", "musetok", "hybrid"], "help": "bar representation (default features)"},
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


def settings_from_args(args: argparse.Namespace) -> ResolvedSettings:
    """Resolve Settings from this invocation's flags, the environment and --config."""
    return resolve_settings(vars(args), os.environ, getattr(args, "config", None))


# ---------------------------------------------------------------- events (stage: events)


def _add_events_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("events", help="MIDI -> MuseTok REMI events per bar")
    p.add_argument("files", nargs="+", type=Path, help="MIDI files")
    p.set_defaults(handler=_cmd_events)


def _cmd_events(args: argparse.Namespace) -> int:
    raise MidivaError("`midiva events` is being implemented")


# ---------------------------------------------------------------- features (stage: features)


def _add_features_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="MIDI -> handcrafted features per bar (CSV on stdout)")
    p.add_argument("files", nargs="+", type=Path, help="MIDI files")
    p.set_defaults(handler=_cmd_features)


def _cmd_features(args: argparse.Namespace) -> int:
    raise MidivaError("`midiva features` is being implemented")


# ---------------------------------------------------------------- MuseTok latents (stage: latents)


def _add_encode_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="MIDI -> MuseTok per-bar latents (.safetensors per file)")
    p.add_argument("files", nargs="+", type=Path, help="MIDI files")
    p.set_defaults(handler=_cmd_encode)


def _cmd_encode(args: argparse.Namespace) -> int:
    raise MidivaError("`midiva encode` is being implemented")


def _add_download_musetok_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download-musetok", help="fetch the official MuseTok tokenizer checkpoint")
    p.set_defaults(handler=_cmd_download_musetok)


def _cmd_download_musetok(args: argparse.Namespace) -> int:
    raise MidivaError("`midiva download-musetok` is being implemented")


# ---------------------------------------------------------------- training (stage: train)


def _add_train_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess-emopia", help="EMOPIA clips -> per-clip bar representations")
    p.set_defaults(handler=_cmd_preprocess_emopia)
    p = sub.add_parser("prepare-labels", help="EMOPIA quadrants -> valence/arousal label files")
    p.set_defaults(handler=_cmd_prepare_labels)
    p = sub.add_parser("train", help="train the valence/arousal MLP")
    p.set_defaults(handler=_cmd_train)
    p = sub.add_parser("evaluate", help="evaluate a model on EMOPIA's test split")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_preprocess_emopia(args: argparse.Namespace) -> int:
    raise MidivaError("`midiva preprocess-emopia` is being implemented")


def _cmd_prepare_labels(args: argparse.Namespace) -> int:
    raise MidivaError("`midiva prepare-labels` is being implemented")


def _cmd_train(args: argparse.Namespace) -> int:
    raise MidivaError("`midiva train` is being implemented")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    raise MidivaError("`midiva evaluate` is being implemented")


# ---------------------------------------------------------------- annotation (stage: annotate)


def _add_annotate_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("annotate", help="valence/arousal for every bar of a corpus -> resumable CSV")
    p.set_defaults(handler=_cmd_annotate)
    p = sub.add_parser("merge", help="combine shard outputs; check completeness and uniqueness")
    p.set_defaults(handler=_cmd_merge)


def _cmd_annotate(args: argparse.Namespace) -> int:
    raise MidivaError("`midiva annotate` is being implemented")


def _cmd_merge(args: argparse.Namespace) -> int:
    raise MidivaError("`midiva merge` is being implemented")


# ---------------------------------------------------------------- analysis (stage: analysis)


def _add_analysis_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="statistics of an annotations CSV, by genre")
    p.set_defaults(handler=_cmd_stats)
    p = sub.add_parser("plot", help="plots of an annotations CSV")
    p.set_defaults(handler=_cmd_plot)
    p = sub.add_parser("report", help="one self-contained HTML report")
    p.set_defaults(handler=_cmd_report)


def _cmd_stats(args: argparse.Namespace) -> int:
    raise MidivaError("`midiva stats` is being implemented")


def _cmd_plot(args: argparse.Namespace) -> int:
    raise MidivaError("`midiva plot` is being implemented")


def _cmd_report(args: argparse.Namespace) -> int:
    raise MidivaError("`midiva report` is being implemented")


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    global_flags(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"midiva {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    original_add = sub.add_parser

    def add_parser(name: str, **kwargs: object) -> argparse.ArgumentParser:
        kwargs.setdefault("parents", [common])
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
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

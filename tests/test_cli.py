"""The CLI contract: help, usage errors, exit codes, the subprocess entry point."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from midiva.cli import build_parser, main


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("events", "features", "encode", "train", "evaluate", "annotate", "merge", "stats", "report"):
        assert command in out


def test_usage_error_exits_two(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_missing_config_file_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "/nonexistent/midiva.toml", "events", "x.mid"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_help_runs_without_torch_import() -> None:
    code = (
        "import sys, runpy; sys.argv=['midiva','--help'];\n"
        "try:\n    runpy.run_module('midiva', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'midiva --help imported torch'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "valence" in proc.stdout.lower()


def test_import_midiva_does_not_import_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, midiva; print(midiva.__version__); assert 'torch' not in sys.modules"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_train_flag_defaults_are_the_library_defaults(tmp_path) -> None:
    """`midiva train` with no tuning flags must train exactly what TrainConfig() describes (the bundled recipe)."""
    import dataclasses

    from midiva.cli import build_parser
    from midiva.train import TrainConfig

    args = build_parser().parse_args(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m.safetensors")])
    config = TrainConfig()
    differing = {
        f.name: (getattr(args, f.name), getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.name != "device" and hasattr(args, f.name) and getattr(args, f.name) != getattr(config, f.name)
    }
    assert not differing


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(28, "No space left on device", "/data/out.csv"), "OSError: No space left on device ('/data/out.csv')"),
        (RuntimeError("boom"), "unexpected RuntimeError: boom; this is a midiva bug"),
    ],
)
def test_unmapped_errors_give_one_line_and_exit_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception, expected: str
) -> None:
    import midiva.cli as cli

    def explode(args: object) -> int:
        raise error

    monkeypatch.setattr(cli, "_cmd_events", explode)
    assert cli.main(["events", "x.mid"]) == 1
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


def test_train_refuses_an_unwritable_out_before_reading_data(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    # --data is empty: had training started, the error would be about missing labels instead.
    assert main(["train", "--data", str(tmp_path), "--out", str(blocker / "model.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "OutputError" in err and "choose a writable --out" in err


# ---------------------------------------------------------------- one contract for every subcommand

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "midiva" / "assets" / "examples"
# What each MIDI-taking subcommand writes: (kind of --out, whether `--out -` means stdout).
MIDI_COMMANDS = {
    "events": (None, False),
    "features": ("file", True),
    "encode": ("dir", False),
    "annotate": ("file", False),
    "predict": ("file", True),
}


def _argv(command: str, inputs: list[str], out: str | None, tiny_checkpoint: Path) -> list[str]:
    argv = [command, *inputs]
    if command == "encode":
        argv += ["--checkpoint", str(tiny_checkpoint)]
    return argv + (["--out", out] if out is not None else [])


def _corpus(tmp_path: Path) -> Path:
    """Two example songs, one of them in a subdirectory, plus a non-MIDI file that directories skip."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    shutil.copy(EXAMPLES / "calm_major.mid", corpus / "calm_major.mid")
    shutil.copy(EXAMPLES / "slow_minor.mid", corpus / "sub" / "slow_minor.mid")
    (corpus / "notes.txt").write_text("not a MIDI file, and not named like one")
    return corpus


class _ClosedPipe(io.StringIO):
    """stdout whose reader went away: every write raises BrokenPipeError."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


# (case, expected exit code per command); None: the case does not apply to that command.
BAD_INPUT = {
    "missing path": {"events": 1, "features": 1, "encode": 1, "annotate": 1, "predict": 1},
    "directory": {"events": 0, "features": 0, "encode": 0, "annotate": 0, "predict": 0},
    "glob pattern": {"events": 0, "features": 0, "encode": 0, "annotate": 0, "predict": 0},
    "paths on stdin": {"events": 0, "features": 0, "encode": 0, "annotate": 0, "predict": 0},
    "empty directory": {"events": 1, "features": 1, "encode": 1, "annotate": 1, "predict": 1},
    "non-MIDI file": {"events": 1, "features": 1, "encode": 1, "annotate": 1, "predict": 1},
    "broken pipe": {"events": 141, "features": 141, "encode": 141, "annotate": 141, "predict": 141},
    "unwritable output": {"events": None, "features": 1, "encode": 1, "annotate": 1, "predict": 1},
    "--out is a directory": {"events": None, "features": 2, "encode": 0, "annotate": 2, "predict": 2},
    "--out -": {"events": None, "features": 0, "encode": 2, "annotate": 2, "predict": 0},
}


@pytest.mark.parametrize(
    ("command", "case"),
    [(c, k) for k, codes in BAD_INPUT.items() for c, code in codes.items() if code is not None],
    ids=lambda x: x.replace(" ", "_"),
)
def test_every_midi_subcommand_follows_one_contract(
    command: str,
    case: str,
    tmp_path: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Inputs, exit codes and outputs are the same rule for events, features, encode, annotate and predict."""
    expected = BAD_INPUT[case][command]
    kind, _ = MIDI_COMMANDS[command]
    corpus = _corpus(tmp_path)
    out_dir = tmp_path / "out"
    default_out = None if kind is None else str(out_dir / ("x.csv" if kind == "file" else "x"))
    inputs, out, extra = [str(corpus)], default_out, []
    if case == "missing path":
        inputs = [str(corpus / "calm_major.mid"), str(tmp_path / "no-such.mid")]
    elif case == "glob pattern":
        inputs = [str(corpus / "**" / "*.mid")]
    elif case == "paths on stdin":
        inputs = ["-"]
        monkeypatch.setattr(sys, "stdin", io.StringIO(f"{corpus / 'calm_major.mid'}\n\n{corpus / 'sub'}\n"))
    elif case == "empty directory":
        (tmp_path / "empty").mkdir()
        inputs = [str(tmp_path / "empty")]
    elif case == "non-MIDI file":
        inputs = [str(corpus / "notes.txt")]
    elif case == "broken pipe":
        monkeypatch.setattr(sys, "stdout", _ClosedPipe())
        extra = ["--json"] if command in ("encode", "annotate") else []  # their stdout is JSON only
        out = None if command in ("features", "predict") else out  # data on stdout
    elif case == "unwritable output":
        (tmp_path / "a-file").write_text("x")
        out = str(tmp_path / "a-file" / "sub" / "x.csv")
    elif case == "--out is a directory":
        out_dir.mkdir()
        out = str(out_dir)
    elif case == "--out -":
        out = "-"
    code = main([*_argv(command, inputs, out, tiny_checkpoint), *extra])
    captured = capsys.readouterr()
    assert code == expected, captured.err
    assert "Traceback" not in captured.err
    if case in ("missing path", "empty directory"):
        assert not out_dir.exists(), "nothing may be written before the inputs are known"
        assert "does not exist" in captured.err or "holds no MIDI files" in captured.err
    if case in ("directory", "glob pattern", "paths on stdin"):
        assert f"{command}: 2 files done, 0 failed" in captured.err  # notes.txt is not picked up
    if case == "non-MIDI file":
        assert "nothing usable: all 1 input file(s) failed" in captured.err
        if command == "annotate":
            assert "MidiReadError" in (out_dir / "x.failures.csv").read_text()  # the failure is recorded
        if command in ("features", "predict"):
            assert not (out_dir / "x.csv").exists()  # no header-only CSV that looks like a result
    if case == "broken pipe":
        assert "ERROR" not in captured.err and "Broken pipe" not in captured.err
    if case == "unwritable output":
        assert "OutputError" in captured.err and "a-file" in captured.err
    if case == "--out is a directory" and expected == 2:
        assert "is a directory; give a file path" in captured.err
    if case == "--out -":
        if expected == 2:
            assert "'-' (stdout) is not supported here" in captured.err
        else:
            assert "calm_major" in captured.out and not (tmp_path / "-").exists()


@pytest.mark.parametrize(
    ("command", "out", "expected", "message"),
    [
        ("stats", "-", 2, "'-' (stdout) is not supported here"),
        ("plot", "-", 2, "'-' (stdout) is not supported here"),
        ("report", "-", 0, ""),
        ("stats", "a-file", 1, "OutputError: cannot create output directory"),
        ("report", "a-file/sub", 1, "OutputError"),
        ("plot", "new/nested/dir", 0, ""),
    ],
)
def test_analysis_subcommands_follow_the_output_rule(
    command: str, out: str, expected: int, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "a.csv"
    table.write_text("md5,bar_number,valence,arousal\n" + "".join(f"{'a' * 32},{i},0.{i},-0.{i}\n" for i in range(9)))
    (tmp_path / "a-file").write_text("x")
    target = out if out == "-" else str(tmp_path / out)
    assert main([command, str(table), "--out", target, "--n-boot", "50"]) == expected
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    if command == "report" and out == "-":
        assert captured.out.startswith("<!doctype html>")


def test_a_real_closed_pipe_ends_quietly(gigamidi_sample: Path) -> None:
    """`midiva features DIR | head -1`: exit 141, no 'Broken pipe' error, no traceback at shutdown."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "midiva", "features", str(gigamidi_sample)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline().startswith(b"file,md5,bar_number,")
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert b"Broken pipe" not in err and b"Traceback" not in err and b"Exception ignored" not in err


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_subcommand_help_has_a_description_and_an_example(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([name, "--help"]) == 0
    text = capsys.readouterr().out
    description = _subcommands()[name].description or ""
    assert len(description.split()) >= 15 and description.rstrip().endswith((".", ")")), description
    assert " ".join(description.split()[:6]) in " ".join(text.split())
    example = [line for line in text.splitlines() if line.startswith("example: ")]
    assert len(example) == 1 and example[0].split()[1:3] == ["midiva", name]
    assert "--json" in text  # the one JSON rule applies everywhere


def test_json_goes_to_stdout_only_with_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "a.csv"
    assert main(["annotate", str(EXAMPLES), "--out", str(out)]) == 0
    first = capsys.readouterr()
    assert first.out == ""  # stdout is not a terminal here, and still no JSON without --json
    assert "annotate: 5 files done, 0 failed" in first.err and "bars/s" in first.err and str(out) in first.err
    assert main(["annotate", str(EXAMPLES), "--out", str(out), "--json"]) == 0
    again = capsys.readouterr()
    summary = json.loads(again.out)
    assert summary["files_skipped_done"] == 5 and summary["files_done"] == 0
    assert "5 skipped (done before" in again.err
    assert (out.parent / "a.run.json").is_file() and not (out.parent / "run.json").exists()


def test_annotate_progress_total_is_known_for_files_and_parquet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gigamidi_sample: Path
) -> None:
    import midiva.annotate as annotate
    from midiva.annotate import AnnotateOptions
    from midiva.runner import progress_bar

    seen: list[int | None] = []
    real = annotate.annotate_stream

    def spy(rows: object, out: object, regressor: object, **kwargs: object) -> object:
        seen.append(kwargs["options"].total_files)  # type: ignore[attr-defined]
        return real(rows, out, regressor, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(annotate, "annotate_stream", spy)
    assert main(["-q", "annotate", str(EXAMPLES), "--out", str(tmp_path / "a" / "a.csv")]) == 0
    import pyarrow as pa
    import pyarrow.parquet as pq

    music = [p.read_bytes() for p in sorted(EXAMPLES.glob("*.mid"))]
    pq.write_table(pa.table({"music": music[:3]}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"music": music[3:]}), tmp_path / "test.parquet")
    assert (
        main(["-q", "annotate", "--dataset", str(tmp_path), "--split", "test", "--out", str(tmp_path / "b" / "b.csv")])
        == 0
    )
    assert seen == [5, 2]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for total, shown in ((None, "annotate (unknown total): 0file"), (7, "annotate:   0%|")):
        monkeypatch.setattr(sys, "stderr", Terminal())
        bar = progress_bar(AnnotateOptions(total_files=total))
        bar.refresh()
        assert bar.total == total and shown in sys.stderr.getvalue()  # type: ignore[attr-defined]
        bar.close()


def test_a_hub_start_that_fails_leaves_no_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import datasets

    class ConnectionError(Exception):  # the name the hub error mapping looks for
        pass

    def offline(*args: object, **kwargs: object) -> object:
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    out = tmp_path / "giga" / "annotations.csv"
    assert main(["annotate", "--dataset", "Metacreation/GigaMIDI", "--out", str(out)]) == 1
    assert "cannot reach the Hugging Face hub" in capsys.readouterr().err
    assert not out.parent.exists()


def test_inputs_expand_directories_globs_and_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from midiva.cli import midi_inputs
    from midiva.errors import SourceError

    corpus = _corpus(tmp_path)
    expected = [corpus / "calm_major.mid", corpus / "sub" / "slow_minor.mid"]
    assert midi_inputs([corpus]) == expected
    assert midi_inputs([str(corpus / "**" / "*.mid")]) == expected
    assert midi_inputs([str(corpus / "*")]) == expected  # a pattern, like a directory, keeps MIDI files only
    assert midi_inputs([corpus / "notes.txt"]) == [corpus / "notes.txt"]  # a file named explicitly is kept
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{expected[1]}\n{corpus}\n"))
    assert midi_inputs(["-"]) == [expected[1], *expected]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    with pytest.raises(SourceError, match="stdin listed none"):
        midi_inputs(["-"])
    with pytest.raises(SourceError, match="matches no MIDI files"):
        midi_inputs([str(corpus / "*.kar")])

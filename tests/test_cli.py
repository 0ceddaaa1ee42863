"""The CLI contract: help, usage errors, exit codes, the subprocess entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest

from midiva.cli import main


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

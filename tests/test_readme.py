"""The README's contract: two set-up commands; .ci/run runs the test one verbatim; the main one works."""

from __future__ import annotations

import csv
import re
import shlex
from pathlib import Path

import pytest

from midiva.cli import main

REPO = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_opens_with_exactly_two_setup_commands() -> None:
    commands = _setup_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands), "each set-up command is one line"
    assert "midiva annotate" in commands[0]
    assert "torch==2.13.0" in commands[0]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = _setup_commands()[1]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert test_command in lines


def test_readme_main_command_runs_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the `midiva ...` half of the first command, as written, from a copy of the repo root."""
    command = _setup_commands()[0].split("&&", 1)[1].strip()
    argv = shlex.split(command)
    assert argv[0] == "midiva"
    monkeypatch.chdir(REPO)
    out_index = argv.index("--out") + 1
    assert Path(argv[out_index]).parent != Path("."), "the main job writes into a directory it names, not the repo root"
    out = tmp_path / Path(argv[out_index]).name
    argv[out_index] = str(out)
    assert main([*argv[1:], "--quiet"]) == 0
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows, "the example run wrote no rows"
    assert list(rows[0]) == ["md5", "bar_number", "valence", "arousal"]
    assert all(-1.0 <= float(r["valence"]) <= 1.0 and -1.0 <= float(r["arousal"]) <= 1.0 for r in rows)
    n_examples = len(list((REPO / "src" / "midiva" / "assets" / "examples").glob("*.mid")))
    assert len({r["md5"] for r in rows}) == n_examples


def _section(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]


def _in_scratch_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run README snippets from a scratch directory that sees the repo's src/ (so out/ lands there)."""
    (tmp_path / "src").symlink_to(REPO / "src")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("title", ["From MIDI to bars", "Predictions of a few files"])
def test_readme_python_examples_run(title: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Python snippet of these sections runs as written (their asserts check what the prose says)."""
    _in_scratch_copy(tmp_path, monkeypatch)
    blocks = re.findall(r"```python\n(.*?)```", _section(title), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, f"README.md ({title})", "exec"), {"__name__": "readme"})


def test_readme_predict_commands_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _in_scratch_copy(tmp_path, monkeypatch)
    block = re.findall(r"```bash\n(.*?)```", _section("Predictions of a few files"), flags=re.S)[0]
    commands = [shlex.split(line) for line in block.strip().splitlines()]
    assert [c[:2] for c in commands] == [["midiva", "predict"]] * 2
    for argv in commands:
        assert main(argv[1:]) == 0
    printed = capsys.readouterr().out
    assert "bar_number" in printed and "calm_major" in printed
    assert (tmp_path / "out" / "calm_major.png").read_bytes()[:4] == b"\x89PNG"
    with (tmp_path / "out" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file", "md5", "bar_number", "start_tick", "start_seconds", "valence", "arousal"]
    assert len({r["md5"] for r in rows}) == len(list((REPO / "src" / "midiva" / "assets" / "examples").glob("*.mid")))

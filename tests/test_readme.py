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

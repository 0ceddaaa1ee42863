"""`--help` states the defaults the commands really use, for every subcommand."""

from __future__ import annotations

import argparse
import os
import re

import pytest

from midiva.cli import build_parser, main
from midiva.config import resolve_settings
from midiva.runner import default_num_workers as _auto_num_workers

SETTINGS_FLAGS = {
    "--backend": "backend",
    "--num-workers": "num_workers",
    "--batch-size": "batch_size",
    "--device": "device",
    "--cpu-threads": "cpu_threads",
}
# Where a command decides itself when the setting is unset anywhere (flag, env, file), what it does.
DECIDED_BY_COMMAND = {
    ("annotate", "--backend"): "the model's",
    ("annotate", "--num-workers"): "0 below 64 files, else min(4, CPUs - 1)",
    ("train", "--backend"): "the one the data was preprocessed with",
    ("encode", "--backend"): "musetok",  # encode's own flag: MuseTok latents are all it writes
}


def _subcommands() -> list[str]:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def _help_defaults(command: str, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """flag -> the default its --help entry states (whitespace from line wrapping collapsed)."""
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    entries = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    out = {}
    for entry in filter(str.strip, entries):
        flag = entry.split()[0].rstrip(",")
        found = re.search(r"default:? (.*)\)\s*$", " ".join(entry.split()))
        if flag in SETTINGS_FLAGS and found:
            out[flag] = found.group(1)
    return out


def test_help_shows_the_default_each_command_uses(capsys: pytest.CaptureFixture[str]) -> None:
    resolved = resolve_settings({}, {}, None).settings  # nothing given: what every command starts from
    checked = set()
    for command in _subcommands():
        for flag, stated in _help_defaults(command, capsys).items():
            expected = DECIDED_BY_COMMAND.get((command, flag), str(getattr(resolved, SETTINGS_FLAGS[flag])))
            assert stated == expected, f"midiva {command} --help says {flag} defaults to {stated!r}"
            checked.add((command, flag))
    assert set(DECIDED_BY_COMMAND) <= checked
    assert {("encode", "--num-workers"), ("preprocess-emopia", "--backend"), ("annotate", "--cpu-threads")} <= checked


def test_annotate_worker_default_is_what_its_help_says() -> None:
    assert _auto_num_workers(63) == 0 and _auto_num_workers(0) == 0
    many = min(4, max(0, (os.cpu_count() or 1) - 1))
    assert (
        _auto_num_workers(64) == many and _auto_num_workers(None) == many
    )  # a stream of unknown length counts as large


def test_annotate_backend_default_is_the_models() -> None:
    from midiva.annotate import load_annotation_model
    from midiva.model import load_regressor

    assert load_annotation_model(None, backend=None).backend == load_regressor().backend

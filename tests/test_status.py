"""`midiva status`: where each output stands (complete, running, stopped, not started, damaged)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from midiva.annotate import AnnotateOptions, annotate_stream
from midiva.cli import main
from midiva.ledger import output_paths
from midiva.lock import acquire_output_lock, lock_path_for
from midiva.sources import iter_files, list_midi_files
from midiva.status import output_status


class Features:
    backend = "features"

    def make_inputs(self, features: Any = None, latents: Any = None) -> np.ndarray:
        return np.asarray(features, np.float32)

    def predict(self, inputs: Any, *, batch_size: int = 4096, device: Any = "cpu") -> np.ndarray:
        return np.tanh(np.asarray(inputs, np.float32)[:, :2] / 100)


def test_status_of_each_kind_of_output(
    tmp_path: Path, gigamidi_sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = list_midi_files([gigamidi_sample])
    done = tmp_path / "done" / "a.csv"
    full = annotate_stream(iter_files(files), done, Features(), options=AnnotateOptions(num_shards=2, shard_index=1))
    stopped = tmp_path / "stopped" / "a.csv"
    annotate_stream(iter_files(files), stopped, Features(), options=AnnotateOptions(limit=3))
    running = tmp_path / "running" / "a.csv"
    annotate_stream(iter_files(files), running, Features(), options=AnnotateOptions(limit=2))
    damaged = tmp_path / "damaged" / "a.csv"
    annotate_stream(iter_files(files[:2]), damaged, Features())
    output_paths(damaged).ledger.write_bytes(b"not a ledger\n")
    dead = tmp_path / "dead" / "a.csv"
    annotate_stream(iter_files(files[:2]), dead, Features(), options=AnnotateOptions(limit=1))
    record = {
        "midiva_lock": 1,
        "pid": 2**22 + 12345,
        "host": socket.gethostname(),
        "started": "then",
        "process_start": None,
        "label": "",
        "out": str(dead),
    }
    lock_path_for(dead).write_text(json.dumps(record))
    missing = tmp_path / "missing" / "a.csv"

    with acquire_output_lock(running, label="shard 0 of 1, Slurm job 7_0"):
        statuses = {p: output_status(p) for p in (done, stopped, running, damaged, dead, missing)}
        assert main(["status", *map(str, statuses)]) == 0
        table = capsys.readouterr().out
        assert main(["status", "--json", str(running)]) == 0
        as_json = json.loads(capsys.readouterr().out)
    assert {p: s.state for p, s in statuses.items()} == {
        done: "complete",
        stopped: "stopped",
        running: "running",
        damaged: "damaged",
        dead: "stopped",
        missing: "not started",
    }
    assert statuses[done].shard == "1/2" and statuses[done].files == full.total_files
    assert statuses[done].bars == full.total_bars and statuses[done].failed == full.files_failed
    assert statuses[stopped].files == 3 and statuses[stopped].last_run["complete"] is False
    assert statuses[running].holder.startswith(f"PID {os.getpid()} on host {socket.gethostname()} (shard 0 of 1")
    assert statuses[running].holder_alive is True and statuses[dead].holder_alive is False
    assert as_json["state"] == "running" and as_json["holder_alive"] is True
    lines = table.splitlines()
    assert len(lines) == 8 and lines[-1].startswith("total")
    assert "1 complete, 1 running, 2 stopped, 1 not started, 1 damaged" in lines[-1]
    assert f"{full.total_bars:,}" in table and "not running" in table

"""One writer per output: the lock refuses a second live process, names it, survives kill -9, and
never trusts a lock file that is not its own; a stop signal commits what is done and exits."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from midiva import lock as lock_mod
from midiva.annotate import AnnotateOptions, annotate_stream
from midiva.errors import OutputError, OutputLockedError
from midiva.ledger import output_paths
from midiva.lock import acquire_output_lock, lock_path_for, read_holder
from midiva.sources import iter_files, list_midi_files

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "src" / "midiva" / "assets" / "examples"
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}


def output_bytes(out: Path) -> list[bytes]:
    paths = output_paths(out)
    return [p.read_bytes() for p in (*paths.tables, paths.ledger)]


def annotate_command(corpus: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "midiva",
        "-v",
        "--json",
        "annotate",
        str(corpus),
        "--out",
        str(out),
        "--commit-interval",
        "0",
        "--batch-size",
        "64",
        "--num-workers",
        "0",
    ]


def wait_for_holder(out: Path, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Until `proc` holds the lock and has committed a file (it is mid-run then)."""
    deadline = time.monotonic() + timeout_s
    ledger = output_paths(out).ledger
    while time.monotonic() < deadline:
        holder, _ = read_holder(out)
        if holder is not None and holder.pid == proc.pid and ledger.exists() and ledger.read_bytes().count(b"\n") > 1:
            return
        assert proc.poll() is None, "the first run ended before it was caught holding the lock"
        time.sleep(0.001)
    raise AssertionError("the first run never took the lock")


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, gigamidi_sample: Path) -> Path:
    """An uninterrupted run on the GigaMIDI sample."""
    out = tmp_path_factory.mktemp("clean") / "a.csv"
    subprocess.run(annotate_command(gigamidi_sample, out), check=True, env=ENV, capture_output=True, timeout=120)
    assert not lock_path_for(out).exists(), "a finished run removes its lock file"
    return out


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(
    tmp_path: Path, gigamidi_sample: Path, clean: Path
) -> None:
    out = tmp_path / "shared" / "a.csv"
    first = subprocess.Popen(
        annotate_command(gigamidi_sample, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_holder(out, first)
        first.send_signal(signal.SIGSTOP)  # alive, holding the lock, mid-run
        before = output_bytes(out)
        run_json = (out.parent / f"{out.stem}.run.json").read_bytes()
        second = subprocess.run(
            annotate_command(gigamidi_sample, out), env=ENV, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 1, second.stderr
        assert f"is being written by PID {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "OutputLockedError" in second.stderr and "Traceback" not in second.stderr
        assert output_bytes(out) == before, "the refused run changed the outputs"
        assert (out.parent / f"{out.stem}.run.json").read_bytes() == run_json, (
            "the refused run overwrote the holder's run.json"
        )
        first.send_signal(signal.SIGKILL)  # dies holding the lock: its lock file stays behind
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    holder, _ = read_holder(out)
    assert holder is not None and holder.pid == first.pid
    third = subprocess.run(annotate_command(gigamidi_sample, out), env=ENV, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert f"taking over the lock of {out}" in third.stderr and "is no longer running" in third.stderr
    assert output_bytes(out) == output_bytes(clean), "the resumed run differs from an uninterrupted one"
    assert not lock_path_for(out).exists()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_commits_what_is_done_and_a_rerun_completes(
    tmp_path: Path, gigamidi_sample: Path, clean: Path, stop: signal.Signals
) -> None:
    out = tmp_path / "a.csv"
    run = subprocess.Popen(
        annotate_command(gigamidi_sample, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_holder(out, run)
        run.send_signal(signal.SIGSTOP)  # mid-run, so that the stop cannot land after the end
        run.send_signal(stop)
        run.send_signal(signal.SIGCONT)
        stdout, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 128 + stop, stderr
    summary = json.loads(stdout)
    committed = int(re.search(rf"stopped by {stop.name} after committing (\d+) files", stderr).group(1))  # type: ignore[union-attr]
    assert 0 < committed < 30 and summary["total_files"] == committed and summary["complete"] is False
    assert "stop requested: committing the files parsed so far" in stderr
    assert b"#complete" not in output_paths(out).ledger.read_bytes() and not lock_path_for(out).exists()
    rerun = subprocess.run(annotate_command(gigamidi_sample, out), env=ENV, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["files_skipped_done"] == committed
    assert output_bytes(out) == output_bytes(clean), "stop and resume differ from an uninterrupted run"


_CONTENDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from midiva.errors import OutputLockedError
    from midiva.lock import acquire_output_lock

    target, counter, start = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    while time.time() < start:
        time.sleep(0.001)
    won = refused = 0
    while won + refused < 40:
        try:
            lock = acquire_output_lock(target, label="contender")
        except OutputLockedError:
            refused += 1
            continue
        with lock:  # a read-modify-write that loses counts if two processes ever overlap
            value = int(counter.read_text())
            time.sleep(0.0005)
            counter.write_text(str(value + 1))
        won += 1
    print(won, refused)
    """
)


def test_the_lock_is_exclusive_between_concurrent_processes(tmp_path: Path) -> None:
    target, counter = tmp_path / "a.csv", tmp_path / "counter"
    counter.write_text("0")
    start = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, str(target), str(counter), str(start)],
            env=ENV,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    results = [tuple(map(int, p.communicate(timeout=60)[0].split())) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    won = sum(r[0] for r in results)
    assert sum(r[1] for r in results) > 0, "the processes never contended for the lock"
    assert won > 0 and int(counter.read_text()) == won, "two processes held the lock at once"
    assert not lock_path_for(target).exists()


def test_a_foreign_or_damaged_lock_file_is_reported_and_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "a.csv"
    for content in (b"pid=123\n", b'{"midiva_lock": 1, "pid": 12'):
        lock_path_for(target).write_bytes(content)
        with pytest.raises(OutputError, match="is not a midiva lock record") as caught:
            acquire_output_lock(target)
        assert "a.csv.lock" in str(caught.value) and "delete" in str(caught.value)
        assert lock_path_for(target).read_bytes() == content


def test_a_live_process_writing_without_the_lock_is_refused_and_a_reused_pid_is_not(tmp_path: Path) -> None:
    target = tmp_path / "a.csv"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.05)
        record = {
            "midiva_lock": 1,
            "pid": sleeper.pid,
            "host": socket.gethostname(),
            "started": "then",
            "process_start": lock_mod._process_start(sleeper.pid),
            "label": "no-lock run",
            "out": str(target),
        }
        lock_path_for(target).write_text(json.dumps(record))
        with pytest.raises(OutputLockedError, match=f"PID {sleeper.pid} on host .* without holding its lock"):
            acquire_output_lock(target)
        record["process_start"] = int(record["process_start"]) + 1  # the same PID, another process
        lock_path_for(target).write_text(json.dumps(record))
        with acquire_output_lock(target, label="mine") as held:
            holder, _ = read_holder(target)
            assert held.held and holder is not None and holder.pid == os.getpid() and holder.label == "mine"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_filesystem_without_locks_is_a_clear_error_with_an_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "a.csv"
    files = list_midi_files([EXAMPLES])
    with pytest.raises(OutputError, match=r"does not support file locks .*pass --no-lock"):
        annotate_stream(iter_files(files), out, _Features())
    assert not out.exists()
    with caplog.at_level(logging.WARNING, logger="midiva"):
        summary = annotate_stream(iter_files(files), out, _Features(), options=AnnotateOptions(lock=False))
    assert summary.files_done == len(files)
    assert "not locking" in caplog.text and "make sure no other process writes it" in caplog.text


class _Features:
    """The smallest regressor: valence and arousal from two feature columns."""

    backend = "features"

    def make_inputs(self, features: object = None, latents: object = None) -> object:
        import numpy as np

        return np.asarray(features, np.float32)

    def predict(self, inputs: object, *, batch_size: int = 4096, device: object = "cpu") -> object:
        import numpy as np

        x = np.asarray(inputs, np.float32)
        return np.tanh(x[:, :2] / 100).astype(np.float32)

"""The README's Slurm recipe, scaled down, under a real Slurm: an array of 4 shards over the GigaMIDI
sample plus EMOPIA, every task interrupted a different way, then `midiva merge`; the merged tables
must hold exactly the rows of a one-process run."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from slurm_harness import SlurmCluster

from midiva.ledger import output_paths
from midiva.lock import read_holder

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SHARDS = 4
# The README's script, scaled down: each replacement must match exactly once, so the test breaks
# when the README changes and keeps proving what the README says.
SCALE_DOWN = (
    ("--array=0-15", f"--array=0-{SHARDS - 1}"),
    ("--num-shards 16", f"--num-shards {SHARDS}"),
    ("--cpus-per-task=16", "--cpus-per-task=1"),
    ("--time=04:00:00", "--time=00:10:00"),
)
# Test instrumentation in front of the real midiva: commit after every batch (so that a stop lands
# mid-run), log at INFO, and let the first run of task 3 escape Slurm's process tracking (setsid), as
# a process does on a node that lost contact with the controller.
WRAPPER = """#!/bin/bash
extra=()
if [ "$1" = annotate ]; then extra=(--commit-interval 0 --batch-size 64 -v); fi
if [ -e "$ESCAPE_DIR/escape-$SLURM_ARRAY_TASK_ID" ]; then
  rm "$ESCAPE_DIR/escape-$SLURM_ARRAY_TASK_ID"
  exec setsid -w {python} -m midiva "$@" "${{extra[@]}}"
fi
exec {python} -m midiva "$@" "${{extra[@]}}"
"""


def readme_job_script(data: Path) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Many machines", 1)[1].split("\n## ", 1)[0]
    script = re.findall(r"```bash\n(#!/bin/bash\n.*?)```", section, flags=re.S)
    assert len(script) == 1, "the README's Slurm section must hold one #!/bin/bash job script"
    job = script[0]
    for old, new in (*SCALE_DOWN, ("/shared/GigaMIDI/v1.0.0", str(data))):
        assert job.count(old) == 1, f"the README's job script no longer contains {old!r} once"
        job = job.replace(old, new)
    return job


def build_parquet(root: Path, files: list[Path]) -> Path:
    """GigaMIDI-style local parquet (md5, music, title) of `files`."""
    records = []
    for path in files:
        data = path.read_bytes()
        records.append({"md5": hashlib.md5(data).hexdigest(), "music": data, "title": path.stem})
    (root / "train").mkdir(parents=True)
    schema = pa.schema([("md5", pa.string()), ("music", pa.binary()), ("title", pa.string())])
    pq.write_table(pa.Table.from_pylist(records, schema), root / "train" / "part-0.parquet")
    return root


def wait_until(condition: Callable[[], object], what: str, timeout_s: float, cluster: SlurmCluster) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.002)
    raise AssertionError(
        f"timed out after {timeout_s:.0f} s waiting for {what}\n{cluster.run('squeue', '-r', '-t', 'all')}"
    )


def signal_pending(pid: int, signum: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    pending = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return bool(pending >> (signum - 1) & 1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A dead process not reaped by its parent (PID 1 of a container may not reap) is a zombie.
    return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)[1:]


def test_readme_slurm_recipe_with_requeues_matches_a_one_process_run(
    slurm_cluster: SlurmCluster, tmp_path: Path, gigamidi_sample: Path, emopia_dir: Path
) -> None:
    cluster = slurm_cluster
    files = sorted(gigamidi_sample.glob("*.mid")) + sorted((emopia_dir / "midis").glob("*.mid"))
    data = build_parquet(tmp_path / "data", files)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "midiva").write_text(WRAPPER.format(python=sys.executable))
    (bin_dir / "midiva").chmod(0o755)
    env = {
        **cluster.env,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO / "src"),
        "ESCAPE_DIR": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
    }
    reference = tmp_path / "one-process" / "annotations.csv"
    one_process = subprocess.Popen(
        [sys.executable, "-m", "midiva", "-q", "annotate", "--dataset", str(data), "--out", str(reference)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    (tmp_path / "annotate.sbatch").write_text(readme_job_script(data))
    (tmp_path / "giga" / "logs").mkdir(parents=True)
    (tmp_path / "escape-3").touch()
    job = cluster.run("sbatch", "--parsable", "annotate.sbatch", cwd=tmp_path, env=env).strip()
    shard_csv = [tmp_path / "giga" / f"shard-{i}" / "annotations.csv" for i in range(SHARDS)]

    def task(i: int) -> dict[str, str]:
        return cluster.job_fields(f"{job}_{i}")

    def log(i: int) -> str:
        return (tmp_path / "giga" / "logs" / f"{job}_{i}.log").read_text(errors="replace")

    def mid_run_pid(i: int) -> int | None:
        holder, _ = read_holder(shard_csv[i])
        ledger = output_paths(shard_csv[i]).ledger
        if holder is None or f"Slurm job {job}_{i}" not in holder.label or not ledger.exists():
            return None
        return holder.pid if ledger.read_bytes().count(b"\n") > 1 else None

    # Catch each task's first run mid-run (a file committed) and freeze it there, so that every
    # interruption below lands while the run is going on, however fast the machine is.
    pids: dict[int, int] = {}

    def all_frozen() -> bool:
        for i in set(range(SHARDS)) - set(pids):
            pid = mid_run_pid(i)
            if pid is not None:
                os.kill(pid, signal.SIGSTOP)
                pids[i] = pid
        return len(pids) == SHARDS

    wait_until(all_frozen, "all 4 tasks to commit their first files", 90, cluster)
    for i in range(SHARDS):
        assert b"#complete" not in output_paths(shard_csv[i]).ledger.read_bytes(), f"task {i} finished before the stop"
    try:
        # Task 0: USR1 to the batch shell, as `--signal=B:USR1@300` sends it; the trap forwards it and requeues.
        cluster.run("scancel", "--batch", "--signal=USR1", f"{job}_0")
        wait_until(lambda: signal_pending(pids[0], signal.SIGUSR1), "the trap to forward USR1", 30, cluster)
        os.kill(pids[0], signal.SIGCONT)
        # Task 1: requeued while running (Slurm sends SIGCONT and SIGTERM, then SIGKILL after KillWait).
        cluster.run("scontrol", "requeue", f"{job}_1")
        # Task 2: its midiva killed; the task ends FAILED and is requeued by hand.
        os.kill(pids[2], signal.SIGKILL)
        wait_until(lambda: task(2)["JobState"] == "FAILED", "task 2 to fail", 30, cluster)
        cluster.run("scontrol", "requeue", f"{job}_2")
        # Task 3: requeued while its old process (escaped from Slurm, hung) still holds the output.
        before = [p.read_bytes() for p in (*output_paths(shard_csv[3]).tables, output_paths(shard_csv[3]).ledger)]
        cluster.run("scontrol", "requeue", f"{job}_3")
        wait_until(
            lambda: task(3)["Restarts"] == "1" and task(3)["JobState"] == "FAILED",
            "task 3's second run to be refused",
            60,
            cluster,
        )
        host = socket.gethostname()
        assert f"is being written by PID {pids[3]} on host {host} (shard 3 of 4, Slurm job {job}_3)" in log(3)
        assert task(3)["ExitCode"] == "1:0"
        after = [p.read_bytes() for p in (*output_paths(shard_csv[3]).tables, output_paths(shard_csv[3]).ledger)]
        assert after == before, "the refused run wrote to an output another process holds"
        assert alive(pids[3])
        os.kill(pids[3], signal.SIGKILL)  # the hung process finally dies (the node reboots, say)
        wait_until(lambda: not alive(pids[3]), "the old process of task 3 to die", 10, cluster)
        cluster.run("scontrol", "requeue", f"{job}_3")

        def all_completed() -> bool:
            return all(task(i)["JobState"] == "COMPLETED" for i in range(SHARDS))

        wait_until(all_completed, "every task to complete", 90, cluster)
    finally:
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert [task(i)["Restarts"] for i in range(SHARDS)] == ["1", "1", "1", "2"]
    assert "stopped by SIGUSR1 after committing" in log(0)
    assert "stopped by SIGTERM after committing" in log(1), log(1)
    assert "taking over the lock" in log(3) and "is no longer running" in log(3)
    for i in range(SHARDS):
        assert not (shard_csv[i].parent / "annotations.csv.lock").exists()
    status = subprocess.run(
        [sys.executable, "-m", "midiva", "status", *map(str, shard_csv)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert status.count("\ncomplete ") == SHARDS and f"{SHARDS} complete" in status, status

    merged = tmp_path / "giga" / "annotations.csv"
    subprocess.run(
        [sys.executable, "-m", "midiva", "merge", *map(str, shard_csv), "--out", str(merged)],
        env=env,
        check=True,
        capture_output=True,
    )
    assert one_process.wait(timeout=120) == 0
    ref, out = output_paths(reference), output_paths(merged)
    rows = read_lines(out.csv)
    assert sorted(rows) == sorted(read_lines(ref.csv)), "the merged rows differ from the one-process run"
    bars: dict[bytes, int] = {}
    previous = b""
    for line in rows:  # every file once, its bars contiguous and in order
        md5, bar = line.split(b",")[:2]
        if md5 != previous:
            assert md5 not in bars, f"rows of {md5!r} are split or repeated"
            bars[md5] = 0
            previous = md5
        assert int(bar) == bars[md5]
        bars[md5] += 1
    assert sorted(read_lines(out.meta)) == sorted(read_lines(ref.meta))
    assert sorted(read_lines(out.failures)) == sorted(read_lines(ref.failures))
    assert len(read_lines(out.meta)) == len(files)

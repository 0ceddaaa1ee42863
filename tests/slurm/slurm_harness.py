"""A private single-node Slurm (22.05, Debian's packages) for the tests marked `slurm`.

It installs slurmctld, slurmd, slurm-client and munge when they are absent (as root, apt-get),
starts munged, slurmctld and slurmd in the foreground from a temporary directory (config, state,
spool, logs, sockets; free ports, no systemd, no cgroups), and stops every daemon it started by
PID at the end. Where Slurm is absent and cannot be installed, the tests fail and say why (deselect
them with `-m "not slurm"`), rather than passing without having run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged", "mungekey")
CPUS = 8  # more than this machine may have (config_overrides): four 1-CPU tasks always run at once
GPUS = 4  # gres without device files: enough for `--gres=gpu:1` per task to schedule


def _missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]


def ensure_slurm_installed() -> None:
    """Install Debian's Slurm and munge when absent; pytest.fail with the reason when that is impossible."""
    if not _missing_commands():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(
            f"Slurm is not installed ({', '.join(_missing_commands())} missing) and cannot be installed here "
            f"(needs root and apt-get): install {' '.join(PACKAGES)} or deselect these tests with -m 'not slurm'",
            pytrace=False,
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            pytest.fail(
                f"could not install Slurm: {' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}",
                pytrace=False,
            )
    if _missing_commands():
        pytest.fail(f"Slurm installed but {_missing_commands()} are still missing", pytrace=False)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """One controller and one node, `localhost`, all state under `root`; clients use `self.env`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}

    def write_config(self) -> None:
        ctld_port, d_port = _free_ports(2)
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(mode=0o755)
        r = self.root
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=midiva-test",
                    "SlurmctldHost=localhost(127.0.0.1)",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={d_port}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire is also how long a requeued job waits before it starts again (5 is the minimum).
                    f"AuthInfo=socket={r}/munge/munge.socket,cred_expire=5",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool",
                    f"SlurmctldPidFile={r}/slurmctld.pid",
                    f"SlurmdPidFile={r}/slurmd.pid",
                    f"SlurmctldLogFile={r}/slurmctld.log",
                    f"SlurmdLogFile={r}/slurmd.log",
                    "ProctrackType=proctrack/pgid",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerType=sched/builtin",
                    "SlurmdParameters=config_overrides",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "MinJobAge=3600",  # keep finished jobs visible to scontrol (there is no slurmdbd for sacct)
                    "KillWait=10",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "GresTypes=gpu",
                    f"NodeName=localhost CPUs={CPUS} Gres=gpu:{GPUS} State=UNKNOWN",
                    "PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        # slurmd drops GPUs without device files; links to /dev/null are character devices to it.
        (self.root / "dev").mkdir()
        for i in range(GPUS):
            (self.root / "dev" / f"gpu{i}").symlink_to("/dev/null")
        (self.root / "gres.conf").write_text(f"NodeName=localhost Name=gpu File={r}/dev/gpu[0-{GPUS - 1}]\n")

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.stderr", "wb")  # noqa: SIM115 - kept open for the daemon's life
        self.daemons[name] = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def start(self) -> None:
        self.write_config()
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        m = self.root / "munge"
        self._start(
            "munged",
            [
                _sbin("munged"),
                "--foreground",
                "--force",
                f"--socket={m}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed",
            ],
        )
        self._wait_for(lambda: (m / "munge.socket").exists(), "munged to open its socket")
        self._start("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._start("slurmd", [_sbin("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait_for(self._node_idle, "the node to become idle")

    def _node_idle(self) -> bool:
        done = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True, check=False
        )
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def _wait_for(self, ready: object, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n{self.logs()}")
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("munge/*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def run(self, *argv: str, check: bool = True, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
        """A Slurm client command against this cluster; its stdout."""
        done = subprocess.run(
            list(argv), env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
        return done.stdout

    def job_fields(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "-o", "show", "job", job)
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def stop(self) -> None:
        """Cancel what still runs, then stop each daemon this cluster started, by its PID."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.run("scancel", "--user", str(os.getuid()), check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).strip():
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.daemons.get(name)
            if proc is None or proc.poll() is not None:
                continue
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

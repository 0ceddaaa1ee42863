"""Fixtures of the tests marked `slurm`: a private Slurm cluster (see `slurm_harness`)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_harness import SlurmCluster, ensure_slurm_installed


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    ensure_slurm_installed()
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="midiva-slurm-")))  # short: socket paths <= 107 bytes
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)

"""The local Slurm cluster (tests/slurm/cluster.sh) as a session fixture.

Job helpers (sbatch, wait_job, ...) live in slurm_jobs.py: import them from there, not from
conftest, whose module name other test directories share.

The cluster is brought up once per session and torn down at the end only if this session
started it. Without root or the Debian packages the slurm tests skip, except in CI (CI=true),
where a missing cluster is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from slurm_jobs import REPO

CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
STATE_DIR = Path(os.environ.get("GPTV_SLURM_DIR", "/tmp/gpt_vision_slurm"))
NODES = ("127.0.0.1", "127.0.0.2")
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "sbatch", "sacct")


@dataclass
class SlurmCluster:
    state_dir: Path
    nodes: tuple[str, ...]
    started_here: bool


def _cannot_run(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"Slurm cluster unavailable in CI: {reason}")
    pytest.skip(f"Slurm cluster unavailable: {reason}")


def _cluster(command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), command], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "GPTV_SLURM_DIR": str(STATE_DIR)},
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        _cannot_run("tests/slurm/cluster.sh must run as root")
    missing = [d for d in DAEMONS if not shutil.which(d, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing and os.environ.get("CI") != "true":  # in CI, cluster.sh installs them
        pytest.skip(f"Slurm cluster unavailable: missing {', '.join(missing)} (apt-get install munge "
                    "slurmctld slurmd slurm-client slurmdbd mariadb-server-core mariadb-client-core)")
    already_up = _cluster("status", timeout=60).returncode == 0
    up = _cluster("up", timeout=600)
    if up.returncode != 0:
        last = (up.stderr.strip().splitlines() or ["no output"])[-1]
        _cannot_run(f"tests/slurm/cluster.sh up failed: {last} (logs in {STATE_DIR}/log)")
    cluster = SlurmCluster(STATE_DIR, NODES, started_here=not already_up)
    yield cluster
    if cluster.started_here:
        _cluster("down", timeout=300)

"""Submit and watch jobs on the local Slurm cluster (see conftest.slurm_cluster)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
}


def sbatch(script: str | os.PathLike, *options: str, **env: object) -> int:
    """Submit `script` with sbatch `options`; `env` is added to the job's environment. Returns the job id."""
    out = subprocess.run(
        ["sbatch", "--parsable", *options, str(script)],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, **{k: str(v) for k, v in env.items()}},
    ).stdout.strip()
    return int(out.split(";")[0])


def job_state(job_id: int) -> str:
    """The job's current state (RUNNING, PENDING, COMPLETED, ...): scontrol first, then sacct."""
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, timeout=30)
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"], capture_output=True, text=True, timeout=30
    )
    lines = out.stdout.split()
    return lines[-1] if lines else "UNKNOWN"


def wait_state(job_id: int, states: set[str], timeout: float) -> str:
    """Poll until the job is in one of `states` (or finished); returns the state reached."""
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(job_id)
        if state in states or state in TERMINAL_STATES:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {state} after {timeout:.0f}s (wanted {sorted(states)})")
        time.sleep(0.5)


def wait_job(job_id: int, timeout: float) -> str:
    """Wait until the job has finished; returns its final state (COMPLETED, FAILED, TIMEOUT, ...)."""
    return wait_state(job_id, TERMINAL_STATES, timeout)


def wait_file(path: Path, timeout: float, job_id: int | None = None) -> None:
    """Wait until `path` exists; fails early when the job that should write it has finished."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if job_id is not None and job_state(job_id) in TERMINAL_STATES and not path.exists():
            raise AssertionError(f"job {job_id} finished ({job_state(job_id)}) without writing {path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not written after {timeout:.0f}s")
        time.sleep(0.2)

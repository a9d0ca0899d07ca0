"""The local cluster does what our Slurm code relies on: multi-node srun rendezvous through
detect_env, requeue, and --signal delivery before the time limit."""

import json
import subprocess
import sys
import time

import pytest

from slurm_jobs import REPO, job_state, sbatch, wait_file, wait_job, wait_state

pytestmark = pytest.mark.slurm

PROBE = REPO / "tests" / "slurm" / "job_probe.py"


def _batch_script(tmp_path, mode: str, out_dir) -> str:
    script = tmp_path / f"{mode}.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"srun {sys.executable} {PROBE} {mode} {out_dir}\n"
    )
    return str(script)


def _job_env():
    return {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_two_node_srun_job_rendezvous_through_detect_env(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    job = sbatch(_batch_script(tmp_path, "allreduce", out), "-N2", "--ntasks-per-node=1",
                 f"--output={tmp_path}/%j.log", **_job_env())
    state = wait_job(job, timeout=180)
    log = (tmp_path / f"{job}.log").read_text() if (tmp_path / f"{job}.log").exists() else ""
    assert state == "COMPLETED", log
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, seen in enumerate(ranks):
        assert seen["rank"] == rank
        assert seen["world_size"] == 2
        assert (seen["local_rank"], seen["local_world_size"]) == (0, 1)
        assert seen["sum"] == 1.0
        assert seen["master_addr"] == "127.0.0.1"
        assert seen["master_port"] == 15000 + job % 20000
        assert seen["launcher"] == "srun"
    assert sorted(r["node"] for r in ranks) == list(slurm_cluster.nodes)


def test_scontrol_requeue_restarts_a_running_job(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    job = sbatch(_batch_script(tmp_path, "requeue", out), "-N1", "--open-mode=append",
                 f"--output={tmp_path}/%j.log", **_job_env())
    try:
        wait_file(out / "run0.json", timeout=120, job_id=job)
        requeued_at = time.time()
        subprocess.run(["scontrol", "requeue", str(job)], check=True, capture_output=True, timeout=30)
        wait_file(out / "run1.json", timeout=120)
        restarted = json.loads((out / "run1.json").read_text())
        print(f"\nrequeue -> running again after {restarted['started'] - requeued_at:.1f}s")
        assert restarted["restart_count"] == 1
        assert wait_job(job, timeout=60) == "COMPLETED"
        assert "Restarts=1" in subprocess.run(
            ["scontrol", "show", "job", str(job)], capture_output=True, text=True, check=True
        ).stdout
    finally:
        subprocess.run(["scancel", str(job)], capture_output=True)


def test_signal_before_time_limit_reaches_the_srun_task(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # Slurm checks time limits every 30 s, so USR1 arrives 5-35 s after the start.
    job = sbatch(_batch_script(tmp_path, "signal", out), "-N1", "--time=1", "--signal=USR1@55",
                 f"--output={tmp_path}/%j.log", **_job_env())
    try:
        wait_state(job, {"RUNNING"}, timeout=60)
        wait_file(out / "signal.json", timeout=90, job_id=job)
        got = json.loads((out / "signal.json").read_text())
        print(f"\nUSR1 delivered {got['after_s']:.1f}s after the task started")
        assert got["signal"] == "SIGUSR1"
        assert wait_job(job, timeout=60) == "COMPLETED"
    finally:
        if job_state(job) not in ("COMPLETED",):
            subprocess.run(["scancel", str(job)], capture_output=True)

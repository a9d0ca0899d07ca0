"""`launch/submit.py`: submitit jobs from the config's slurm section, sweeps as one job array."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from gpt_vision import checkpoint as ckpt
from slurm_jobs import REPO
from train_jobs import SLURM_OVERRIDES, scancel, write_config

pytestmark = pytest.mark.slurm
SUBMIT = REPO / "launch" / "submit.py"


def submit_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def job_ids(stdout: str) -> list[str]:
    return [line.split()[2].rstrip(":") for line in stdout.splitlines() if line.startswith("submitted job ")]


def final_state(folder: Path, job_id: str, timeout: float = 60) -> str:
    job = submitit.SlurmJob(folder, job_id)
    deadline = time.monotonic() + timeout
    while (state := job.watcher.get_state(job_id, mode="force")) not in ("COMPLETED", "FAILED", "CANCELLED"):
        assert time.monotonic() < deadline, f"job {job_id} still {state}"
        time.sleep(1)
    return state


def test_two_node_pretraining_through_submitit_completes(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path, run)
    out = submit_cli("pretrain", "--config", str(config), "parallel.strategy=ddp", "slurm.nodes=2",
                     *SLURM_OVERRIDES, "--wait")
    ids = job_ids(out.stdout)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert len(ids) == 1 and f"(log {run}/slurm/{ids[0]}/{ids[0]}_0_log.out)" in out.stdout
        assert final_state(run / "slurm" / ids[0], ids[0]) == "COMPLETED"
    finally:
        for job_id in ids:
            scancel(int(job_id))
    meta = ckpt.read_meta(ckpt.latest_complete(run / "checkpoints"))
    assert (meta["step"], meta["world_size"]) == (8, 2)


def test_sweep_is_one_job_array_with_a_run_per_member(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path, run, "train.steps=4")
    out = submit_cli("pretrain", "--config", str(config), *SLURM_OVERRIDES, "--sweep", "optim.lr=1e-3,3e-3", "--wait")
    ids = job_ids(out.stdout)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        array = {job_id.split("_")[0] for job_id in ids}
        assert len(ids) == 2 and len(array) == 1, ids  # one array job, two tasks
    finally:
        scancel(int(array.pop()))
    for suffix, lr in (("lr1e-3", 1e-3), ("lr3e-3", 3e-3)):
        meta = ckpt.read_meta(ckpt.latest_complete(run / suffix / "checkpoints"))
        assert meta["step"] == 4
        assert meta["config"]["optim"]["lr"] == lr and meta["config"]["name"] == f"toy-{suffix}"


def test_finetune_probe_runs_on_one_node_from_the_pretrained_checkpoint(slurm_cluster, tmp_path):
    if not (REPO / "launch" / "finetune.py").exists():
        pytest.skip("launch/finetune.py is not written yet")
    run = tmp_path / "run"
    config = write_config(tmp_path, run, "train.steps=4")
    pre = submit_cli("pretrain", "--config", str(config), *SLURM_OVERRIDES, "--wait")
    assert pre.returncode == 0, pre.stdout + pre.stderr
    out_dir = tmp_path / "probe"
    probe = submit_cli("finetune", f"init={run}", f"output_dir={out_dir}", f"data.manifest={tmp_path}/shards/manifest.json",
                       "data.num_workers=0", "slurm.cpus_per_task=1", "slurm.mem_gb=2", "slurm.time_min=10",
                       "slurm.signal_delay_s=60", "--wait")
    assert probe.returncode == 0, probe.stdout + probe.stderr
    results = json.loads((out_dir / "results.json").read_text())
    assert results["task"] == "linear_probe" and "step-0000004" in results["init"] and 0 <= results["top1"] <= 1
    assert not (out_dir / "slurm").exists()  # logs beside the output directory, which must start empty

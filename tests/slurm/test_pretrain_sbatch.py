"""`sbatch slurm/pretrain.sh CONFIG key=value`: two nodes x one task, every sharded strategy."""
import json

import pytest

from gpt_vision import checkpoint as ckpt
from slurm_jobs import wait_job
from train_jobs import CPU_SBATCH, log_text, sbatch_run, scancel, write_config

pytestmark = pytest.mark.slurm


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_two_node_pretraining_completes_with_committed_checkpoints(slurm_cluster, tmp_path, strategy):
    run = tmp_path / "run"
    config = write_config(tmp_path, run, "train.steps=6")
    log = tmp_path / "job.log"
    job = sbatch_run(["-N2", "--ntasks-per-node=1", *CPU_SBATCH, "--time=10", f"--output={log}"],
                     [str(config), f"parallel.strategy={strategy}", "checkpoint.every=3"])
    try:
        assert wait_job(job, timeout=600) == "COMPLETED", log_text(log)
    finally:
        scancel(job)
    steps = ckpt.complete_steps(run / "checkpoints")
    assert [p.name for p in steps] == ["step-0000003", "step-0000006"]
    for step_dir in steps:
        meta = json.loads((step_dir / "meta.json").read_text())
        assert (meta["world_size"], meta["strategy"]) == (2, strategy)
        assert (step_dir / ckpt.COMMIT_MARKER).read_text().strip() == str(meta["step"])
        assert sorted(p.name for p in step_dir.glob("rank-*.json")) == ["rank-00000.json", "rank-00001.json"]
    assert meta["samples"] == 6 * 8 * 2
    assert "[job_step] step exited with 0" in log_text(log)


def test_missing_config_argument_is_one_clear_line(slurm_cluster, tmp_path):
    log = tmp_path / "job.log"
    job = sbatch_run(["-N1", "--ntasks-per-node=1", *CPU_SBATCH, "--time=2", f"--output={log}"], ["train.steps=3"])
    assert wait_job(job, timeout=120) == "FAILED"
    assert "usage: sbatch [options] slurm/pretrain.sh CONFIG.yaml [key=value ...]" in log_text(log)

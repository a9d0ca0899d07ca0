"""Preemption drills on the real cluster: interrupted runs save at one agreed step on every rank,
requeue, resume and end bit-identical to an uninterrupted run, each step's data seen once."""
import subprocess
import time

import pytest
import torch

from slurm_jobs import job_state, wait_job
from train_jobs import (CPU_SBATCH, SLURM_OVERRIDES, final_weights, log_text, sbatch_run, scancel, train_samples,
                        train_steps, write_config)

pytestmark = pytest.mark.slurm
STEPS = 300
TWO_NODES = ["-N2", "--ntasks-per-node=1", *CPU_SBATCH, "--time=10"]


def wait_for_step(run_dir, step, job_id, timeout=300):
    deadline = time.monotonic() + timeout
    while not (run_dir / "metrics.jsonl").exists() or len(train_steps(run_dir)) < step:
        assert job_state(job_id) in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {job_state(job_id)}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout}s"
        time.sleep(0.2)


def assert_same_run(interrupted, whole):
    assert train_steps(interrupted) == list(range(1, STEPS + 1))  # no step repeated or skipped
    assert train_samples(interrupted) == train_samples(whole)
    a, b = final_weights(interrupted), final_weights(whole)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signal_target", ["batch", "tasks"])
def test_sbatch_warning_signal_requeues_and_resumes_exactly(slurm_cluster, tmp_path, signal_target):
    whole, split = tmp_path / "whole", tmp_path / "split"
    settings = [f"train.steps={STEPS}", "checkpoint.every=100", "parallel.strategy=ddp"]
    config = write_config(tmp_path, whole)
    whole_job = sbatch_run([*TWO_NODES, f"--output={tmp_path}/whole.log"], [str(config), *settings])
    log = tmp_path / "split.log"
    job = sbatch_run([*TWO_NODES, f"--output={log}", "--open-mode=append"], [str(config), f"run_dir={split}", *settings])
    try:
        wait_for_step(split, 20, job)
        # batch: what --signal=B:USR1@N does (the shell forwards it); tasks: what --signal=USR1@N does.
        flag = ["-b"] if signal_target == "batch" else []
        subprocess.run(["scancel", *flag, "--signal=USR1", str(job)], check=True, timeout=30)
        assert wait_job(job, timeout=600) == "COMPLETED", log_text(log)
        assert wait_job(whole_job, timeout=600) == "COMPLETED", log_text(tmp_path / "whole.log")
    finally:
        scancel(job), scancel(whole_job)
    text = log_text(log)
    assert "[job_step] requeueing job" in text and "(restart 1)" in text, text
    stopped = int(text.split("stopped at step ")[1].split()[0])
    assert f"resumed from {split}/checkpoints/step-{stopped:07d} at step {stopped}" in text
    assert 20 <= stopped < STEPS
    assert_same_run(split, whole)


def test_submitit_interrupt_saves_on_all_ranks_requeues_and_resumes(slurm_cluster, tmp_path):
    from gpt_vision.slurm import plan_submissions, submit

    whole, split = tmp_path / "whole", tmp_path / "split"
    config = write_config(tmp_path, whole)
    settings = [f"train.steps={STEPS}", "checkpoint.every=100", "parallel.strategy=ddp", "slurm.nodes=2", *SLURM_OVERRIDES]
    jobs = []
    try:
        for run_dir in (whole, split):
            slurm, subs = plan_submissions("pretrain", str(config), [f"run_dir={run_dir}", *settings], [])
            jobs += submit("pretrain", slurm, subs)
        whole_job, job = jobs
        wait_for_step(split, 20, int(job.job_id))
        job._interrupt()  # preemption as submitit tests it: SIGTERM, then USR2, to every task
        outcomes = job.results()
        whole_job.results()
    finally:
        for j in jobs:
            scancel(int(j.job_id))
    assert [(o.rank, o.exit_code, o.restarts) for o in outcomes] == [(0, 0, 1), (1, 0, 1)]
    text = log_text(job.paths.stdout)
    assert "Requeued job" in text, text
    assert_same_run(split, whole)


def test_time_limit_warning_checkpoints_and_requeues_on_its_own(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path, run)
    log = tmp_path / "job.log"
    # Slurm checks limits every ~30 s: with --time=1 the warning comes 5-35 s after the start.
    job = sbatch_run(["-N2", "--ntasks-per-node=1", *CPU_SBATCH, "--time=1", "--signal=B:USR1@55", f"--output={log}"],
                     [str(config), "train.steps=1000000", "checkpoint.every=1000000", "parallel.strategy=ddp"])
    try:
        deadline = time.monotonic() + 240
        while "resumed from" not in log_text(log):
            assert time.monotonic() < deadline, log_text(log)
            time.sleep(1)
    finally:
        scancel(job)
    text = log_text(log)
    stopped = int(text.split("stopped at step ")[1].split()[0])
    assert "after the warning signal" in text and "(restart 1)" in text
    assert f"step-{stopped:07d} at step {stopped}" in text  # resumed from the step saved at the warning

"""Drill: kill -9 of the torchrun launcher mid-training. Its ranks must not outlive it (they would
keep training, saving and pruning into the run directory), and rerunning the same command
resumes from the newest complete checkpoint."""
import os
import signal
import time
from pathlib import Path

from tests.helpers.drills import batch_keys, child_env, kill_group, run_cli, start_cli, overrides, wait_for_step
from gpt_vision import checkpoint as ckpt

BOUND_S = 10.0


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has stopped running)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_ranks_exit_when_the_launcher_is_killed_and_the_rerun_resumes(manifest, tmp_path, figure):
    run, keys = tmp_path / "run", tmp_path / "keys"
    keys.mkdir()
    args = overrides(manifest, run, "parallel.strategy=ddp", "train.steps=100", "checkpoint.every=2")
    env = child_env(GPTV_DEBUG_BATCH_KEYS=str(keys))
    launcher = start_cli(args, 2, env, log=tmp_path / "killed.log")
    try:
        assert wait_for_step(keys / "keys-rank0.jsonl", 5, launcher)
        ranks = children(launcher.pid)
        assert len(ranks) == 2
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher only: its ranks are not signalled by us
        launcher.wait(timeout=30)
        killed_in = max(step for step, _ in batch_keys(keys))
        killed = time.monotonic()
        while any(alive(pid) for pid in ranks) and time.monotonic() - killed < 60:
            time.sleep(0.05)
        outlived = time.monotonic() - killed
        survivors = [pid for pid in ranks if alive(pid)]
    finally:
        kill_group(launcher)
    newest = ckpt.latest_complete(run / "checkpoints")
    saved = ckpt.read_meta(newest)["step"]
    rerun = run_cli(args, 2, env)
    figure(f"ranks outlived the launcher by {outlived:.2f} s (bound {BOUND_S:.0f} s), survivors {survivors}; "
           f"killed in step {killed_in + 1}; rerun exit {rerun.returncode}, resumed from {newest.name}")
    assert survivors == [] and outlived <= BOUND_S
    assert saved <= killed_in + 1  # nothing was trained or saved after the launcher died
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {newest} at step {saved}" in rerun.stdout + rerun.stderr
    assert ckpt.read_meta(ckpt.latest_complete(run / "checkpoints"))["step"] == 100
    assert max(step for step, _ in batch_keys(keys)) == 99

"""Drill: one writer per run directory. A second run on a directory a live run holds is refused
before it writes anything, naming the holder; a lock left by a process that died is taken over."""
import json
import os
import signal
import socket

from tests.helpers.drills import batch_keys, child_env, overrides, run_cli, start_cli, wait_for_step
from gpt_vision import checkpoint as ckpt
from tests.helpers.inproc import differing_tensors, weights
from test_config_env import error_lines, tree_digest


def test_a_second_run_on_a_held_run_directory_is_refused_and_the_first_is_intact(manifest, tmp_path, figure):
    run, keys = tmp_path / "run", tmp_path / "keys"
    keys.mkdir()
    first = start_cli(overrides(manifest, run), env=child_env(GPTV_DEBUG_BATCH_KEYS=str(keys)), log=tmp_path / "first.log")
    try:
        assert wait_for_step(keys / "keys-rank0.jsonl", 3, first)
        os.kill(first.pid, signal.SIGSTOP)  # hold the first run mid-training while the second starts
        holder = json.loads((run / ".lock").read_text())
        before = tree_digest(run)
        second = run_cli(overrides(manifest, run, "seed=1"))
        assert tree_digest(run) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()[-2000:]
    lines = error_lines(second.stderr)
    figure(f"second run: exit {second.returncode}, {lines}")
    assert second.returncode == 2 and lines == [
        f"gpt-vision-pretrain: error: run directory {run} is in use by pid {first.pid}@{socket.gethostname()} "
        f"since {holder['since']}; wait for that run to end or choose another directory"]
    assert holder["pid"] == first.pid and "launch/pretrain.py" in holder["command"]

    reference = tmp_path / "reference"
    alone = run_cli(overrides(manifest, reference))
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert [p.name for p in ckpt.complete_steps(run / "checkpoints")] == ["step-0000004", "step-0000006", "step-0000008"]
    assert differing_tensors(weights(run), weights(reference)) == []
    assert batch_keys(keys)[(7, 0)]  # the first run trained to the end
    assert (run / ".lock").read_text() == ""  # released cleanly


def test_a_stale_lock_of_a_dead_process_is_taken_over(manifest, tmp_path, figure):
    run = tmp_path / "run"
    run.mkdir()
    dead = {"pid": 2**22 + 17, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+0000", "command": "old run"}
    (run / ".lock").write_text(json.dumps(dead) + "\n")
    proc = run_cli(overrides(manifest, run, "train.steps=2", "schedule.warmup_steps=1"))
    notes = [line for line in proc.stderr.splitlines() if "taking over" in line]
    figure(f"stale lock: exit {proc.returncode}, {notes}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert notes == [f"run directory {run}: taking over the lock left by pid {dead['pid']}@{dead['host']} since "
                     f"{dead['since']}, which ended without releasing it"]
    assert ckpt.read_meta(ckpt.latest_complete(run / "checkpoints"))["step"] == 2

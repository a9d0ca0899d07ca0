"""Drills 2, 3, 10: kill -9 at a random step, kill -9 inside a checkpoint save, and retention
under interrupted saves. Every run is the real CLI in a subprocess (python, or torchrun with 2
gloo ranks); kills are SIGKILL, so nothing in the process gets to clean up."""
import random

import pytest

from tests.helpers.drills import (batch_keys, child_env, kill_group, overrides, run_cli, start_cli, train_losses,
                    wait_for_step)
from gpt_vision import checkpoint as ckpt
from tests.helpers.inproc import differing_tensors, first_difference, weights

STEPS, EVERY = 8, 2
CASES = {  # name: (processes, overrides, kill trials)
    "single": (1, [], 2),
    "fsdp": (2, ["parallel.strategy=fsdp"], 1),
    "zero3": (2, ["parallel.strategy=deepspeed", "parallel.zero_stage=3"], 1),
}
SLOW = pytest.mark.slow


def launch(manifest, run_dir, keys_dir, nproc, extra, **env):
    keys_dir.mkdir(parents=True, exist_ok=True)
    proc = run_cli(overrides(manifest, run_dir, *extra), nproc, child_env(GPTV_DEBUG_BATCH_KEYS=str(keys_dir), **env))
    return proc


def reference_run(manifest, root, nproc, extra):
    run, keys = root / "reference", root / "reference-keys"
    proc = launch(manifest, run, keys, nproc, extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, keys


def assert_same_as_reference(run, keys, ref_run, ref_keys, nproc):
    """Losses bitwise, every (step, micro) batch the same keys on every rank, final weights bitwise."""
    assert first_difference(train_losses(run), train_losses(ref_run)) is None
    for rank in range(nproc):
        got, want = batch_keys(keys, rank), batch_keys(ref_keys, rank)
        assert got == want, f"rank {rank}: consumed samples differ from the uninterrupted run"
    assert differing_tensors(weights(run), weights(ref_run)) == []


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "single" else SLOW) for n in CASES])
def test_kill9_at_random_step_resumes_exactly(name, manifest, tmp_path, figure):
    nproc, extra, trials = CASES[name]
    ref_run, ref_keys = reference_run(manifest, tmp_path, nproc, extra)
    consumed = [k for rank in range(nproc) for k in sum(batch_keys(ref_keys, rank).values(), [])]
    assert len(consumed) == len(set(consumed)) == STEPS * 8 * nproc  # one epoch is 256 samples: no repeats
    rng = random.Random(f"kill9-{name}")
    lost = []
    for trial in range(trials):
        kill_step = rng.randint(1, STEPS - 3)
        run, keys = tmp_path / f"run{trial}", tmp_path / f"keys{trial}"
        keys.mkdir()
        proc = start_cli(overrides(manifest, run, *extra), nproc,
                         child_env(GPTV_DEBUG_BATCH_KEYS=str(keys)), log=tmp_path / f"killed{trial}.log")
        reached = wait_for_step(keys / "keys-rank0.jsonl", kill_step, proc)
        kill_group(proc)
        assert reached, "the run finished before the kill"
        in_progress = max(step for step, _ in batch_keys(keys))
        resumed_from = ckpt.latest_complete(run / "checkpoints")
        saved = ckpt.read_meta(resumed_from)["step"] if resumed_from else 0
        lost.append(in_progress - saved)
        assert in_progress - saved <= EVERY
        proc = launch(manifest, run, keys, nproc, extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_same_as_reference(run, keys, ref_run, ref_keys, nproc)
    figure(f"{name}: {trials} kill(s); steps lost max {max(lost)} (interval {EVERY}); loss/sample/weight mismatches 0")


SAVE_POINTS = {  # (point, rank, processes): the step the resume must continue from
    ("shards", 0, 1): 2, ("meta", 0, 1): 2, ("marker", 0, 1): 4,
    ("shards", 1, 2): 2, ("rank_state", 1, 2): 2, ("meta", 0, 2): 2,
}


def complete_files_present(step_dir, nproc) -> bool:
    meta = ckpt.read_meta(step_dir)
    ranks = all((step_dir / f"rank-{r:05d}.json").is_file() for r in range(meta["world_size"]))
    return ckpt.is_complete(step_dir) and ranks and meta["world_size"] == nproc


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=SLOW)])
def test_kill9_inside_checkpoint_save_falls_back_to_the_previous_complete_step(nproc, manifest, tmp_path, figure):
    extra = [] if nproc == 1 else ["parallel.strategy=fsdp"]
    ref_run, ref_keys = reference_run(manifest, tmp_path, nproc, extra)
    points = [(p, r) for (p, r, n) in SAVE_POINTS if n == nproc]
    partial_loaded, fallbacks = 0, 0
    for index, (point, rank) in enumerate(points):
        run, keys = tmp_path / f"run-{point}-{rank}", tmp_path / f"keys-{point}-{rank}"
        proc = launch(manifest, run, keys, nproc, extra, GPTV_TEST_KILL_IN_SAVE=f"{point}:{rank}:4")
        assert proc.returncode != 0, f"{point}:{rank}: the kill hook did not fire"
        chosen = ckpt.latest_complete(run / "checkpoints")
        expected = SAVE_POINTS[(point, rank, nproc)]
        partial_loaded += not complete_files_present(chosen, nproc)
        fallbacks += ckpt.read_meta(chosen)["step"] == expected
        if index in (0, len(points) - 1):  # resume for real at the first and the last kill point
            proc = launch(manifest, run, keys, nproc, extra)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert f"resumed from {chosen}" in proc.stdout + proc.stderr
            assert_same_as_reference(run, keys, ref_run, ref_keys, nproc)
    figure(f"{nproc} rank(s), kill points {points}: partial checkpoints chosen {partial_loaded} of {len(points)}; "
           f"resumed from the newest complete step {fallbacks} of {len(points)}")
    assert partial_loaded == 0 and fallbacks == len(points)


def test_retention_never_deletes_the_newest_complete_step(manifest, tmp_path, figure):
    rng = random.Random("retention")
    run, keys = tmp_path / "run", tmp_path / "keys"
    extra = ["train.steps=10", "checkpoint.keep_last=1"]
    kills, violations = [], 0
    for point in rng.sample(["shards", "meta", "latest"], 2) + ["prune"]:  # prune: killed mid-delete
        before = ckpt.latest_complete(run / "checkpoints")
        before_step = ckpt.read_meta(before)["step"] if before else 0
        step = rng.choice([s for s in range(before_step + EVERY, 10, EVERY) if point != "prune" or s >= 4])
        kills.append(f"{point}@{step}")
        proc = launch(manifest, run, keys, 1, extra, GPTV_TEST_KILL_IN_SAVE=f"{point}:0:{step}")
        assert proc.returncode != 0
        newest = ckpt.latest_complete(run / "checkpoints")
        violations += newest is None or ckpt.read_meta(newest)["step"] < before_step
        weights(newest)  # the newest complete step stays loadable
    proc = launch(manifest, run, keys, 1, extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [p.name for p in ckpt.complete_steps(run / "checkpoints")]
    figure(f"interrupted saves {kills}: newest complete step deleted {violations} times; final complete steps {steps}")
    assert violations == 0 and steps == ["step-0000010"]

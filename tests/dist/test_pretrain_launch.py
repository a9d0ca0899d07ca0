"""The real entry point under torchrun, 2 gloo processes, for every strategy.

Equivalence: at world size 2 every rank streams the same samples whatever the strategy, so
with the same seed (fp32) each strategy's losses match DDP's within 1e-5 relative (equality with
one process on identical batches is proven in test_strategies.py / test_deepspeed.py). Resume: continuing a 2-rank run from its
step-3 checkpoint reproduces steps 4..6 within 1e-6. World size change: a 2-rank checkpoint
continues on 1 process. (ZeRO-1 and ZeRO-2's world-size change are covered in-process by
test_deepspeed.py; here each engine runs through the real launcher once.)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_vision import checkpoint as ckpt
from tests.helpers.toydata import tiny_overrides, write_toy_shards

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
STEPS = 6
COMMON = [f"train.steps={STEPS}", "checkpoint.every=3", "checkpoint.keep_last=2", "deterministic=true"]
STRATEGIES = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp": ["parallel.strategy=fsdp"],
    "fairscale": ["parallel.strategy=fairscale"],
    "zero2": ["parallel.strategy=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
}


def launch(manifest, run_dir, nproc, *extra, timeout=600):
    overrides = tiny_overrides(manifest, run_dir, *COMMON, *extra)
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "launch/pretrain.py"), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0",
               str(REPO / "launch/pretrain.py"), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("shards"), train=512, shard_size=64)


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory):
    """Plain DDP at world size 2: the losses every other strategy must reproduce."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    launch(manifest, run, 2, *STRATEGIES["ddp"])
    return losses(run)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_matches_single_and_resumes_exactly(name, manifest, reference, tmp_path):
    run = tmp_path / "run"
    launch(manifest, run, 2, *STRATEGIES[name])
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, 6):
        assert got[step] == pytest.approx(reference[step], rel=1e-5), (name, step, got[step], reference[step])
    meta = ckpt.read_meta(run / "checkpoints" / "step-0000006")
    assert meta["world_size"] == 2 and meta["samples"] == 16 * STEPS

    resumed = tmp_path / "resumed"
    launch(manifest, resumed, 2, *STRATEGIES[name], f"checkpoint.resume={run / 'checkpoints' / 'step-0000003'}")
    again = losses(resumed)
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(got[step], rel=1e-6, abs=1e-7), (name, step)


@pytest.mark.parametrize("name", ["fsdp", "zero3"])
def test_two_rank_checkpoint_continues_on_one_process(name, manifest, tmp_path):
    run = tmp_path / "run"
    launch(manifest, run, 2, *STRATEGIES[name], "train.steps=3", "schedule.warmup_steps=1")
    one = tmp_path / "one"
    proc = launch(manifest, one, 1, *STRATEGIES[name], "train.micro_batch_size=16",
                  f"checkpoint.resume={run / 'checkpoints' / 'step-0000003'}")
    meta = ckpt.read_meta(one / "checkpoints" / "step-0000006")
    assert meta["world_size"] == 1 and meta["loop"]["step"] == 6
    assert "resampled" in (proc.stderr + proc.stdout)

"""The real `deepspeed` launcher on a CPU, as the README shows it: `--num_gpus 2` starts two
ranks (DeepSpeed picks its CPU accelerator by itself), ZeRO-2 trains and saves; a user error is
one line and exit 2. The first start JIT-compiles DeepSpeed's CPU ops (~80 s, then cached)."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_vision import checkpoint as ckpt
from tests.helpers.toydata import tiny_overrides, write_toy_shards

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed(*args):
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("shards"), train=128, shard_size=32)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="DeepSpeed JIT-compiles its CPU ops: needs a C++ compiler")
def test_deepspeed_num_gpus_2_trains_on_cpu(manifest, tmp_path):
    run = tmp_path / "run"
    proc = deepspeed(*tiny_overrides(manifest, run, "train.steps=3", "checkpoint.every=3",
                                     "parallel.strategy=deepspeed", "parallel.zero_stage=2"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    meta = ckpt.read_meta(ckpt.latest_complete(run / "checkpoints"))
    assert meta["step"] == 3 and meta["world_size"] == 2 and meta["strategy"] == "deepspeed"
    assert meta["samples"] == 3 * 8 * 2


def test_deepspeed_user_error_is_one_line_and_exit_2(manifest, tmp_path):
    proc = deepspeed(*tiny_overrides(manifest, tmp_path / "run", "schedule.warmup_steps=50"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "gpt-vision-pretrain: error:" in line]
    assert lines == ["gpt-vision-pretrain: error: config key 'schedule.warmup_steps': 50 exceeds train.steps=8 (in command line)"], lines

"""What a user sees from a 2-rank launch: one error line and exit 2 for a bad input, exit 85
from every rank after a save-and-stop (SIGUSR1 to one rank), through the real torch agent."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt_vision import checkpoint as ckpt
from tests.helpers.toydata import tiny_overrides, write_toy_shards

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
ERROR_PREFIX = "gpt-vision-pretrain: error:"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("shards"), train=256, shard_size=32)


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def wrapper(*args):
    return [sys.executable, str(REPO / "launch/pretrain.py"), "--nproc_per_node", "2", *args]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
            "--rdzv_endpoint=127.0.0.1:0", str(REPO / "launch/pretrain.py"), *args]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ERROR_PREFIX in line]


def test_bad_config_value_is_one_line_and_exit_2(manifest, tmp_path):
    proc = subprocess.run(wrapper(*tiny_overrides(manifest, tmp_path / "run", "optim.lr=-1")),
                          capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc.stderr) == [f"{ERROR_PREFIX} config key 'optim.lr': must be positive, got -1.0 (in command line)"]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_under_plain_torchrun_the_error_is_printed_once(manifest, tmp_path):
    proc = subprocess.run(torchrun(*tiny_overrides(manifest, tmp_path / "run", "model.channels=3")),
                          capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    assert proc.returncode == 1  # torchrun's own code for any failed rank (documented in README)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "model.channels" in lines[0], proc.stderr[-2000:]


def rank_pids(parent: int) -> list[int]:
    path = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("target", ["one rank", "the launcher"])
def test_sigusr1_stops_every_rank_with_85(manifest, tmp_path, target):
    run = tmp_path / "run"
    proc = subprocess.Popen(wrapper(*tiny_overrides(manifest, run, "train.steps=100000", "checkpoint.every=100000",
                                                    "train.log_every=1")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        ranks = rank_pids(proc.pid)
        assert len(ranks) == 2
        os.kill(ranks[1] if target == "one rank" else proc.pid, signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 85, stderr[-3000:]  # 85 only when both ranks exited 85
    assert not error_lines(stderr)
    saved = ckpt.latest_complete(run / "checkpoints")
    assert saved is not None and ckpt.read_meta(saved)["world_size"] == 2

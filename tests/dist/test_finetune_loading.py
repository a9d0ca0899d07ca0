"""Checkpoints written by 2 ranks (DDP, FSDP2, DeepSpeed ZeRO-3) load into the one-process
fine-tune entry point: the same trained weights whatever the strategy, and a probe runs on them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_vision.config_loader import load_config
from gpt_vision.export import load_pretrained
from gpt_vision.run_configs import FinetuneConfig
from gpt_vision.tasks.backbone import load_backbone
from gpt_vision.tasks.finetune_cli import run
from tests.helpers.finetune_fixtures import finetune_overrides, write_brightness_shards
from tests.helpers.toydata import tiny_overrides

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.distributed
STRATEGIES = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp": ["parallel.strategy=fsdp"],
    "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multirank")
    manifest = write_brightness_shards(root / "shards", train=128, test=32)
    done = {}
    for name, extra in STRATEGIES.items():
        run_dir = root / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
               "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", str(REPO / "launch/pretrain.py"),
               *tiny_overrides(manifest, run_dir, "train.steps=4", "deterministic=true", "logging.progress=false",
                               "checkpoint.every=2"), *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        done[name] = run_dir
    return manifest, done


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_multirank_checkpoint_loads_on_one_process(runs, name, tmp_path):
    manifest, run_dirs = runs
    cfg = lambda init, *extra: load_config(FinetuneConfig, None, finetune_overrides(manifest, tmp_path / "out", f"init={init}", *extra))  # noqa: E731
    backbone = load_backbone(cfg(run_dirs[name]))
    reference = load_pretrained(run_dirs["ddp"]).model.state_dict()
    state = backbone.model.state_dict()
    assert state.keys() == reference.keys()
    for key in state:  # same data and seed at world size 2: strategies agree to float tolerance
        torch.testing.assert_close(state[key], reference[key], rtol=1e-4, atol=1e-5)
    results = run(cfg(run_dirs[name], "train.steps=20", "train.batch_size=16"))
    assert results["samples"] == 32 and results["init"].startswith("checkpoint ")

"""The online probe under sharded strategies at 2 gloo ranks: every rank runs the forward on its
slice, and rank 0 ends with the features and accuracies a single process computes from the same
weights (FSDP2 shards parameters per block; ZeRO-3 partitions every parameter)."""
import dataclasses

import numpy as np
import pytest
import torch

from gpt_vision.data.config import DataConfig
from gpt_vision.data.palette import Palette
from gpt_vision.model import ModelConfig, build_model
from gpt_vision.optim import OptimConfig
from gpt_vision.parallel import BatchLayout, ParallelConfig, build_strategy
from gpt_vision.tasks.online_probe import OnlineProbe
from gpt_vision.train.config import OnlineProbeConfig
from tests.helpers.multiproc import run_ranks
from tests.helpers.toydata import write_toy_shards

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(n_layer=3, n_embd=32, n_head=2, vocab_size=8, image_size=8, channels=1)
# Odd counts: the last rank's slice is padded; batch 4 leaves a short last batch.
PROBE = OnlineProbeConfig(train_images=51, test_images=33, layers=[0, 2], batch_size=4)
PARALLEL = {
    "single": ParallelConfig(strategy="single", precision="fp32"),
    "fsdp": ParallelConfig(strategy="fsdp", precision="fp32"),
    "zero3": ParallelConfig(strategy="deepspeed", zero_stage=3, precision="fp32"),
}


def probe_run(rank: int, world: int, name: str, manifest: str, probe_cfg: OnlineProbeConfig = PROBE) -> dict:
    strategy = build_strategy(PARALLEL[name], rank, world, rank, BatchLayout(4, 1))
    torch.manual_seed(0)
    strategy.setup(build_model(MODEL), OptimConfig())
    palette = Palette(np.linspace(0, 255, MODEL.vocab_size)[:, None])
    probe = OnlineProbe(probe_cfg, DataConfig(manifest=manifest, num_workers=0), palette, MODEL, strategy, 4, seed=0,
                        message=lambda text: None)
    features = probe.features(probe.train_set)
    return {"features": [f.clone() for f in features], "scalars": probe(), "training": strategy.module.training}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return str(write_toy_shards(tmp_path_factory.mktemp("shards"), train=128, test=64, shard_size=32))


@pytest.fixture(scope="module")
def single(manifest):
    return probe_run(0, 1, "single", manifest)


@pytest.mark.parametrize("name", ["fsdp", "zero3"])
def test_sharded_probe_equals_single_process(name, manifest, single):
    ranks = run_ranks(probe_run, 2, name, manifest, timeout=300)
    first = ranks[0]
    assert [f.shape for f in first["features"]] == [(51, 32), (51, 32)]
    for got, expected in zip(first["features"], single["features"]):
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert ranks[1]["scalars"] == {}
    accuracies = {k: v for k, v in first["scalars"].items() if k.startswith("top1") or k in ("best_layer", "pixels_top1")}
    assert accuracies == {k: single["scalars"][k] for k in accuracies}
    assert sorted(accuracies) == ["best_layer", "pixels_top1", "top1", "top1/layer0", "top1/layer2"]
    assert all(rank["training"] for rank in ranks)  # back in training mode afterwards


def test_grid_pooling_gives_one_vector_per_cell(manifest, single):
    grid = probe_run(0, 1, "single", manifest, dataclasses.replace(PROBE, pooling="grid", grid_size=2))
    assert [f.shape for f in grid["features"]] == [(51, 4 * 32), (51, 4 * 32)]
    # The cells' average is the mean over all positions (8x8 tokens in four equal 4x4 cells).
    for cells, mean in zip(grid["features"], single["features"]):
        assert torch.allclose(cells.view(51, 4, 32).mean(1), mean, atol=1e-6)

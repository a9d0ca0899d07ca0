"""Model geometry comes from the shard manifest, and checks that need only the manifest fail
before the palette's k-means and before anything is written."""
import time

import numpy as np
import pytest
import yaml

from data_shards.cli import main as shards_main
from tests.helpers.fixtures_images import write_image_folder
from gpt_vision.config_loader import load_config
from gpt_vision.distributed import DistEnv
from gpt_vision.errors import UserError
from gpt_vision.run_configs import PretrainConfig
from gpt_vision.tasks.pretrain import run_pretraining
from gpt_vision.train import preemption
from tests.helpers.toydata import tiny_overrides

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                 master_port=29500, launcher="python")


@pytest.fixture(scope="module")
def rgb_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        write_image_folder(root / "photos" / split, {
            "red": [np.clip(rng.normal([200, 40, 40], 20, (8, 8, 3)), 0, 255).astype(np.uint8) for _ in range(count)],
            "blue": [np.clip(rng.normal([40, 40, 200], 20, (8, 8, 3)), 0, 255).astype(np.uint8) for _ in range(count)],
        })
    assert shards_main(["make", "--source", "folder", "--input", str(root / "photos"), "--out", str(root / "shards"),
                        "--name", "photos"]) == 0
    return root / "shards" / "manifest.json"


def pretrain(manifest, run_dir, *extra):
    cfg = load_config(PretrainConfig, None, tiny_overrides(manifest, run_dir, "train.steps=3", *extra))
    preemption.clear()
    return run_pretraining(cfg, SINGLE)


def test_rgb_folder_pretrains_without_model_channels(rgb_manifest, tmp_path):
    result = pretrain(rgb_manifest, tmp_path / "run")
    assert result.state.step == 3
    model = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert (model["channels"], model["image_size"], model["vocab_size"]) == (3, 8, 8)


@pytest.mark.parametrize("extra, key", [
    (["model.channels=1"], "model.channels"),
    (["model.image_size=16"], "model.image_size"),
    (["data.val_split=validation", "train.eval_every=2"], "validation"),
    (["data.train_split=nope"], "nope"),
])
def test_manifest_checks_fail_fast_and_write_nothing(rgb_manifest, tmp_path, extra, key):
    started = time.perf_counter()
    with pytest.raises(UserError, match=key):
        pretrain(rgb_manifest, tmp_path / "run", "tokenizer.clusters=16", *extra)
    assert time.perf_counter() - started < 2.0
    assert not (tmp_path / "run").exists()
    assert not list(rgb_manifest.parent.glob("palette-16.npy"))  # no k-means ran

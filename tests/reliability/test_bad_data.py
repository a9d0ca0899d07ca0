"""Drill 6: every kind of bad sample in real tar shards is skipped and counted exactly, the run
goes on, and above `data.max_bad_fraction` it stops with an error naming the shard and the key."""
import os

import numpy as np
import pytest

from gpt_vision.data.config import DataConfig
from gpt_vision.data.palette import Palette
from gpt_vision.data.stream import ShardLoader
from gpt_vision.errors import UserError
from tests.helpers.inproc import pretrain
from tests.helpers import shardgen

PLANTED = {  # kind counted by the loader: how many of it are planted
    "corrupt_image": 2,  # a zero-byte PNG member, a "PNG" that is really text
    "missing_label": 1,
    "bad_label": 1,  # a non-integer label
    "duplicate_key": 1,
    "wrong_size": 1,
    "wrong_mode": 1,
    "truncated_tar": 1,  # the last shard is cut inside a member
}


def plant(split, shard_index, samples):
    """Shard 0 carries one of each per-sample fault; shard 2 is truncated after writing."""
    if split != "train" or shard_index != 0:
        return samples
    rng = np.random.default_rng(1)
    samples[1]["png"] = b""
    samples[2]["png"] = b"this is not a png, only text\n"
    del samples[3]["cls"]
    samples[4]["cls"] = b"seven"
    samples[5]["png"] = shardgen.png_bytes(shardgen.random_image(rng, size=(16, 16)))
    samples[6]["png"] = shardgen.png_bytes(shardgen.random_image(rng, mode="RGB"))
    samples.append(dict(samples[7]))  # a second sample under an existing key
    return samples


@pytest.fixture(scope="module")
def bad_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    path = shardgen.write_dataset(root, {"train": [40, 40, 40], "test": [16]}, edit=plant)
    shard = root / "train-000002.tar"
    offsets = shardgen.member_offsets(shard)
    data_offset, _ = offsets["train002-00030.png"]
    os.truncate(shard, data_offset + 10)  # 30 good samples, then an archive that ends mid-member
    shardgen.rehash(path)
    return path


def palette() -> Palette:
    return Palette(np.linspace(0, 255, 8, dtype=np.float32)[:, None])


def count_one_pass(manifest, **data) -> tuple[dict, int]:
    cfg = DataConfig(manifest=str(manifest), num_workers=0, **data)
    loader = ShardLoader(cfg, "train", palette(), batch_size=8, train=False)
    good = sum(len(batch["key"]) for batch in loader)
    return loader.bad_samples, good


def test_each_bad_sample_is_skipped_and_counted_exactly(bad_manifest, figure):
    counts, good = count_one_pass(bad_manifest, max_bad_fraction=0.2, bad_window=100)
    injected = sum(PLANTED.values())
    figure(f"injected {injected} faults of {len(PLANTED)} kinds; skipped {sum(counts.values())}; by kind {counts}; "
           f"good samples read {good}")
    assert counts == PLANTED
    assert good == 40 - 6 + 40 + 30  # shard 0 lost 6 bad samples (its duplicate was extra), shard 2 its tail


def test_the_run_continues_over_bad_samples(bad_manifest, tmp_path):
    result = pretrain(bad_manifest, tmp_path / "run", "train.steps=12", "data.max_bad_fraction=0.2",
                      "data.bad_window=100", "checkpoint.every=12")
    assert result.state.step == 12


def test_above_the_rate_the_run_stops_naming_shard_and_key(bad_manifest, figure):
    with pytest.raises(UserError) as error:
        count_one_pass(bad_manifest, max_bad_fraction=0.05, bad_window=20)
    message = str(error.value)
    figure(f"stop message: {message}")
    assert "\n" not in message
    assert "train-000000.tar" in message and "key 'train000-0000" in message and "max_bad_fraction=0.05" in message

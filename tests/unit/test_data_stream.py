import json
import os
import pickle
import tarfile

import numpy as np
import pytest

import gpt_vision.data.stream as stream_module
from gpt_vision.data import AugmentConfig, DataConfig, Palette, ShardLoader
from gpt_vision.errors import UserError
from tests.helpers.shardgen import append_raw_members, member_offsets, png_bytes, rehash, write_dataset

TRAIN = [10, 7, 9, 5, 8]  # 39 samples, 5 shards: enough for 2 ranks x 2 workers
VAL = [5, 3, 4, 6, 2]  # 20 samples, split by shard
TEST = [6, 5, 4]  # 15 samples, 3 shards < 4 readers: split by sample index
GRAY = Palette(np.linspace(0, 255, 16, dtype=np.float32)[:, None])


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("set"), {"train": TRAIN, "val": VAL, "test": TEST})


def all_keys(split, counts):
    return sorted(f"{split}{shard:03d}-{i:05d}" for shard, count in enumerate(counts) for i in range(count))


def config(manifest, **changes):
    return DataConfig(manifest=str(manifest), num_workers=changes.pop("num_workers", 0), shuffle_buffer=6, **changes)


def take(loader, count):
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def epoch_keys(loader, epoch):
    """Keys of one epoch, read with batch_size 1 until every worker has moved past it."""
    keys = []
    for batch in loader:
        state = loader.state_dict()
        served = (state["next_worker"] - 1) % state["num_workers"]
        if state["workers"][served][0] == epoch:
            keys += batch["key"]
        if all(position[0] > epoch for position in state["workers"]):
            return keys


def test_batches_hold_tokens_pixels_labels_and_keys(manifest):
    batch = take(ShardLoader(config(manifest), "train", GRAY, batch_size=4), 1)[0]
    assert batch["tokens"].shape == (4, 64) and batch["tokens"].dtype.is_floating_point is False
    assert batch["pixels"].shape == (4, 8, 8, 1) and str(batch["pixels"].dtype) == "torch.uint8"
    assert np.array_equal(batch["tokens"].numpy(), GRAY.encode(batch["pixels"]).reshape(4, 64).numpy())
    assert [int(key[-5:]) % 10 for key in batch["key"]] == batch["label"].tolist()


def test_two_ranks_two_workers_cover_each_sample_once_per_epoch(manifest):
    for epoch in (0, 1):
        keys = []
        for rank in (0, 1):
            loader = ShardLoader(config(manifest, num_workers=2), "train", GRAY, 1, rank=rank, world_size=2, seed=5)
            keys += epoch_keys(loader, epoch)
        assert sorted(keys) == all_keys("train", TRAIN)


def test_fewer_shards_than_readers_still_cover_exactly_once(tmp_path):
    small = write_dataset(tmp_path, {"train": [9, 8]})
    keys = []
    for rank in (0, 1):
        loader = ShardLoader(config(small, num_workers=2), "train", GRAY, 1, rank=rank, world_size=2, seed=5)
        keys += epoch_keys(loader, 0)
    assert sorted(keys) == all_keys("train", [9, 8])


def test_same_seed_same_order_new_epoch_new_order(manifest):
    def keys(seed, epoch):
        return epoch_keys(ShardLoader(config(manifest, num_workers=2), "train", GRAY, 1, seed=seed), epoch)

    assert keys(3, 0) == keys(3, 0)
    assert keys(3, 0) != keys(3, 1) and sorted(keys(3, 0)) == sorted(keys(3, 1))
    assert keys(3, 0) != keys(4, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly_like_an_uninterrupted_stream(manifest, workers):
    augment = AugmentConfig(random_crop_padding=2, flip=True)
    cfg = config(manifest, num_workers=workers, augment=augment)
    done, more = 7, 9  # 7 batches of 4 = 28 of 39 samples: the next 9 cross into epoch 1
    reference = take(ShardLoader(cfg, "train", GRAY, 4, seed=11), done + more)[done:]

    first = ShardLoader(cfg, "train", GRAY, 4, seed=11)
    take(first, done)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ShardLoader(cfg, "train", GRAY, 4, seed=11)
    resumed.load_state_dict(state)
    continued = take(resumed, more)

    assert [b["key"] for b in continued] == [b["key"] for b in reference]
    for ours, theirs in zip(continued, reference):
        assert np.array_equal(ours["tokens"].numpy(), theirs["tokens"].numpy())
        assert np.array_equal(ours["pixels"].numpy(), theirs["pixels"].numpy())


def test_resume_skips_without_decoding_images(manifest, monkeypatch):
    first = ShardLoader(config(manifest), "train", GRAY, 4, seed=2)
    take(first, 6)
    decoded = []
    original = stream_module.decode_sample
    monkeypatch.setattr(stream_module, "decode_sample", lambda raw, *a: decoded.append(raw.key) or original(raw, *a))
    resumed = ShardLoader(config(manifest), "train", GRAY, 4, seed=2)
    resumed.load_state_dict(first.state_dict())
    batch = take(resumed, 1)[0]
    assert decoded == batch["key"]


def test_state_from_another_layout_restarts_the_epoch_resampled(manifest):
    first = ShardLoader(config(manifest, num_workers=2), "train", GRAY, 4, seed=1)
    take(first, 3)
    other = ShardLoader(config(manifest), "train", GRAY, 4, seed=1)
    with pytest.warns(RuntimeWarning, match="restarting epoch 0 in resampled mode"):
        other.load_state_dict(first.state_dict())
    assert other.state_dict()["resampled"] is True
    assert len(take(other, 2)) == 2


def test_resampled_mode_is_deterministic(manifest):
    def keys(rank, seed=9):
        loader = ShardLoader(config(manifest, num_workers=2, resampled=True), "train", GRAY, 3, rank=rank,
                             world_size=2, seed=seed)
        return [b["key"] for b in take(loader, 6)]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1) and keys(0) != keys(0, seed=10)


@pytest.mark.parametrize("split,counts", [("val", VAL), ("test", TEST)])
def test_eval_reads_every_sample_exactly_once_across_ranks_and_workers(manifest, split, counts):
    keys, sizes = [], []
    for rank in (0, 1):
        loader = ShardLoader(config(manifest, num_workers=2), split, GRAY, 4, rank=rank, world_size=2, train=False)
        for batch in loader:
            keys += batch["key"]
            sizes.append(len(batch["key"]))
    assert sorted(keys) == all_keys(split, counts)
    assert min(sizes) < 4


def corrupt(split, shard, samples):
    """Plant one of each bad kind in shard 0, a duplicate key in shard 1."""
    if shard == 0:
        samples[2]["png"] = b"garbage"
        samples[3]["png"] = samples[3]["png"][:40]
        samples[4]["cls"] = b"x"
        del samples[5]["cls"]
        samples[6]["png"] = png_bytes(np.zeros((4, 4, 1), dtype=np.uint8))
        samples[7]["png"] = png_bytes(np.zeros((8, 8, 3), dtype=np.uint8))
    if shard == 1:
        samples[3]["__key__"] = samples[0]["__key__"]
    return samples


@pytest.fixture()
def broken(tmp_path):
    manifest = write_dataset(tmp_path, {"train": [10, 6, 7, 5]}, edit=corrupt)
    shard = tmp_path / "train-000002.tar"  # cut inside the 5th sample's image: 4 good samples remain
    offset, size = member_offsets(shard)["train002-00004.png"]
    with open(shard, "r+b") as handle:
        handle.truncate(offset + size // 2)
    rehash(manifest)
    return manifest


EXPECTED_BAD = {"corrupt_image": 2, "bad_label": 1, "missing_label": 1, "wrong_size": 1, "wrong_mode": 1,
                "duplicate_key": 1, "truncated_tar": 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted_exactly(broken, workers):
    loader = ShardLoader(config(broken, num_workers=workers, max_bad_fraction=1.0), "train", GRAY, 3, train=False)
    keys = [key for batch in loader for key in batch["key"]]
    assert len(keys) == 28 - 6 - 1 - 3 and len(set(keys)) == len(keys)
    assert loader.bad_samples == EXPECTED_BAD


def test_training_carries_bad_counts_through_state(broken):
    cfg = config(broken, num_workers=2, max_bad_fraction=1.0)
    uninterrupted = ShardLoader(cfg, "train", GRAY, 1, seed=4)
    epoch_keys(uninterrupted, 1)  # reads epochs 0 and 1, ends just inside epoch 2
    first = ShardLoader(cfg, "train", GRAY, 1, seed=4)
    epoch_keys(first, 0)
    resumed = ShardLoader(cfg, "train", GRAY, 1, seed=4)
    resumed.load_state_dict(first.state_dict())
    assert resumed.bad_samples == first.bad_samples
    epoch_keys(resumed, 1)
    assert resumed.bad_samples == uninterrupted.bad_samples
    assert all(resumed.bad_samples[kind] >= 2 * count for kind, count in EXPECTED_BAD.items())


def test_too_many_bad_samples_stop_with_shard_and_key(broken):
    loader = ShardLoader(config(broken, bad_window=10, max_bad_fraction=0.1), "train", GRAY, 2, train=False)
    with pytest.raises(UserError, match=r"2 of the last 10.*key 'train000-00003' in shard .*train-000000.tar"):
        list(loader)


def test_unsafe_members_are_never_unpickled_or_extracted(tmp_path):
    marker, proof = tmp_path / "unpickled", tmp_path / "proof"

    class Bomb:
        def __init__(self, target):
            self.target = target

        def __reduce__(self):
            return (os.system, (f"touch {self.target}",))

    pickle.loads(pickle.dumps(Bomb(proof)))
    assert proof.exists()  # the payload works when unpickled

    def plant(split, shard, samples):
        samples[1].update({"pickle": pickle.dumps(Bomb(marker)), "pyd": pickle.dumps(Bomb(marker)),
                           "pth": pickle.dumps(Bomb(marker))})
        samples.append({"__key__": "only-pickle", "pickle": pickle.dumps(Bomb(marker))})
        return samples

    manifest = write_dataset(tmp_path / "set", {"train": [4]}, edit=plant)
    shard = tmp_path / "set" / "train-000000.tar"
    image = png_bytes(np.zeros((8, 8, 1), dtype=np.uint8))
    link = tarfile.TarInfo("link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    escape, absolute = tarfile.TarInfo("../escape.png"), tarfile.TarInfo("/tmp/absolute.png")
    escape.size = absolute.size = len(image)
    append_raw_members(shard, [(link, None), (escape, image), (absolute, image)])

    loader = ShardLoader(config(manifest, num_workers=2, max_bad_fraction=1.0), "train", GRAY, 1, train=False)
    keys = sorted(key for batch in loader for key in batch["key"])
    assert keys == ["train000-00000", "train000-00001", "train000-00002", "train000-00003"]
    assert loader.bad_samples == {"missing_image": 1}
    assert not marker.exists() and not (tmp_path / "escape.png").exists()


def test_bad_manifests_name_the_path_and_the_problem(manifest, tmp_path):
    with pytest.raises(UserError, match=r"shard manifest .*nowhere does not exist"):
        ShardLoader(DataConfig(manifest=str(tmp_path / "nowhere")), "train", GRAY, 2)
    with pytest.raises(UserError, match=r"no split 'dev' \(splits: test, train, val\)"):
        ShardLoader(config(manifest), "dev", GRAY, 2)
    doc = json.loads(manifest.read_text())
    cases = {
        "empty": dict(doc, splits={"train": {"num_samples": 0, "shards": []}}),
        "format": dict(doc, format="other/9"),
        "mode": dict(doc, mode="CMYK"),
        "noshards": dict(doc, splits={"train": {"num_samples": 3}}),
    }
    messages = {"empty": ": split 'train' is empty", "format": ": field 'format' is 'other/9'",
                "mode": ": field 'mode' is 'CMYK'", "noshards": ": field 'splits.train.shards' must be a list"}
    for name, content in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(UserError, match=f"{name}.json{messages[name]}"):
            ShardLoader(DataConfig(manifest=str(path)), "train", GRAY, 2)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match="broken.json is not valid JSON"):
        ShardLoader(DataConfig(manifest=str(tmp_path / "broken.json")), "train", GRAY, 2)


def test_missing_shard_file_is_a_user_error(tmp_path):
    manifest = write_dataset(tmp_path, {"train": [3, 3]})
    (tmp_path / "train-000001.tar").unlink()
    with pytest.raises(UserError, match="cannot open shard .*train-000001.tar"):
        list(ShardLoader(config(manifest, num_workers=2), "train", GRAY, 2, train=False))


def test_palette_channels_must_match_the_images(manifest):
    with pytest.raises(UserError, match="palette has 3 channel"):
        ShardLoader(config(manifest), "train", Palette(np.zeros((4, 3), dtype=np.float32)), 2)


def test_reads_shards_written_by_data_shards(tmp_path):
    writer = pytest.importorskip("data_shards.writer", reason="data_shards not importable (re-run pip install -e .)")
    images = np.random.default_rng(0).integers(0, 256, size=(23, 8, 8, 3), dtype=np.uint8)
    writer.write_shards(images, np.arange(23) % 4, tmp_path, "tiny", split="train", shard_size=10, mode="RGB")
    palette = Palette(np.random.default_rng(1).uniform(0, 255, size=(8, 3)).astype(np.float32))
    loader = ShardLoader(config(tmp_path, num_workers=2), "train", palette, 5, train=False)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 23 and loader.bad_samples == {}
    for batch in batches:
        assert batch["pixels"].shape[1:] == (8, 8, 3)
        assert np.array_equal(batch["tokens"].numpy(), palette.encode(batch["pixels"]).reshape(len(batch["key"]), -1).numpy())

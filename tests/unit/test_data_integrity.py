"""Training reads a shard only if it matches the manifest (`data.verify`): a changed shard stops the
stream with one line naming shard and manifest; each shard is hashed once per process."""
import json

import numpy as np
import pytest

from gpt_vision.data import DataConfig, ShardLoader
from gpt_vision.data import integrity
from gpt_vision.data.palette import Palette
from gpt_vision.errors import ConfigError, UserError
from tests.helpers.shardgen import relabel_to_zero, serve_http, write_dataset

GRAY = Palette(np.linspace(0, 255, 8, dtype=np.float32)[:, None])


def labels(loader) -> list[int]:
    return [int(label) for batch in loader for label in batch["label"]]


@pytest.fixture()
def changed(tmp_path):
    manifest = write_dataset(tmp_path, {"train": [5, 5]})
    relabel_to_zero(tmp_path / "train-000001.tar")
    return manifest


def test_a_changed_shard_stops_the_stream_naming_shard_and_manifest(changed):
    loader = ShardLoader(DataConfig(manifest=str(changed), num_workers=0), "train", GRAY, 2, train=False)
    with pytest.raises(UserError) as raised:
        labels(loader)
    message = str(raised.value)
    assert message.startswith(f"shard {changed.parent / 'train-000001.tar'} has sha256 ")
    assert f"manifest {changed} says " in message and message.endswith("rewrite the shards (or set data.verify=off)")
    assert "\n" not in message


def test_with_verify_off_the_changed_labels_are_read(changed):
    loader = ShardLoader(DataConfig(manifest=str(changed), num_workers=0, verify="off"), "train", GRAY, 10, train=False)
    assert labels(loader) == [0, 1, 2, 3, 4, 0, 0, 0, 0, 0]


def test_size_mode_checks_bytes_only(changed, tmp_path):
    same_size = ShardLoader(DataConfig(manifest=str(changed), num_workers=0, verify="size"), "train", GRAY, 10,
                            train=False)
    assert len(labels(same_size)) == 10  # relabelled in place: same size, so `size` lets it through
    cut = write_dataset(tmp_path / "cut", {"train": [5]})
    shard = cut.parent / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-512])
    with pytest.raises(UserError, match=rf"shard {shard} holds \d+ bytes, manifest {cut} says \d+: the shard changed"):
        labels(ShardLoader(DataConfig(manifest=str(cut), num_workers=0, verify="size"), "train", GRAY, 10, train=False))


def test_size_mode_needs_sizes_in_the_manifest(tmp_path):
    manifest = write_dataset(tmp_path, {"train": [2]})
    doc = json.loads(manifest.read_text())
    del doc["splits"]["train"]["shards"][0]["bytes"]  # as in manifests written before sizes were recorded
    manifest.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=rf"shard manifest {manifest} records no shard sizes \('bytes'\)"):
        labels(ShardLoader(DataConfig(manifest=str(manifest), num_workers=0, verify="size"), "train", GRAY, 2,
                           train=False))


def test_each_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    manifest = write_dataset(tmp_path, {"train": [4, 4, 4]})
    hashed = []
    check = integrity._check_local
    monkeypatch.setattr(integrity, "_check_local", lambda shard, access: (hashed.append(shard.url), check(shard, access)))
    loader = ShardLoader(DataConfig(manifest=str(manifest), num_workers=0), "train", GRAY, 4, seed=1)
    stream = iter(loader)
    for _ in range(3 * 3):  # three epochs of three batches
        next(stream)
    assert sorted(hashed) == sorted(str(tmp_path / f"train-{i:06d}.tar") for i in range(3))


def test_remote_shards_are_hashed_as_they_stream(changed):
    seen = []
    with serve_http(changed.parent) as base:
        loader = ShardLoader(DataConfig(manifest=base, num_workers=0), "train", GRAY, 1, train=False)
        with pytest.raises(UserError, match=rf"shard {base}/train-000001.tar has sha256 .* manifest {base}/manifest.json says"):
            for batch in loader:
                seen.extend(batch["key"])
    assert seen[:5] == [f"train000-{i:05d}" for i in range(5)]


def test_verify_mode_is_checked():
    with pytest.raises(ConfigError, match="config key 'verify': is 'md5', expected one of hash, size, off"):
        DataConfig(manifest="m", verify="md5").check()


def test_the_writer_records_sizes_the_reader_accepts(tmp_path):
    from data_shards import write_shards
    from gpt_vision.data import load_manifest

    images = np.zeros((3, 4, 4), dtype=np.uint8)
    write_shards({"train": (images, None)}, None, tmp_path, "z", shard_size=2)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    sizes = [shard["bytes"] for shard in doc["splits"]["train"]["shards"]]
    assert sizes == [(tmp_path / f"train-{i:06d}.tar").stat().st_size for i in range(2)]
    assert [s.size for s in load_manifest(tmp_path).splits["train"]] == sizes

"""Two real processes (gloo), each with its own ShardLoader: together they cover every sample
exactly once per training epoch and in an evaluation pass."""
import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt_vision.data import DataConfig, Palette, ShardLoader
from tests.helpers.shardgen import write_dataset

pytestmark = pytest.mark.distributed

TRAIN, TEST = [9, 6, 7, 8, 5], [5, 4, 6]
PALETTE = Palette(np.linspace(0, 255, 8, dtype=np.float32)[:, None])


def _epoch_zero_keys(loader):
    keys = []
    for batch in loader:
        state = loader.state_dict()
        if state["workers"][(state["next_worker"] - 1) % state["num_workers"]][0] == 0:
            keys += batch["key"]
        if all(epoch > 0 for epoch, _ in state["workers"]):
            return keys


def _run(rank, world_size, manifest, store):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        cfg = DataConfig(manifest=manifest, num_workers=2, shuffle_buffer=4)
        train = ShardLoader(cfg, "train", PALETTE, 1, rank=rank, world_size=world_size, seed=3)
        evaluation = ShardLoader(cfg, "test", PALETTE, 4, rank=rank, world_size=world_size, train=False)
        mine = {"train": _epoch_zero_keys(train), "test": [key for batch in evaluation for key in batch["key"]]}
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
        for split, counts in (("train", TRAIN), ("test", TEST)):
            keys = sorted(key for part in gathered for key in part[split])
            expected = sorted(f"{split}{s:03d}-{i:05d}" for s, count in enumerate(counts) for i in range(count))
            assert keys == expected, f"rank {rank}: {split} cover is wrong"
        assert set(gathered[0]["train"]).isdisjoint(gathered[1]["train"])
    finally:
        dist.destroy_process_group()


def test_two_processes_cover_every_sample_exactly_once(tmp_path):
    manifest = write_dataset(tmp_path / "set", {"train": TRAIN, "test": TEST})
    mp.spawn(_run, args=(2, str(manifest), str(tmp_path / "store")), nprocs=2, join=True)

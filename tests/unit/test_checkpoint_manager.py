"""CheckpointManager on the single strategy, in this process: save, latest, keep_last pruning,
incomplete steps ignored, the cadence, and a round trip of weights, optimizer and rank state."""
import json

import torch
from torch import nn

from gpt_vision.checkpoint import CheckpointConfig, CheckpointManager, rng_state
from gpt_vision.layout import COMMIT_MARKER
from gpt_vision.optim import OptimConfig
from gpt_vision.parallel import BatchLayout, ParallelConfig, build_strategy

RANK_STATE = {"data": {"position": 1}, "rng": rng_state()}  # what the loop saves: data position, RNG


def tiny_strategy(seed: int = 0):
    torch.manual_seed(seed)
    strategy = build_strategy(ParallelConfig(precision="fp32"), 0, 1, 0, BatchLayout())
    strategy.setup(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), OptimConfig(lr=0.1, implementation="foreach"))
    return strategy


def train_once(strategy) -> None:
    strategy.backward(strategy.module(torch.ones(3, 4)).square().mean())
    strategy.step(0.1)


def test_save_commits_and_latest_names_the_newest_complete_step(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(every=2, keep_last=5), tiny_strategy())
    assert manager.latest() is None
    first = manager.save(2, {"note": "a"}, RANK_STATE, {"palette.npy": b"\x00\x01"})
    second = manager.save(4, {"note": "b"}, dict(RANK_STATE, data={"position": 2}))
    assert manager.latest() == second and first.name == "step-0000002"
    assert (first / COMMIT_MARKER).is_file() and (first / "palette.npy").read_bytes() == b"\x00\x01"
    meta, rank_state = manager.load_rank_state(second)
    assert (meta["step"], meta["note"], meta["strategy"], meta["world_size"]) == (4, "b", "single", 1)
    assert rank_state["data"] == {"position": 2}


def test_keep_last_prunes_only_older_complete_steps(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=2), tiny_strategy())
    for step in (1, 2, 3, 4):
        manager.save(step, {}, RANK_STATE)
    assert sorted(p.name for p in manager.root.iterdir() if p.is_dir()) == ["step-0000003", "step-0000004"]


def test_an_incomplete_step_is_ignored_and_never_pruned_in_place_of_a_complete_one(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=1), tiny_strategy())
    done = manager.save(1, {}, RANK_STATE)
    partial = manager.root / "step-0000009"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert manager.latest() == done  # the newer but uncommitted step does not count
    manager.save(2, {}, RANK_STATE)
    assert manager.latest().name == "step-0000002" and not done.exists() and partial.exists()


def test_a_stale_partial_save_of_the_same_step_is_replaced(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(), tiny_strategy())
    stale = manager.root / "step-0000005"
    stale.mkdir(parents=True)
    (stale / "leftover.bin").write_bytes(b"x")
    manager.save(5, {}, RANK_STATE)
    assert not (stale / "leftover.bin").exists() and (stale / COMMIT_MARKER).is_file()


def test_due_follows_checkpoint_every(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(every=3), tiny_strategy())
    assert [step for step in range(1, 10) if manager.due(step)] == [3, 6, 9]


def test_weights_and_optimizer_round_trip_through_the_strategy(tmp_path):
    trained = tiny_strategy(seed=0)
    train_once(trained)
    step_dir = CheckpointManager(tmp_path, CheckpointConfig(), trained).save(1, {}, RANK_STATE)
    restored = tiny_strategy(seed=1)
    restored.load(step_dir)
    for a, b in zip(trained.unwrapped.parameters(), restored.unwrapped.parameters()):
        assert torch.equal(a, b)
    train_once(trained), train_once(restored)  # same Adam moments: the next step matches too
    for a, b in zip(trained.unwrapped.parameters(), restored.unwrapped.parameters()):
        assert torch.equal(a, b)
    assert json.loads((step_dir / "meta.json").read_text())["step"] == 1

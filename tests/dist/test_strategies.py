"""single / ddp / fsdp / fairscale on real gloo process groups: same numbers, exact resume."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from multiproc import run_ranks
from toymodel import global_batch, make_model

from gpt_vision.parallel import ParallelConfig, build_strategy, load_consolidated
from gpt_vision.train.config import OptimConfig

pytestmark = pytest.mark.distributed

GLOBAL_BATCH = 4
DISTRIBUTED = ("ddp", "fsdp", "fairscale")


def lr_at(step: int) -> float:
    return 1e-2 * (step + 1) / 5


def build(name: str, rank: int, world: int, grad_accum: int = 1, seed: int = 0, implementation: str = "foreach"):
    strategy = build_strategy(ParallelConfig(strategy=name, precision="fp32"), rank, world, rank)
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.5, implementation=implementation)
    strategy.setup(make_model(seed), optim, GLOBAL_BATCH // (world * grad_accum), grad_accum)
    return strategy


def train_step(strategy, step: int, grad_accum: int) -> float:
    """One optimizer step over this rank's rows of the global batch; returns the global mean loss."""
    rows = global_batch(step, GLOBAL_BATCH).chunk(strategy.world_size)[strategy.rank].chunk(grad_accum)
    total = torch.zeros(())
    for i, micro in enumerate(rows):
        with strategy.accumulate(i == grad_accum - 1), strategy.autocast():
            loss = strategy.module(micro)
        strategy.backward(loss)
        total += loss.detach() / grad_accum
    result = strategy.step(lr_at(step))
    assert not bool(result.skipped)
    if strategy.world_size > 1:
        dist.all_reduce(total)
    return float(total) / strategy.world_size


def local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def inner_optimizer(strategy) -> torch.optim.Optimizer:
    return getattr(strategy.optimizer, "optim", strategy.optimizer)  # OSS wraps the shard's AdamW


def snapshot(strategy) -> dict[str, torch.Tensor]:
    """This rank's local model and optimizer tensors, in a layout two instances share."""
    out = {f"param.{n}": local(p) for n, p in strategy.unwrapped.named_parameters()}
    optimizer = inner_optimizer(strategy)
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                out[f"optim.{g}.{i}.{key}"] = local(value)
    return out


def exact_mismatches(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]


# ---- workers (module level: they are pickled into the spawned ranks) ----

def run_training(rank: int, world: int, name: str, grad_accum: int, steps: int):
    strategy = build(name, rank, world, grad_accum)
    losses = [train_step(strategy, s, grad_accum) for s in range(steps)]
    return losses, strategy.full_state_dict()


def run_round_trip(rank: int, world: int, name: str, directory: str):
    strategy = build(name, rank, world)
    for s in range(3):
        train_step(strategy, s, 1)
    strategy.save(Path(directory))
    saved = snapshot(strategy)
    full = strategy.full_state_dict()
    offline = load_consolidated(Path(directory), name) if rank == 0 else None
    continued = [train_step(strategy, s, 1) for s in (3, 4)]

    fresh = build(name, rank, world, seed=123)
    fresh.load(Path(directory))
    mismatches = exact_mismatches(saved, snapshot(fresh))
    resumed = [train_step(fresh, s, 1) for s in (3, 4)]
    offline_mismatches = exact_mismatches(full, offline) if rank == 0 else []
    return mismatches, offline_mismatches, continued, resumed, len(saved)


def run_fsdp_save(rank: int, world: int, directory: str):
    strategy = build("fsdp", rank, world)
    for s in range(2):
        train_step(strategy, s, 1)
    strategy.save(Path(directory))
    return strategy.full_state_dict()


def run_fsdp_load(rank: int, world: int, directory: str):
    strategy = build("fsdp", rank, world, seed=7)
    strategy.load(Path(directory))
    steps = {float(inner_optimizer(strategy).state[p]["step"]) for p in strategy.optimizer.state}
    full = strategy.full_state_dict()
    return full, load_consolidated(Path(directory), "fsdp") if rank == 0 else None, steps


def run_nonfinite(rank: int, world: int, name: str, implementation: str):
    strategy = build(name, rank, world, implementation=implementation)
    train_step(strategy, 0, 1)
    before = snapshot(strategy)
    rows = global_batch(1, GLOBAL_BATCH).chunk(world)[rank]
    strategy.backward(strategy.module(rows))
    if rank == world - 1:  # corrupt one local gradient on one rank only
        grad = next(p.grad for p in strategy.unwrapped.parameters() if p.grad is not None)
        local_grad = grad.to_local() if isinstance(grad, DTensor) else grad
        local_grad.view(-1)[0] = math.inf
    result = strategy.step(lr_at(1))
    after = snapshot(strategy)
    grads_left = [p for p in strategy.unwrapped.parameters() if p.grad is not None]
    recovered = train_step(strategy, 2, 1)
    return bool(result.skipped), float(result.grad_norm), exact_mismatches(before, after), len(grads_left), recovered


def run_memory(rank: int, world: int):
    strategy = build("fsdp", rank, world, seed=0)
    train_step(strategy, 0, 1)
    tensors = list(snapshot(strategy).values())
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- tests ----

def _assert_close_losses(ref: list[float], other: list[float], label: str) -> None:
    for i, (a, b) in enumerate(zip(ref, other)):
        assert abs(a - b) <= 1e-5 * abs(a), f"{label}: loss {i} {b} vs single {a}"


def _assert_close_states(ref: dict, other: dict, label: str) -> None:
    assert ref.keys() == other.keys(), f"{label}: keys differ {sorted(set(ref) ^ set(other))}"
    for k in ref:
        torch.testing.assert_close(other[k], ref[k], rtol=1e-5, atol=1e-5, msg=f"{label}: {k}")


def test_all_strategies_match_single_process():
    steps = 5
    [(ref_losses, ref_state)] = run_ranks(run_training, 1, "single", 1, steps)
    [(accum_losses, accum_state)] = run_ranks(run_training, 1, "single", 2, steps)
    _assert_close_losses(ref_losses, accum_losses, "single grad_accum=2")
    _assert_close_states(ref_state, accum_state, "single grad_accum=2")
    for name in DISTRIBUTED:
        (losses, state), (losses1, state1) = run_ranks(run_training, 2, name, 1, steps)
        assert losses == losses1 and state1 is None
        _assert_close_losses(ref_losses, losses, name)
        _assert_close_states(ref_state, state, name)
    assert ref_losses[-1] < ref_losses[0]


@pytest.mark.parametrize("name", ("single",) + DISTRIBUTED)
def test_checkpoint_round_trip_is_exact(name, tmp_path):
    world = 1 if name == "single" else 2
    results = run_ranks(run_round_trip, world, name, str(tmp_path / "ckpt"))
    for rank, (mismatches, offline_mismatches, continued, resumed, count) in enumerate(results):
        assert count > 2 * len(list(make_model().parameters())), "optimizer state missing from snapshot"
        assert mismatches == [], f"rank {rank}: after load differs in {mismatches}"
        assert offline_mismatches == [], f"load_consolidated differs from full_state_dict in {offline_mismatches}"
        assert resumed == continued


@pytest.mark.slow
@pytest.mark.parametrize("save_world,load_world", [(2, 1), (1, 2)])
def test_fsdp_checkpoint_reshards(save_world, load_world, tmp_path):
    directory = str(tmp_path / "dcp")
    saved = run_ranks(run_fsdp_save, save_world, directory)[0]
    offline = load_consolidated(Path(directory), "fsdp")
    assert exact_mismatches(saved, offline) == []
    loaded = run_ranks(run_fsdp_load, load_world, directory)
    full, offline_at_rank0, steps = loaded[0]
    assert exact_mismatches(saved, full) == []
    assert exact_mismatches(full, offline_at_rank0) == []
    assert all(s == {2.0} for _, _, s in loaded)


@pytest.mark.parametrize(
    "name,implementation",
    [("single", "foreach"), ("single", "fused"), ("ddp", "foreach"), ("fsdp", "foreach"), ("fsdp", "fused"),
     ("fairscale", "foreach")],
)
def test_nonfinite_gradient_skips_step_on_every_rank(name, implementation):
    world = 1 if name == "single" else 2
    for rank, (skipped, norm, mismatches, grads_left, recovered) in enumerate(
        run_ranks(run_nonfinite, world, name, implementation)
    ):
        assert skipped, f"rank {rank} did not skip"
        assert not math.isfinite(norm)
        assert mismatches == [], f"rank {rank}: skipped step changed {mismatches}"
        assert grads_left == 0
        assert math.isfinite(recovered)


@pytest.mark.slow
def test_fsdp_halves_parameter_and_optimizer_memory():
    [single_bytes] = run_ranks(run_memory, 1)
    per_rank = run_ranks(run_memory, 2)
    assert max(per_rank) <= 0.55 * single_bytes, (per_rank, single_bytes)

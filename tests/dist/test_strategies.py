"""single / ddp / fsdp / fairscale on real gloo process groups: same numbers, exact resume."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.helpers.multiproc import run_ranks
from tests.helpers.toymodel import global_batch, make_model

from gpt_vision.errors import ConfigError
from gpt_vision.optim import OptimConfig
from gpt_vision.parallel import BatchLayout, ParallelConfig, build_strategy, load_consolidated

pytestmark = pytest.mark.distributed

GLOBAL_BATCH = 4
DISTRIBUTED = ("ddp", "fsdp", "fairscale")


def lr_at(step: int) -> float:
    return 1e-2 * (step + 1) / 5


def build(name: str, rank: int, world: int, grad_accum: int = 1, seed: int = 0, implementation: str = "foreach"):
    strategy = build_strategy(ParallelConfig(strategy=name, precision="fp32"), rank, world, rank,
                              BatchLayout(GLOBAL_BATCH // (world * grad_accum), grad_accum))
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.5, implementation=implementation)
    strategy.setup(make_model(seed), optim)
    return strategy


def train_step(strategy, step: int, grad_accum: int) -> float:
    """One optimizer step over this rank's rows of the global batch; returns the global mean loss."""
    rows = global_batch(step, GLOBAL_BATCH).chunk(strategy.world_size)[strategy.rank].chunk(grad_accum)
    total = torch.zeros(())
    for i, micro in enumerate(rows):
        with strategy.accumulate(i == grad_accum - 1):
            with strategy.autocast():
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

def run_cases(rank: int, world: int, worker, cases: list[tuple]) -> list:
    """Several scenarios in one set of ranks: starting processes is the slow part here."""
    return [worker(rank, world, *case) for case in cases]


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


def run_save_then_continue(rank: int, world: int, name: str, directory: str):
    strategy = build(name, rank, world)
    for s in range(2):
        train_step(strategy, s, 1)
    strategy.save(Path(directory))
    full = strategy.full_state_dict()
    return full, [train_step(strategy, s, 1) for s in (2, 3)]


def run_load_then_continue(rank: int, world: int, name: str, directory: str):
    strategy = build(name, rank, world, seed=7)
    strategy.load(Path(directory))
    optimizer = inner_optimizer(strategy)
    steps = {float(state["step"]) for state in optimizer.state.values()}
    full = strategy.full_state_dict()
    offline = load_consolidated(Path(directory), name) if rank == 0 else None
    return full, offline, steps, [train_step(strategy, s, 1) for s in (2, 3)]


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
    # fairscale keeps bucketed grads as zeroed views instead of None.
    grads_left = [p for p in strategy.unwrapped.parameters() if p.grad is not None and local(p.grad).any()]
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
    ref, accum = run_ranks(run_cases, 1, run_training, [("single", 1, steps), ("single", 2, steps)])[0]
    (ref_losses, ref_state), (accum_losses, accum_state) = ref, accum
    _assert_close_losses(ref_losses, accum_losses, "single grad_accum=2")
    _assert_close_states(ref_state, accum_state, "single grad_accum=2")
    rank0, rank1 = run_ranks(run_cases, 2, run_training, [(name, 1, steps) for name in DISTRIBUTED])
    for name, (losses, state), (losses1, state1) in zip(DISTRIBUTED, rank0, rank1):
        assert losses == losses1 and state1 is None
        _assert_close_losses(ref_losses, losses, name)
        _assert_close_states(ref_state, state, name)
    assert ref_losses[-1] < ref_losses[0]


def test_checkpoint_round_trip_is_exact(tmp_path):
    """Per strategy at its world size: model and AdamW state restored bit for bit, same next losses."""
    for world, names in ((1, ("single",)), (2, DISTRIBUTED)):
        cases = [(name, str(tmp_path / name)) for name in names]
        for rank, per_case in enumerate(run_ranks(run_cases, world, run_round_trip, cases)):
            for name, (mismatches, offline_mismatches, continued, resumed, count) in zip(names, per_case):
                label = f"{name} rank {rank}"
                assert count > 2 * len(list(make_model().parameters())), f"{label}: no optimizer state"
                assert mismatches == [], f"{label}: after load differs in {mismatches}"
                assert offline_mismatches == [], f"{label}: load_consolidated != full_state_dict: {offline_mismatches}"
                assert resumed == continued, label


@pytest.mark.slow
@pytest.mark.parametrize("save_world,load_world", [(2, 1), (1, 2)])
def test_checkpoints_resume_at_another_world_size(save_world, load_world, tmp_path):
    """Weights exact after resharding, offline consolidation exact, and training continues as before."""
    cases = [(name, str(tmp_path / name)) for name in DISTRIBUTED]
    saved = run_ranks(run_cases, save_world, run_save_then_continue, cases)[0]
    loaded = run_ranks(run_cases, load_world, run_load_then_continue, cases)
    for i, name in enumerate(DISTRIBUTED):
        saved_state, continued = saved[i]
        full, offline, _, resumed = loaded[0][i]
        assert exact_mismatches(saved_state, full) == [], name
        assert exact_mismatches(full, offline) == [], name
        assert exact_mismatches(full, load_consolidated(tmp_path / name, name)) == [], name
        assert all(per_rank[i][2] == {2.0} for per_rank in loaded), f"{name}: AdamW step not restored"
        _assert_close_losses(continued, resumed, f"{name} resumed at world {load_world}")


def test_nonfinite_gradient_skips_step_on_every_rank():
    """One rank's gradient turns inf: every rank skips, nothing changes, the next step trains."""
    for world, cases in (
        (1, [("single", "foreach"), ("single", "fused")]),
        (2, [("ddp", "foreach"), ("fsdp", "foreach"), ("fsdp", "fused"), ("fairscale", "foreach"), ("fairscale", "fused")]),
    ):
        for rank, per_case in enumerate(run_ranks(run_cases, world, run_nonfinite, cases)):
            for (name, impl), (skipped, norm, mismatches, grads_left, recovered) in zip(cases, per_case):
                label = f"{name}/{impl} rank {rank}"
                assert skipped, f"{label}: did not skip"
                assert not math.isfinite(norm), f"{label}: reported norm {norm}"
                assert mismatches == [], f"{label}: skipped step changed {mismatches}"
                assert grads_left == 0, f"{label}: {grads_left} non-zero grads left"
                assert math.isfinite(recovered), label


@pytest.mark.slow
def test_fsdp_halves_parameter_and_optimizer_memory():
    [single_bytes] = run_ranks(run_memory, 1)
    per_rank = run_ranks(run_memory, 2)
    assert max(per_rank) <= 0.55 * single_bytes, (per_rank, single_bytes)


def test_importing_the_registry_loads_no_backend():
    code = "import sys, gpt_vision.parallel; print(sorted({'deepspeed', 'fairscale'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_strategy_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="unknown strategy 'zero9'.*fsdp"):
        load_consolidated(tmp_path, "zero9")

"""DeepSpeed ZeRO 0-3 on 2 gloo ranks against plain single-process torch AdamW.

Engine starts dominate the cost, so one 2-rank session per stage runs every case (equivalence,
save/resume, consolidation, non-finite skip, memory) and the tests assert on what it returned.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from gpt_vision.errors import ConfigError
from gpt_vision.optim import OptimConfig, adamw_kwargs, param_groups
from gpt_vision.parallel import BatchLayout, ParallelConfig
from tests.helpers.multiproc import run_ranks
from tests.helpers.toymodel import global_batch as toy_batch
from tests.helpers.toymodel import make_model

pytestmark = pytest.mark.distributed

MICRO_BATCH, WORLD = 2, 2
STEPS, SAVE_AT = 5, 3
LR = 1e-2
SEED = 1234


def optim_cfg() -> OptimConfig:
    return OptimConfig(lr=LR, weight_decay=0.1, grad_clip=1.0)


def global_batch(step: int, grad_accum: int) -> torch.Tensor:
    return toy_batch(step, WORLD * MICRO_BATCH * grad_accum)


def model(seed: int = SEED) -> nn.Module:
    return make_model(seed)


def reference_losses(grad_accum: int, steps: int = STEPS) -> list[float]:
    """Plain torch: one process, the whole global batch at once, clip, AdamW."""
    net, cfg = model(), optim_cfg()
    opt = torch.optim.AdamW(param_groups(net, cfg), **adamw_kwargs(cfg, torch.device("cpu")))
    losses = []
    for step in range(steps):
        loss = net(global_batch(step, grad_accum))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ----- what runs inside the ranks -------------------------------------------------------------

def make_strategy(rank: int, world: int, stage: int, grad_accum: int, seed: int = SEED, **offload):
    from gpt_vision.parallel.deepspeed_zero import DeepSpeedStrategy

    cfg = ParallelConfig(strategy="deepspeed", zero_stage=stage, precision="fp32", **offload)
    # The global batch is fixed; fewer ranks take bigger micro batches.
    strategy = DeepSpeedStrategy(cfg, rank, world, rank, BatchLayout(MICRO_BATCH * WORLD // world, grad_accum))
    strategy.setup(model(seed), optim_cfg())
    return strategy


def train_step(strategy, step: int, grad_accum: int, poison: bool = False):
    """One optimizer step on this rank's slices of the global batch; returns (global loss, result)."""
    batch = global_batch(step, grad_accum)
    per_rank = len(batch) // strategy.world_size
    micro_batch = per_rank // grad_accum
    mine = batch[strategy.rank * per_rank:(strategy.rank + 1) * per_rank]
    total = torch.zeros(())
    for micro in range(grad_accum):
        with strategy.accumulate(micro == grad_accum - 1):
            with strategy.autocast():
                loss = strategy.module(mine[micro * micro_batch:(micro + 1) * micro_batch])
            if poison:
                loss = loss * float("nan")
            strategy.backward(loss)
        total += loss.detach()
    result = strategy.step(LR)
    total /= grad_accum * strategy.world_size
    if strategy.world_size > 1:
        torch.distributed.all_reduce(total)
    return total.item(), result


def optimizer_moments(strategy) -> dict[str, torch.Tensor]:
    """Full fp32 exp_avg/exp_avg_sq per parameter, gathered from the partitions (collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    out = {}
    for name, param in strategy.unwrapped.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            state = safe_get_full_optimizer_state(param, key)
            if state is None:  # stage 0: the torch optimizer holds full tensors
                state = strategy.engine.optimizer.state[param][key]
            out[f"{name}.{key}"] = state.detach().cpu().clone()
    return out


def local_state_bytes(strategy) -> int:
    """Bytes this rank holds for parameters plus optimizer state (partitions, not gathered views)."""
    engine_opt = strategy.engine.optimizer
    params = 0
    for p in strategy.unwrapped.parameters():
        params += (p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
    inner = getattr(engine_opt, "optimizer", engine_opt)
    state = sum(
        t.numel() * t.element_size()
        for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0
    )
    masters = sum(t.numel() * t.element_size() for t in getattr(engine_opt, "fp32_partitioned_groups_flat", []))
    return params + state + masters


def session(rank: int, world: int, stage: int, tmp: str) -> dict:
    """Every case for one stage on one set of ranks; rank 0 returns the numbers."""
    from pathlib import Path

    from gpt_vision.parallel.deepspeed_zero import consolidate_deepspeed

    out: dict = {}
    ckpt = Path(tmp) / f"stage{stage}"
    # Uninterrupted run, checkpoint after SAVE_AT steps.
    strategy = make_strategy(rank, world, stage, grad_accum=1)
    losses = []
    for step in range(STEPS):
        if step == SAVE_AT:
            strategy.save(ckpt)
            out["saved_state"] = strategy.full_state_dict()
            out["saved_moments"] = optimizer_moments(strategy)
            strategy.barrier()
            if rank == 0:
                out["consolidated"] = consolidate_deepspeed(ckpt)
        losses.append(train_step(strategy, step, 1)[0])
    out["losses"] = losses
    out["memory"] = local_state_bytes(strategy)
    del strategy

    # Resume into a differently initialized model: everything must come from the files.
    resumed = make_strategy(rank, world, stage, grad_accum=1, seed=SEED + 99)
    resumed.load(ckpt)
    out["loaded_state"] = resumed.full_state_dict()
    out["loaded_moments"] = optimizer_moments(resumed)
    out["resumed_losses"] = [train_step(resumed, step, 1)[0] for step in range(SAVE_AT, STEPS)]

    # A NaN on rank 1 only: every rank must skip, weights unchanged bit for bit.
    before = resumed.full_state_dict()
    _, result = train_step(resumed, STEPS, 1, poison=(rank == 1))
    flags = [None] * world
    torch.distributed.all_gather_object(flags, bool(result.skipped))
    out["skip_flags"] = flags
    out["skip_norm"] = float(result.grad_norm)
    out["weights_before_skip"], out["weights_after_skip"] = before, resumed.full_state_dict()
    out["loss_after_skip"] = train_step(resumed, STEPS + 1, 1)[0]
    del resumed

    accum = make_strategy(rank, world, stage, grad_accum=2)
    out["accum_losses"] = [train_step(accum, step, 2)[0] for step in range(STEPS)]
    return out if rank == 0 else {}


def resume_on_one_rank(rank: int, world: int, stage: int, tmp: str) -> dict:
    from pathlib import Path

    strategy = make_strategy(rank, world, stage, grad_accum=1, seed=SEED + 7)
    strategy.load(Path(tmp) / f"stage{stage}")
    return {
        "state": strategy.full_state_dict(),
        "moments": optimizer_moments(strategy),
        "losses": [train_step(strategy, step, 1)[0] for step in range(SAVE_AT, STEPS)],
    }


def single_rank_memory(rank: int, world: int) -> int:
    strategy = make_strategy(rank, world, stage=3, grad_accum=1)
    train_step(strategy, 0, 1)
    return local_state_bytes(strategy)


def offloaded_losses(rank: int, world: int) -> dict[str, list[float]]:
    out = {}
    for stage, offload in ((2, dict(offload_optimizer=True)), (3, dict(offload_optimizer=True, offload_params=True))):
        strategy = make_strategy(rank, world, stage, grad_accum=1, **offload)
        out[f"stage{stage}"] = [train_step(strategy, step, 1)[0] for step in range(STEPS)]
    return out


# ----- tests --------------------------------------------------------------------------------

STAGES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ds"))
    return tmp, {stage: run_ranks(session, WORLD, stage, tmp, timeout=600)[0] for stage in STAGES}


def assert_close(actual, expected, rel):
    for a, e in zip(actual, expected, strict=True):
        assert math.isclose(a, e, rel_tol=rel), (actual, expected)


def assert_equal_dicts(a: dict, b: dict):
    assert a.keys() == b.keys()
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, mismatched


@pytest.mark.parametrize("stage", STAGES)
def test_losses_match_plain_torch_adamw(sessions, stage):
    _, results = sessions
    assert_close(results[stage]["losses"], reference_losses(grad_accum=1), rel=1e-5)
    assert_close(results[stage]["accum_losses"], reference_losses(grad_accum=2), rel=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_round_trip_restores_model_and_optimizer(sessions, stage):
    _, results = sessions
    r = results[stage]
    assert_equal_dicts(r["loaded_state"], r["saved_state"])
    assert_equal_dicts(r["loaded_moments"], r["saved_moments"])
    assert_close(r["resumed_losses"], r["losses"][SAVE_AT:], rel=1e-6)


@pytest.mark.parametrize("stage", STAGES)
def test_consolidate_equals_full_state_dict(sessions, stage):
    _, results = sessions
    r = results[stage]
    assert_equal_dicts(r["consolidated"], r["saved_state"])
    assert r["saved_state"].keys() == model().state_dict().keys()


@pytest.mark.parametrize("stage", STAGES)
def test_non_finite_gradient_skips_on_all_ranks(sessions, stage):
    _, results = sessions
    r = results[stage]
    assert r["skip_flags"] == [True] * WORLD
    assert not math.isfinite(r["skip_norm"])
    assert_equal_dicts(r["weights_after_skip"], r["weights_before_skip"])
    assert math.isfinite(r["loss_after_skip"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", (2, 3))
def test_resume_two_ranks_on_one(sessions, stage):
    tmp, results = sessions
    r = results[stage]
    one = run_ranks(resume_on_one_rank, 1, stage, tmp, timeout=600)[0]
    assert_equal_dicts(one["state"], r["saved_state"])
    assert_equal_dicts(one["moments"], r["saved_moments"])
    assert_close(one["losses"], r["losses"][SAVE_AT:], rel=1e-5)


def test_zero3_memory_per_rank_is_at_most_55_percent_of_one_rank(sessions):
    _, results = sessions
    single = run_ranks(single_rank_memory, 1, timeout=600)[0]
    assert results[3]["memory"] <= 0.55 * single, (results[3]["memory"], single)


@pytest.mark.slow
def test_cpu_offload_matches_plain_torch_adamw():
    expected = reference_losses(grad_accum=1)
    for losses in run_ranks(offloaded_losses, 1, timeout=600)[0].values():
        assert_close(losses, expected, rel=1e-5)


def test_conflicting_deepspeed_json_names_the_key(tmp_path):
    from gpt_vision.parallel.deepspeed_zero import build_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}}))
    kwargs = dict(
        dtype=torch.float32, offload_optimizer=False, offload_params=False, optim_cfg=optim_cfg(),
        micro_batch_size=2, grad_accum=1, world_size=2, user_config_path=str(path),
    )
    with pytest.raises(ConfigError) as err:
        build_deepspeed_config(stage=2, **kwargs)
    assert err.value.key == "deepspeed_config"
    assert "zero_optimization.stage: file says 3, config says 2" in str(err.value)
    merged = build_deepspeed_config(stage=3, **kwargs)
    assert merged["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="key optimizer"):
        build_deepspeed_config(stage=3, **kwargs)

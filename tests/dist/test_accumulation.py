"""Gradient accumulation through the loop's `micro_batch` for every strategy: 2 gloo ranks at
grad_accum=2 must train the same weights as one process at grad_accum=4 (same global batch).

A strategy that reduces gradients at every micro batch instead of at the boundary (fairscale's
ShardedDDP when backward runs outside `accumulate`) ends up far from the reference.
"""
from __future__ import annotations

import pytest
import torch

from gpt_vision.optim import OptimConfig
from gpt_vision.parallel import BatchLayout, ParallelConfig, build_strategy
from gpt_vision.train.loop import micro_batch
from tests.helpers.multiproc import run_ranks
from tests.helpers.toymodel import global_batch, make_model

pytestmark = pytest.mark.distributed

GLOBAL_BATCH, STEPS, LR = 8, 3, 1e-2
CASES = {  # label: (strategy, zero_stage)
    "ddp": ("ddp", 2),
    "fsdp": ("fsdp", 2),
    "fairscale": ("fairscale", 2),
    "deepspeed-zero1": ("deepspeed", 1),
    "deepspeed-zero2": ("deepspeed", 2),
    "deepspeed-zero3": ("deepspeed", 3),
}


def train(rank: int, world: int, name: str, stage: int, grad_accum: int) -> dict[str, torch.Tensor] | None:
    """STEPS optimizer steps over this rank's rows of each global batch; rank 0 gets the weights."""
    strategy = build_strategy(ParallelConfig(strategy=name, zero_stage=stage, precision="fp32"), rank, world, rank,
                              BatchLayout(GLOBAL_BATCH // (world * grad_accum), grad_accum))
    optim = OptimConfig(lr=LR, weight_decay=0.1, grad_clip=0.0)
    strategy.setup(make_model(0), optim)
    for step in range(STEPS):
        rows = global_batch(step, GLOBAL_BATCH).chunk(world)[rank].chunk(grad_accum)
        for index, micro in enumerate(rows):
            micro_batch(strategy, index == grad_accum - 1, lambda: strategy.module(micro))
        assert not bool(strategy.step(LR).skipped)
    return strategy.full_state_dict()


def train_cases(rank: int, world: int, cases: list[tuple[str, int, int]]) -> list:
    return [train(rank, world, *case) for case in cases]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_every_strategy_at_grad_accum_2_on_2_ranks_matches_single_at_grad_accum_4():
    [[reference]] = run_ranks(train_cases, 1, [("single", 2, 4)], timeout=300)
    per_rank = run_ranks(train_cases, 2, [(*CASES[label], 2) for label in CASES], timeout=600)
    assert max_difference(reference, make_model(0).state_dict()) > 1e-3  # the steps did train
    differences = {label: max_difference(reference, state) for label, state in zip(CASES, per_rank[0])}
    assert all(state is None for state in per_rank[1])
    assert differences == {label: pytest.approx(0.0, abs=1e-5) for label in CASES}, differences

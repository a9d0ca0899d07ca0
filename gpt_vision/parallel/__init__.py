"""Builds the strategy a config names and reads any strategy's checkpoint back in one process.

Backends are imported on first use (see `registry`), so importing this package never imports
deepspeed or fairscale (nor pays for them on a run that does not use them)."""
from __future__ import annotations

from pathlib import Path

import torch

from gpt_vision.parallel.base import BatchLayout, StepResult, Strategy
from gpt_vision.parallel.config import ParallelConfig
from gpt_vision.parallel.registry import resolve

__all__ = ["BatchLayout", "ParallelConfig", "StepResult", "Strategy", "build_strategy", "load_consolidated"]


def build_strategy(cfg: ParallelConfig, rank: int, world_size: int, local_rank: int,
                   batch: BatchLayout = BatchLayout()) -> Strategy:
    """The strategy `cfg.strategy` names; ddp/fsdp/fairscale/deepspeed expect the process group up."""
    return resolve(cfg.strategy, "strategy")(cfg, rank=rank, world_size=world_size, local_rank=local_rank, batch=batch)


def load_consolidated(directory: Path, strategy_name: str) -> dict[str, torch.Tensor]:
    """Full fp32 model state (keys of the plain model's `state_dict()`) from a checkpoint
    directory written by `strategy_name`, in this one process, whatever world size wrote it."""
    return resolve(strategy_name, "consolidate")(Path(directory))

"""Strategy registry. Backends are imported on first use, so importing this package never
imports deepspeed or fairscale (nor pays for them on a run that does not use them)."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from gpt_vision.errors import ConfigError
from gpt_vision.parallel.base import StepResult, Strategy
from gpt_vision.parallel.config import ParallelConfig

_STRATEGIES = {
    "single": "gpt_vision.parallel.single:SingleStrategy",
    "ddp": "gpt_vision.parallel.ddp:DDPStrategy",
    "fsdp": "gpt_vision.parallel.fsdp:FSDPStrategy",
    "fairscale": "gpt_vision.parallel.fairscale_oss:FairscaleStrategy",
    "deepspeed": "gpt_vision.parallel.deepspeed_zero:DeepSpeedStrategy",
}
_CONSOLIDATORS = {
    "single": "gpt_vision.parallel.consolidate:consolidate_full_files",
    "ddp": "gpt_vision.parallel.consolidate:consolidate_full_files",
    "fairscale": "gpt_vision.parallel.consolidate:consolidate_full_files",
    "fsdp": "gpt_vision.parallel.consolidate:consolidate_dcp",
    "deepspeed": "gpt_vision.parallel.deepspeed_zero:consolidate_deepspeed",
}

__all__ = ["ParallelConfig", "StepResult", "Strategy", "build_strategy", "load_consolidated"]


def _resolve(table: dict[str, str], name: str, what: str):
    if name not in table:
        raise ConfigError("strategy", f"unknown {what} {name!r}; choose one of {', '.join(sorted(table))}")
    module_name, attr = table[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def build_strategy(cfg: ParallelConfig, rank: int, world_size: int, local_rank: int) -> Strategy:
    """The strategy `cfg.strategy` names; ddp/fsdp/fairscale/deepspeed expect the process group up."""
    return _resolve(_STRATEGIES, cfg.strategy, "strategy")(cfg, rank=rank, world_size=world_size, local_rank=local_rank)


def load_consolidated(directory: Path, strategy_name: str) -> dict[str, torch.Tensor]:
    """Full fp32 model state (keys of the plain model's `state_dict()`) from a checkpoint
    directory written by `strategy_name`, in this one process, whatever world size wrote it."""
    return _resolve(_CONSOLIDATORS, strategy_name, "strategy")(Path(directory))

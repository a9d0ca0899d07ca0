"""The strategy names, registered once: each name's implementation and its offline consolidator.

Entries are "module:attribute" strings imported on first use, so naming or validating a strategy
never imports its backend (deepspeed, fairscale).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from gpt_vision.errors import ConfigError


@dataclass(frozen=True)
class Registration:
    strategy: str  # the Strategy class
    consolidate: str  # reads a checkpoint directory it wrote into a full fp32 state dict, in one process


_FULL_FILES = "gpt_vision.parallel.consolidate:consolidate_full_files"
STRATEGIES: dict[str, Registration] = {
    "single": Registration("gpt_vision.parallel.single:SingleStrategy", _FULL_FILES),
    "ddp": Registration("gpt_vision.parallel.ddp:DDPStrategy", _FULL_FILES),
    "fsdp": Registration("gpt_vision.parallel.fsdp:FSDPStrategy", "gpt_vision.parallel.consolidate:consolidate_dcp"),
    "deepspeed": Registration("gpt_vision.parallel.deepspeed_zero:DeepSpeedStrategy",
                              "gpt_vision.parallel.deepspeed_zero:consolidate_deepspeed"),
    "fairscale": Registration("gpt_vision.parallel.fairscale_oss:FairscaleStrategy", _FULL_FILES),
}


def check_name(name: str) -> None:
    if name not in STRATEGIES:
        raise ConfigError("strategy", f"must be one of {', '.join(STRATEGIES)}; got {name!r}")


def resolve(name: str, part: str):
    """The object registered as `part` ("strategy" or "consolidate") for strategy `name`."""
    if name not in STRATEGIES:
        raise ConfigError("strategy", f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    module_name, attr = getattr(STRATEGIES[name], part).split(":")
    return getattr(importlib.import_module(module_name), attr)

"""fairscale OSS + ShardedDataParallel: AdamW state (ZeRO-1) and gradients (ZeRO-2) sharded.

Each rank keeps the full model; ShardedDataParallel reduces every gradient to the one rank whose
OSS partition owns it (the others drop theirs), that rank updates its partition with torch AdamW
and OSS broadcasts the new weights. Checkpoints use the same `model.safetensors` + `optimizer.pt`
files as single/ddp: `OSS.consolidate_state_dict` gathers the optimizer state on rank 0 in the
global (unsharded) layout, which OSS re-partitions on load at any world size.

fairscale 0.4.13 needs no workaround on torch 2.13 for this use (verified on CPU/gloo by
tests/dist/test_strategies.py; CUDA/NCCL not exercised there).
fairscale's own FullyShardedDataParallel is not offered: it needs CUDA and is superseded by
torch FSDP2, which the `fsdp` strategy provides.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn

from gpt_vision.optim import OptimConfig, adamw_kwargs, param_groups, set_lr
from gpt_vision.parallel import update
from gpt_vision.parallel.base import StepResult, optimizer_state_tensors
from gpt_vision.parallel.full_replica import FullReplicaStrategy


class FairscaleStrategy(FullReplicaStrategy):
    """Loads and gathers the full state like `single` (rank 0 holds every weight after each step)."""

    def setup(self, model: nn.Module, optim_cfg: OptimConfig) -> None:
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim import OSS

        self.optim_cfg = optim_cfg
        model = model.to(self.device)
        self.optimizer = OSS(
            param_groups(model, optim_cfg), optim=torch.optim.AdamW, **adamw_kwargs(optim_cfg, self.device)
        )
        self._model = ShardedDataParallel(model, self.optimizer)

    @property
    def unwrapped(self) -> nn.Module:
        return self._model.module

    def accumulate(self, is_boundary: bool) -> ContextManager:
        """`no_sync` is read by ShardedDDP's backward hooks and cleared on exit: the backward
        of a non-boundary micro batch must run inside it, or every micro batch is reduced."""
        return contextlib.nullcontext() if is_boundary else self._model.no_sync()

    def step(self, lr: float) -> StepResult:
        set_lr(self.optimizer, lr)  # OSS copies its groups' lr into the shard optimizer
        owned = [p for group in self.optimizer.optim.param_groups for p in group["params"]]
        squared = update.local_norm(owned).to(self.comm_device) ** 2
        if self.world_size > 1:
            dist.all_reduce(squared)
        total = squared.sqrt().to(self.device)
        return update.guarded_update(
            self.optimizer.optim,
            owned,
            total,
            self.optim_cfg.grad_clip,
            update=self.optimizer.step,
            zero_grad=lambda: self._model.zero_grad(set_to_none=True),
        )

    def local_state_tensors(self) -> Iterator[torch.Tensor]:
        """The full replica of the weights, and the AdamW state of this rank's OSS partition."""
        yield from self.unwrapped.parameters()
        yield from optimizer_state_tensors(self.optimizer.optim)

    def save(self, directory: Path) -> None:
        self.optimizer.consolidate_state_dict(recipient_rank=0)  # a collective: OSS shards -> rank 0
        super().save(directory)

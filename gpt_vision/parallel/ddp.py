"""DistributedDataParallel: full replicas, gradients all-reduced; files identical to `single`.

Rank 0 writes the same `model.safetensors` + `optimizer.pt` as the single strategy, so a run
can resume at any world size, or on one process.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gpt_vision.parallel.full_replica import FullReplicaStrategy


class DDPStrategy(FullReplicaStrategy):
    def _wrap(self, model: nn.Module) -> nn.Module:
        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    @property
    def unwrapped(self) -> nn.Module:
        return self._model.module

    def accumulate(self, is_boundary: bool) -> ContextManager:
        return contextlib.nullcontext() if is_boundary else self._model.no_sync()

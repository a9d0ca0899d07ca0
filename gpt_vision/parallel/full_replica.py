"""The base of the strategies where every rank holds the whole model: single, ddp, fairscale.

They share setup, the guarded update and the checkpoint files (rank 0 writes the full
`model.safetensors` + `optimizer.pt`, which any world size can load); a subclass only wraps
the model (`_wrap`) and, where gradients are reduced, says when (`accumulate`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gpt_vision import optim
from gpt_vision.optim import OptimConfig
from gpt_vision.parallel import common, update
from gpt_vision.parallel.base import StepResult, Strategy


class FullReplicaStrategy(Strategy):
    """The whole model on `self.device`, plain AdamW; checkpoints are the full model+optimizer files."""

    def setup(self, model: nn.Module, optim_cfg: OptimConfig) -> None:
        self.optim_cfg = optim_cfg
        self._model = self._wrap(model.to(self.device))
        self.optimizer = optim.build_adamw(self.unwrapped, optim_cfg, self.device)
        self._params = [p for p in self.unwrapped.parameters() if p.requires_grad]

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    @property
    def module(self) -> nn.Module:
        return self._model

    @property
    def unwrapped(self) -> nn.Module:
        return self._model

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.batch.grad_accum).backward()

    def step(self, lr: float) -> StepResult:
        optim.set_lr(self.optimizer, lr)
        return update.guarded_update(
            self.optimizer,
            self._params,
            update.local_norm(self._params).to(self.device),
            self.optim_cfg.grad_clip,
            update=self.optimizer.step,
            zero_grad=lambda: self.optimizer.zero_grad(set_to_none=True),
            agree_across_ranks=self.world_size > 1,
        )

    def save(self, directory: Path) -> None:
        if self.rank == 0:
            common.write_full_files(directory, common.plain_state_dict(self.unwrapped), self.optimizer.state_dict())
        self.barrier()

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        common.load_model_strict(self.unwrapped, common.read_model_file(directory), directory)
        self.optimizer.load_state_dict(common.read_optimizer_file(directory))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        state = common.plain_state_dict(self.unwrapped) if self.rank == 0 else None
        self.barrier()
        return state

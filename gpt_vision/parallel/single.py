"""One process on the CPU or one GPU: the reference every distributed strategy must match."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gpt_vision import optim
from gpt_vision.optim import OptimConfig
from gpt_vision.parallel import common, update
from gpt_vision.parallel.base import StepResult, Strategy


class SingleStrategy(Strategy):
    """The model on `self.device`, plain AdamW; checkpoints are the full model+optimizer files."""

    name = "single"

    def setup(self, model: nn.Module, optim_cfg: OptimConfig, micro_batch_size: int, grad_accum: int) -> None:
        self.optim_cfg = optim_cfg
        self.grad_accum = grad_accum
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
        (loss / self.grad_accum).backward()

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

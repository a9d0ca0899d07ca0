"""torch FSDP2 (`fully_shard`): parameters, gradients and AdamW state sharded over ranks.

Each block of `model.blocks` is its own FSDP unit (all-gathered just in time, freed after use
when `fsdp_reshard_after_forward`), then the root takes the rest (embeddings, norm, head).
Checkpoints are torch.distributed.checkpoint (DCP) directories: every rank writes its shards,
and DCP reshards on load, so a run saved at N ranks resumes at M. Loading goes through
`safe_load.dcp_load`: DCP's own reader would unpickle `.metadata` without an allowlist.
`gpt_vision.parallel.consolidate.consolidate_dcp` reads the full model back in one process,
without a process group (export, fine-tune).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from gpt_vision import optim
from gpt_vision.errors import UserError
from gpt_vision.optim import OptimConfig
from gpt_vision.parallel import common, safe_load, update
from gpt_vision.parallel.base import StepResult, Strategy


class FSDPStrategy(Strategy):
    def setup(self, model: nn.Module, optim_cfg: OptimConfig) -> None:
        if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
            raise UserError(f"fsdp shards per transformer block but {type(model).__name__} has no `blocks` ModuleList")
        self.optim_cfg = optim_cfg
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        options = dict(
            mesh=mesh,
            reshard_after_forward=self.cfg.fsdp_reshard_after_forward,
            mp_policy=MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32),
            offload_policy=CPUOffloadPolicy() if self.cfg.fsdp_cpu_offload else OffloadPolicy(),
        )
        if not self.cfg.fsdp_cpu_offload:
            model = model.to(self.device)
        for block in model.blocks:
            fully_shard(block, **options)
        self._model = fully_shard(model, **options)
        self.optimizer = optim.build_adamw(self._model, optim_cfg, self.device)
        self._params = [p for p in self._model.parameters() if p.requires_grad]

    @property
    def module(self) -> nn.Module:
        return self._model

    @property
    def unwrapped(self) -> nn.Module:
        return self._model

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool) -> Iterator[None]:
        self._model.set_requires_gradient_sync(enabled)
        yield

    def accumulate(self, is_boundary: bool) -> ContextManager:
        """Non-boundary micro batches keep unsharded local grads; the boundary reduce-scatters all."""
        return self._gradient_sync(is_boundary)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.batch.grad_accum).backward()

    def step(self, lr: float) -> StepResult:
        optim.set_lr(self.optimizer, lr)
        grads = update.grads_of(self._params)
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(total, DTensor):  # a partial norm per rank; full_tensor all-reduces it
            total = total.full_tensor()
        return update.guarded_update(
            self.optimizer,
            self._params,
            total.to(torch.float32),
            self.optim_cfg.grad_clip,
            update=self.optimizer.step,
            zero_grad=lambda: self.optimizer.zero_grad(set_to_none=True),
        )

    def save(self, directory: Path) -> None:
        model_state, optim_state = get_state_dict(self._model, self.optimizer)
        try:
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))
        except CheckpointException as error:  # a BaseException carrying each failed rank's exception
            raise _plain_error(error) from None

    def load(self, directory: Path) -> None:
        model_state, optim_state = get_state_dict(self._model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        safe_load.dcp_load(state, Path(directory))  # nothing in the files is executed
        set_state_dict(
            self._model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self._model, options=options)
        if self.rank != 0:
            return None
        # A copy: on CPU at world size 1 the gathered tensors can alias the live parameters.
        return {
            common.clean_key(k): (v.to(torch.float32) if v.is_floating_point() else v).clone()
            for k, v in state.items()
        }


def _plain_error(error: CheckpointException) -> Exception:
    """DCP's failure as the checkpoint manager understands it without knowing DCP: the first
    failed rank's OSError (a full disk, an I/O error), else a RuntimeError with DCP's message."""
    failures = [exc for exc, _ in error.failures.values()]
    return next((exc for exc in failures if isinstance(exc, OSError)), RuntimeError(str(error)))

"""The one interface the training loop sees; each backend implements it in its own module.

Nothing outside `gpt_vision.parallel` imports deepspeed, fairscale or FSDP: the loop, the
checkpoint manager and the fine-tune loader talk to a `Strategy` (live, inside a process
group) or to `load_consolidated` (offline, one process, any world size that wrote it).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from gpt_vision.optim import OptimConfig
from gpt_vision.parallel.config import ParallelConfig


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's batch is cut on each rank; fixed when the strategy is built.

    Every strategy scales a micro batch's loss by `grad_accum`; DeepSpeed also writes both
    numbers into its engine config.
    """

    micro_batch_size: int = 1
    grad_accum: int = 1


@dataclass
class StepResult:
    """Outcome of one optimizer step, as tensors so the loop needs no host sync."""

    grad_norm: torch.Tensor  # global L2 norm before clipping (0-dim, any device)
    skipped: torch.Tensor  # 0-dim bool: True when the norm was not finite and nothing changed


class Strategy(ABC):
    """Wraps a model and its optimizer for one way of distributing training.

    Lifecycle: built with its section, rank layout and batch layout; `setup` once; per optimizer step, for each micro batch

        with accumulate(is_last):
            with autocast():
                loss = objective(module, batch)
            backward(loss)

    and after the last micro batch `step(lr)`. Forward and backward both happen inside
    `accumulate`: engines decide during backward whether to reduce gradients (fairscale's
    ShardedDDP reads its `no_sync` flag in the backward hooks and resets it on exit).
    `save`/`load`/`full_state_dict` are collectives: every rank calls them.
    """

    def __init__(self, cfg: ParallelConfig, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 batch: BatchLayout = BatchLayout()):
        self.cfg = cfg
        self.name = cfg.strategy  # recorded in each checkpoint's meta.json
        self.batch = batch
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )

    @property
    def compute_dtype(self) -> torch.dtype:
        """bf16 on CUDA devices that have it when precision is auto; fp32 on CPU."""
        precision = self.cfg.precision
        if precision == "auto":
            cuda_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            precision = "bf16" if cuda_bf16 else "fp32"
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    @abstractmethod
    def setup(self, model: nn.Module, optim_cfg: OptimConfig) -> None:
        """Move/wrap `model` (fp32, seeded init on CPU) and build AdamW with decay groups."""

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """What the objective calls for forward: the wrapped model."""

    @property
    @abstractmethod
    def unwrapped(self) -> nn.Module:
        """The user's model (possibly holding sharded parameters)."""

    def autocast(self) -> ContextManager:
        dtype = self.compute_dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def accumulate(self, is_boundary: bool) -> ContextManager:
        """Context holding one micro batch's forward and backward; gradients are reduced only
        in the backward of the boundary (last) micro batch."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a micro batch's mean loss; scaling by accumulation is ours."""

    @abstractmethod
    def step(self, lr: float) -> StepResult:
        """Clip, skip on a non-finite norm (weights bitwise unchanged), update, zero grads."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write this backend's native (possibly sharded) model+optimizer files into `directory`."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restore model+optimizer from `directory`, resharding if the world size differs."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Unwrapped fp32 CPU model state on rank 0 (None elsewhere); a collective."""

    def local_state_tensors(self) -> Iterator[torch.Tensor]:
        """The tensors this rank holds for the model and its optimizer (only its shards when
        sharded): parameters and every tensor of the optimizer state."""
        yield from (_local(p) for p in self.unwrapped.parameters())
        yield from optimizer_state_tensors(self.optimizer)

    def state_is_finite(self) -> bool:
        """True when no rank holds a non-finite parameter or optimizer value. A collective: each
        rank reads only its own shards (works under FSDP and ZeRO-3), one flag is all-reduced."""
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for tensor in self.local_state_tensors():
            if tensor.is_floating_point() and tensor.numel():
                bad |= ~torch.isfinite(tensor).all().to(bad.device)
        return not self.any_rank(bool(bad))

    # Small collectives the loop needs without knowing whether a process group exists.
    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True if `flag` is True on any rank: how ranks agree on stopping at one step.

        Asked every step, so it travels on a CPU (gloo) group: on GPUs an NCCL all-reduce here
        would make the host wait for the device and stall the queue of the next step's kernels.
        """
        if self.world_size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self._control_group())
        return bool(t.item())

    def _control_group(self):
        """A gloo group for host-side agreement (the default group when it already is gloo)."""
        if getattr(self, "_control", None) is None:
            default_is_gloo = torch.distributed.get_backend() == "gloo"
            self._control = torch.distributed.group.WORLD if default_is_gloo else torch.distributed.new_group(backend="gloo")
        return self._control

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place on a copy on the communication device)."""
        if self.world_size == 1:
            return tensor
        reduced = tensor.detach().to(self.comm_device).clone()
        torch.distributed.all_reduce(reduced)
        return reduced

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def comm_device(self) -> torch.device:
        return self.device if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Every tensor in a torch optimizer's per-parameter state (moments, step counters)."""
    for state in optimizer.state.values():
        yield from (_local(v) for v in state.values() if torch.is_tensor(v))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2), the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor

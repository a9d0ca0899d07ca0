"""The guarded optimizer update every strategy shares: clip, then step unless the grad norm is not finite.

This is the one place that decides "clip, then update unless the global grad norm is not
finite". It avoids a host sync where the optimizer allows it: fused AdamW (the CUDA default)
takes a `found_inf` tensor and skips inside the kernel, exactly as under GradScaler. The
foreach/loop implementations cannot, so there the decision costs one `.item()` per step.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist

from gpt_vision.parallel.base import StepResult


def grads_of(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def guarded_update(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    total_norm: torch.Tensor,
    grad_clip: float,
    update: Callable[[], None],
    zero_grad: Callable[[], None],
    agree_across_ranks: bool = False,
) -> StepResult:
    """Clip `params`' grads to `grad_clip` (0: no clip) and run `update` unless the norm is inf/nan.

    `total_norm` must already be the global norm. `optimizer` is the torch optimizer whose step
    `update` runs (for sharded wrappers, the inner one). `agree_across_ranks` all-reduces the
    skip flag, for strategies whose norm is computed locally and could differ between ranks.
    """
    nonfinite = ~torch.isfinite(total_norm)
    if agree_across_ranks and dist.is_initialized() and dist.get_world_size() > 1:
        flag = nonfinite.to(torch.float32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        nonfinite = flag > 0
        # Report the step as the group saw it: a rank with a finite local norm still skipped.
        total_norm = torch.where(nonfinite, torch.full_like(total_norm, float("inf")), total_norm)
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, total_norm)
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = nonfinite.to(torch.float32)
        try:
            update()
        finally:
            del optimizer.found_inf
    elif not bool(nonfinite):  # the one host sync: foreach/loop AdamW has no in-kernel skip
        update()
    zero_grad()
    return StepResult(grad_norm=total_norm.detach(), skipped=nonfinite.reshape(()))


def local_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the grads of `params` (0 when none has a grad), as a float32 tensor."""
    grads = grads_of(params)
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return torch.nn.utils.get_total_norm(grads, 2.0).to(torch.float32)

"""Pieces every strategy shares: AdamW construction, the guarded update, plain checkpoint files.

The guarded update is the one place that decides "clip, then update unless the global grad norm
is not finite". It avoids a host sync where the optimizer allows it: fused AdamW (the CUDA
default) takes a `found_inf` tensor and skips inside the kernel, exactly as under GradScaler.
The foreach/loop implementations cannot, so there the decision costs one `.item()` per step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from gpt_vision.errors import UserError
from gpt_vision.layout import MODEL_FILE, OPTIMIZER_FILE, atomic_file, atomic_path
from gpt_vision.parallel.base import StepResult
from gpt_vision.parallel.safe_load import load_torch_file
from gpt_vision.train.config import OptimConfig
from gpt_vision.train.optim import adamw_kwargs, param_groups

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def build_adamw(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), **adamw_kwargs(cfg, device))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group gets `lr` times its optional `lr_scale` (layer-wise decay, heads)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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


def clean_key(key: str) -> str:
    """State-dict key without the prefixes torch.compile and DDP-like wrappers add."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
        key = key.replace("._orig_mod.", ".")
    return key


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copy of `model.state_dict()` with wrapper prefixes removed."""
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if value.is_floating_point():
            value = value.to(torch.float32)
        out[clean_key(key)] = value.to("cpu", copy=True)
    return out


def write_full_files(directory: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """`model.safetensors` + `optimizer.pt`, each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / MODEL_FILE) as tmp:
        # safetensors refuses tensors sharing storage (tied weights); plain_state_dict copied each.
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp))
    with atomic_file(directory / OPTIMIZER_FILE) as handle:
        torch.save(optimizer_state, handle)


def read_model_file(directory: Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: not a checkpoint written by the single/ddp/fairscale strategies")
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors reports a damaged or foreign file with its own error types
        raise UserError(f"{path} is not a readable safetensors file: {error}") from None


def read_optimizer_file(directory: Path) -> dict:
    path = Path(directory) / OPTIMIZER_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: the checkpoint has no optimizer state")
    return load_torch_file(path)


def load_model_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load `state` into `model`, naming the checkpoint when keys or shapes disagree."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()
        raise UserError(f"{source}: model weights do not fit this model: {' '.join(first_line[:3])}") from None

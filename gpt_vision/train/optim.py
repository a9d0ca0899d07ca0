"""AdamW parameter groups and the learning-rate schedule (a pure function of the step)."""
import math

import torch
from torch import nn

from gpt_vision.train.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Decay only the matrices of Linear layers (and embeddings when configured).

    Norm gains, biases, position/token embeddings and learned tokens stay undecayed, as in
    GPT-2/iGPT practice; grouping by module type keeps names of wrappers out of the rule.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            is_matrix = isinstance(module, nn.Linear) and name == "weight"
            is_embedding = isinstance(module, nn.Embedding) and name == "weight"
            (decay if is_matrix or (cfg.decay_embeddings and is_embedding) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw_kwargs(cfg: OptimConfig, device: torch.device) -> dict:
    """AdamW keyword arguments; the fused kernel only where the device has one."""
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    return kwargs


def learning_rate(step: int, total_steps: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine/linear decay to min."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return base_lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = base_lr * cfg.min_lr_ratio
    if cfg.kind == "cosine":
        return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr - (base_lr - floor) * progress

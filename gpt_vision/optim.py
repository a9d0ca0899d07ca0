"""The optimizer and its LR schedule: `optim:`/`schedule:` sections, AdamW groups, the LR at a step.

Below both the strategies (which build and step the optimizer) and the loops (which set its LR),
so neither reaches up into the other for it.
"""
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from gpt_vision.errors import ConfigError, require_number


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # iGPT/GPT practice: no decay on norms, biases and embeddings unless asked.
    decay_embeddings: bool = False
    grad_clip: float = 1.0
    # auto: fused AdamW on CUDA, foreach elsewhere.
    implementation: Literal["auto", "fused", "foreach", "loop"] = "auto"

    def check(self) -> None:
        require_number("lr", self.lr, "> 0", self.lr > 0)
        if len(self.betas) != 2:
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        for index, beta in enumerate(self.betas):
            require_number(f"betas[{index}]", beta, "in [0, 1)", 0 <= beta < 1)
        require_number("eps", self.eps, "> 0", self.eps > 0)
        require_number("weight_decay", self.weight_decay, ">= 0", self.weight_decay >= 0)
        require_number("grad_clip", self.grad_clip, ">= 0 (0 disables)", self.grad_clip >= 0)


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1

    def check(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require_number("min_lr_ratio", self.min_lr_ratio, "in [0, 1]", 0 <= self.min_lr_ratio <= 1)


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


def build_adamw(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), **adamw_kwargs(cfg, device))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group gets `lr` times its optional `lr_scale` (layer-wise decay, heads)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

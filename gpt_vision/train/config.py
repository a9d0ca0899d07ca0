"""Optimizer and learning-rate schedule sections."""
from dataclasses import dataclass, field
from typing import Literal

from gpt_vision.errors import ConfigError


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
        if self.lr <= 0:
            raise ConfigError("lr", f"must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1

    def check(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")

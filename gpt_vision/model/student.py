"""Distillation students: small classifiers over the teacher's inputs, with DeiT's distillation token.

Two families share one module:
- `gpt-*`: a narrower/shallower GPT over the same palette tokens (causal blocks; the class and
  distillation tokens sit at the end of the sequence, so they see every pixel token);
- `vit-*`: a patch transformer over the pixels (bidirectional blocks over p x p patches).
Both reuse the teacher's `Block` (same norm and activation). With a distillation token the model
has two heads: the class head learns the labels, the distillation head the teacher; inference
averages their logits (DeiT).

The heads read either those tokens (`pooling="token"`, DeiT) or, like the fine-tuned teacher's
grid head, the k x k cell averages of the pixel/patch tokens (`pooling="grid"`; both heads then
read the same vector and no class/distillation tokens are added). A small model reads its features
spatially far better than through one token (benchmarks/RESULTS.md, Quality).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from gpt_vision.errors import ConfigError
from gpt_vision.model.config import ModelConfig
from gpt_vision.model.gpt import Block, make_norm
from gpt_vision.model.objectives import patchify
from gpt_vision.model.pooling import grid_pool


@dataclass(frozen=True)
class StudentPreset:
    family: str  # "gpt" or "vit"
    n_layer: int
    n_embd: int
    n_head: int
    patch_size: int = 0


STUDENT_PRESETS: dict[str, StudentPreset] = {
    "gpt-student-tiny": StudentPreset("gpt", 2, 64, 2),
    "gpt-student-small": StudentPreset("gpt", 4, 128, 4),
    "vit-tiny": StudentPreset("vit", 4, 64, 2, patch_size=4),
    "vit-small": StudentPreset("vit", 6, 128, 4, patch_size=4),
}


@dataclass(frozen=True)
class StudentShape:
    family: str
    n_layer: int
    n_embd: int
    n_head: int
    patch_size: int
    distillation_token: bool
    pooling: str = "token"  # "token" (DeiT class/distillation tokens) or "grid"
    grid_size: int = 7


def resolve_student(preset: str, n_layer: int = 0, n_embd: int = 0, n_head: int = 0, patch_size: int = 0,
                    distillation_token: bool = True, pooling: str = "token", grid_size: int = 7) -> StudentShape:
    """The preset with the non-zero fields overriding it."""
    if preset not in STUDENT_PRESETS:
        raise ConfigError("preset", f"unknown student preset '{preset}' (known: {', '.join(STUDENT_PRESETS)})")
    p = STUDENT_PRESETS[preset]
    shape = StudentShape(p.family, n_layer or p.n_layer, n_embd or p.n_embd, n_head or p.n_head,
                         patch_size or p.patch_size, distillation_token, pooling, grid_size)
    if shape.n_embd % shape.n_head:
        raise ConfigError("n_head", f"{shape.n_head} does not divide n_embd={shape.n_embd}")
    return shape


class Student(nn.Module):
    """`forward(batch) -> (class_logits, distill_logits | None)`; `predict(batch)` for evaluation."""

    def __init__(self, shape: StudentShape, data: ModelConfig, num_classes: int):
        super().__init__()
        self.shape = shape
        size = data.image_size
        if shape.family == "vit" and size % shape.patch_size:
            raise ConfigError("patch_size", f"{shape.patch_size} does not divide the image size {size}")
        block_cfg = replace(data, n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_head, dropout=0.0,
                            preset="")
        d = shape.n_embd
        if shape.family == "gpt":
            self.embed = nn.Embedding(data.vocab_size, d)
            positions = size * size
        else:
            self.embed = nn.Linear(shape.patch_size ** 2 * data.channels, d)
            positions = (size // shape.patch_size) ** 2
        if shape.pooling == "grid":
            side = math.isqrt(positions)
            if shape.grid_size < 1 or shape.grid_size > side:
                raise ConfigError("grid_size", f"{shape.grid_size} does not fit the student's {side}x{side} token grid")
            extra, head_dim = 0, shape.grid_size ** 2 * d
        else:
            extra, head_dim = (2 if shape.distillation_token else 1), d
        self.pos = nn.Parameter(torch.randn(positions + extra, d) * 0.02)
        self.tokens = nn.Parameter(torch.randn(extra, d) * 0.02) if extra else None  # [class, distillation]
        self.blocks = nn.ModuleList(Block(block_cfg) for _ in range(shape.n_layer))
        self.norm = make_norm(block_cfg)
        self.head = nn.Linear(head_dim, num_classes)
        self.dist_head = nn.Linear(head_dim, num_classes) if shape.distillation_token else None

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._encode(batch)
        if self.tokens is None:
            pooled = grid_pool(x, self.shape.grid_size)
            return self.head(pooled), (self.dist_head(pooled) if self.dist_head is not None else None)
        cls = self.head(x[:, -self.tokens.shape[0]])
        dist = self.dist_head(x[:, -1]) if self.dist_head is not None else None
        return cls, dist

    def head_input(self, batch: dict) -> torch.Tensor:
        """What the class head reads: the grid vector, or the class token's output."""
        x = self._encode(batch)
        return grid_pool(x, self.shape.grid_size) if self.tokens is None else x[:, -self.tokens.shape[0]]

    def heads(self) -> list[nn.Linear]:
        """The heads that read `head_input` (with grid pooling the distillation head reads it too)."""
        return [self.head] + ([self.dist_head] if self.tokens is None and self.dist_head is not None else [])

    def _encode(self, batch: dict) -> torch.Tensor:
        if self.shape.family == "gpt":
            x = self.embed(batch["tokens"])
        else:
            x = self.embed(patchify(batch["pixels"], self.shape.patch_size))
        if self.tokens is not None:
            x = torch.cat([x, self.tokens.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = x + self.pos.to(x.dtype)
        mask = "causal" if self.shape.family == "gpt" else None
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def predict(self, batch: dict) -> torch.Tensor:
        cls, dist = self(batch)
        return cls if dist is None else (cls + dist) / 2

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

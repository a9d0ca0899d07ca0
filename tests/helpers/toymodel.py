"""A tiny GPT-shaped model and deterministic data for strategy tests.

Shaped like the real one where strategies care: token Embedding, learned position parameter,
a `blocks` ModuleList (FSDP's unit), a final norm and an untied Linear head; seeded init.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 16
SEQ = 8


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class ToyGPT(nn.Module):
    def __init__(self, width: int = 16, depth: int = 2):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, width)
        self.wpe = nn.Parameter(torch.randn(SEQ, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens[:, :-1]) + self.wpe[: tokens.shape[1] - 1]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def make_model(seed: int = 0, width: int = 16, depth: int = 2) -> ToyGPT:
    torch.manual_seed(seed)
    return ToyGPT(width, depth)


def global_batch(step: int, size: int) -> torch.Tensor:
    """The whole step's batch, the same on every rank; each rank takes its rows."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (size, SEQ + 1), generator=g)

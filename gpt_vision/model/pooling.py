"""Spatial pooling of a square token grid, shared by the probe/fine-tune heads and the grid students."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt_vision.errors import UserError


def grid_pool(hidden: torch.Tensor, k: int) -> torch.Tensor:
    """[B, L, d] over a square token grid (raster order) -> k x k cell averages, concatenated [B, k*k*d]."""
    batch, length, width = hidden.shape
    side = math.isqrt(length)
    if side * side != length or k > side:
        raise UserError(f"grid_size={k} does not fit a {length}-token sequence (needs a square grid of side >= {k})")
    grid = hidden.transpose(1, 2).reshape(batch, width, side, side)
    return F.adaptive_avg_pool2d(grid, k).permute(0, 2, 3, 1).reshape(batch, k * k * width)

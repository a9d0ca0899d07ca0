"""Pretraining objectives: what the model is asked to predict from a batch, and the loss.

`loss = objective(model, batch, generator)`. `model` may be wrapped (DDP, FSDP, a DeepSpeed
engine, ShardedDDP), so an objective only calls `model(...)`. Random choices (masks, prefix lengths)
come from `generator` so a seeded step is reproducible. `bits_per_dim` is the one conversion of a
token cross-entropy into the likelihood figure iGPT reports.
"""

import math

import torch
import torch.nn.functional as F

from gpt_vision.model.config import ModelConfig

Batch = dict[str, torch.Tensor]


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """uint8 pixels [B, H, W, C] -> float patches [B, N, p*p*C] in [-1, 1], patches in raster order."""
    B, H, W, C = pixels.shape
    p = patch_size
    x = pixels.float().div(127.5).sub(1.0)
    x = x.view(B, H // p, p, W // p, p, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch zero mean, unit variance: AIM's (and MAE's) regression target."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / torch.sqrt(var + eps)


def feature_inputs(cfg: ModelConfig, batch: Batch) -> torch.Tensor:
    """What `GPT.forward` / `GPT.features` take for this config: tokens, or patches for next_patch."""
    if cfg.objective == "next_patch":
        return patchify(_checked_pixels(cfg, batch), cfg.patch_size)
    return batch["tokens"]


def _checked_pixels(cfg: ModelConfig, batch: Batch) -> torch.Tensor:
    pixels = batch["pixels"]
    expected = (cfg.image_size, cfg.image_size, cfg.channels)
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
        raise ValueError(f"pixels must be [B, {expected[0]}, {expected[1]}, {expected[2]}], got {list(pixels.shape)}")
    return pixels


def _uniform(generator: torch.Generator | None, shape: tuple[int, ...]) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=device)


class NextPixel:
    """iGPT's autoregressive objective: cross-entropy of each token given the ones before it."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def __call__(self, model, batch: Batch, generator: torch.Generator | None = None):
        tokens = batch["tokens"]
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        return loss


class MaskedPixel:
    """iGPT's BERT objective: exactly round(mask_ratio * L) tokens per image replaced by a learned
    mask vector, bidirectional attention, cross-entropy on the masked tokens only."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def sample_mask(self, shape: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
        B, L = shape
        k = max(1, round(self.cfg.mask_ratio * L))
        chosen = _uniform(generator, (B, L)).argsort(dim=1)[:, :k]
        mask = torch.zeros(B, L, dtype=torch.bool, device=chosen.device)
        return mask.scatter_(1, chosen, True)

    def __call__(self, model, batch: Batch, generator: torch.Generator | None = None):
        tokens = batch["tokens"]
        mask = self.sample_mask(tuple(tokens.shape), generator).to(tokens.device, non_blocking=True)
        logits = model(tokens, mask=mask)
        loss = F.cross_entropy(logits[mask].float(), tokens[mask])
        return loss


class NextPatch:
    """AIM-style: predict each patch's normalized pixels from the patches before it, with a random
    prefix (uniform in [1, N-1] per image) attended bidirectionally; MSE only after the prefix."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def sample_prefix(self, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        n = self.cfg.seq_len
        return 1 + (_uniform(generator, (batch_size,)) * (n - 1)).long().clamp_(max=n - 2)

    def __call__(self, model, batch: Batch, generator: torch.Generator | None = None):
        patches = patchify(_checked_pixels(self.cfg, batch), self.cfg.patch_size)
        prefix_len = self.sample_prefix(patches.shape[0], generator).to(patches.device, non_blocking=True)
        pred = model(patches, attention="prefix", prefix_len=prefix_len)
        err = (pred.float() - normalize_patches(patches)).square().mean(dim=-1)  # [B, N]
        scored = torch.arange(patches.shape[1], device=patches.device)[None, :] >= prefix_len[:, None]
        loss = (err * scored).sum() / scored.sum()
        return loss


OBJECTIVES = {"next_pixel": NextPixel, "masked_pixel": MaskedPixel, "next_patch": NextPatch}


def bits_per_dim(loss: float, cfg: ModelConfig) -> float | None:
    """Bits per image dimension of a mean cross-entropy per token, in nats: a palette token codes
    one pixel of `cfg.channels` values. None for next_patch, whose loss is a regression error."""
    if cfg.objective == "next_patch":
        return None
    return loss / math.log(2) / cfg.channels


def build_objective(cfg: ModelConfig):
    return OBJECTIVES[cfg.objective](cfg)

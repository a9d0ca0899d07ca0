"""The model's config section: shape (directly or via a preset), palette/image geometry, objective."""

from dataclasses import dataclass, replace
from typing import Literal

from gpt_vision.errors import ConfigError, require_number
from gpt_vision.model.presets import PRESETS


@dataclass
class ModelConfig:
    preset: str = ""  # fills n_layer / n_embd / n_head where they are 0
    n_layer: int = 0
    n_embd: int = 0
    n_head: int = 0
    vocab_size: int = 0  # palette size; 0 = filled from the tokenizer by the root config
    image_size: int = 0  # H = W; 0 = filled from the shard manifest
    channels: int = 0  # 0 = filled from the shard manifest in pretraining, else 1 (gray)
    norm: Literal["rms", "layer"] = "rms"  # "rms" = iGPT's gain-only RMS norm
    activation: Literal["gelu", "quick_gelu"] = "gelu"  # quick_gelu = x * sigmoid(1.702 x), HF ImageGPT's default
    dropout: float = 0.0
    objective: Literal["next_pixel", "masked_pixel", "next_patch"] = "next_pixel"
    mask_ratio: float = 0.15
    patch_size: int = 4
    activation_checkpointing: bool = False
    init_std: float = 0.02

    def resolved(self) -> "ModelConfig":
        """A copy with the preset's shape filled into the fields left at 0."""
        if not self.preset:
            return replace(self, channels=self.channels or 1)
        if self.preset not in PRESETS:
            known = ", ".join(PRESETS)
            raise ConfigError("preset", f"unknown preset '{self.preset}' (known: {known})")
        p = PRESETS[self.preset]
        return replace(
            self,
            n_layer=self.n_layer or p.n_layer,
            n_embd=self.n_embd or p.n_embd,
            n_head=self.n_head or p.n_head,
            channels=self.channels or 1,
        )

    def check(self) -> None:
        """Validate the resolved shape; vocab_size / image_size may still be 0 (filled later)."""
        cfg = self.resolved()
        for key in ("n_layer", "n_embd", "n_head"):
            value = getattr(cfg, key)
            if value <= 0:
                raise ConfigError(key, f"must be > 0, got {value} (set it or choose a preset)")
        if cfg.n_embd % cfg.n_head:
            raise ConfigError("n_head", f"{cfg.n_head} does not divide n_embd={cfg.n_embd}")
        for key in ("vocab_size", "image_size"):
            if getattr(cfg, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(cfg, key)}")
        if self.channels < 0:
            raise ConfigError("channels", f"must be >= 0 (0: from the data), got {self.channels}")
        require_number("dropout", cfg.dropout, "in [0, 1)", 0.0 <= cfg.dropout < 1.0)
        require_number("mask_ratio", cfg.mask_ratio, "in (0, 1)", 0.0 < cfg.mask_ratio < 1.0)
        require_number("init_std", cfg.init_std, "> 0", cfg.init_std > 0)
        if cfg.patch_size < 1:
            raise ConfigError("patch_size", f"must be >= 1, got {cfg.patch_size}")
        if cfg.objective == "next_patch" and cfg.image_size and cfg.image_size % cfg.patch_size:
            raise ConfigError("patch_size", f"{cfg.patch_size} does not divide image_size={cfg.image_size}")
        if cfg.objective == "next_patch" and cfg.image_size and cfg.image_size // cfg.patch_size < 2:
            raise ConfigError("patch_size", f"{cfg.patch_size} leaves fewer than 2x2 patches of a {cfg.image_size}px image")

    @property
    def seq_len(self) -> int:
        """Positions the transformer sees: pixels for token objectives, patches for next_patch."""
        if self.objective == "next_patch":
            return (self.image_size // self.patch_size) ** 2
        return self.image_size * self.image_size

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

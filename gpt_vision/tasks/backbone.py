"""The backbone a fine-tune task starts from: `init` loaded with its palette and checked against the
manifest (splits, classes, geometry, channels) before any feature extraction or training."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gpt_vision.data.manifest import Manifest, load_manifest
from gpt_vision.data.palette import Palette
from gpt_vision.errors import UserError
from gpt_vision.export import load_pretrained
from gpt_vision.model import ModelConfig
from gpt_vision.model.gpt import GPT
from gpt_vision.run_configs import FinetuneConfig


@dataclass
class Backbone:
    model: GPT
    palette: Palette
    source: str
    manifest: Manifest


def load_backbone(cfg: FinetuneConfig) -> Backbone:
    """`init` as a model on CPU with its palette; the palette comes from the checkpoint, or from
    tokenizer.path for HF ImageGPT inits (which carry none)."""
    pretrained = load_pretrained(cfg.init)
    palette = pretrained.palette
    if cfg.tokenizer.path:
        given = Palette.load(cfg.tokenizer.path)
        if palette is not None and not np.array_equal(given.centroids, palette.centroids):
            raise UserError(f"tokenizer.path {cfg.tokenizer.path} differs from the palette saved with init {cfg.init}; "
                            "leave tokenizer.path empty to use the checkpoint's")
        palette = palette or given
    if palette is None:
        raise UserError(f"init {cfg.init} carries no palette ({pretrained.source}); set tokenizer.path to its .npy palette")
    manifest = check_data_fits(pretrained.model.config, palette, cfg, f"init {cfg.init}")
    return Backbone(pretrained.model, palette, pretrained.source, manifest)


def check_data_fits(model_cfg: ModelConfig, palette: Palette, cfg: FinetuneConfig, what: str) -> Manifest:
    """The manifest must hold the train and test splits and class names, and its images (after
    resize/crop) must have the geometry and channels the model was trained on."""
    manifest = load_manifest(cfg.data.manifest, cfg.data.allow_pipe)
    for key in ("train_split", "test_split"):
        split = getattr(cfg.data, key)
        if split not in manifest.splits or not manifest.split_sizes.get(split):
            known = ", ".join(sorted(manifest.splits)) or "none"
            raise UserError(f"{manifest.location} has no samples in split '{split}' (data.{key}; splits: {known})")
    if not manifest.classes:
        raise UserError(f"{manifest.location} has no classes: fine-tuning needs labeled shards")
    if palette.size != model_cfg.vocab_size and model_cfg.objective != "next_patch":
        raise UserError(f"{what}: the palette has {palette.size} colors but the model's vocabulary is {model_cfg.vocab_size}")
    if palette.channels != model_cfg.channels or manifest.channels != model_cfg.channels:
        raise UserError(f"{what}: the model has {model_cfg.channels} channel(s), the palette {palette.channels} and "
                        f"the data {manifest.location} {manifest.channels} ({manifest.mode})")
    height, width = manifest.image_size
    augment = cfg.data.augment
    if augment.resize:
        scale = augment.resize / min(height, width)
        height, width = round(height * scale), round(width * scale)
    if augment.center_crop:
        height = width = augment.center_crop
    if (height, width) != (model_cfg.image_size, model_cfg.image_size):
        raise UserError(f"{what}: the model takes {model_cfg.image_size}x{model_cfg.image_size} images but the data "
                        f"{manifest.location} gives {height}x{width} (set data.augment.resize / center_crop, or use "
                        "shards of the pretraining geometry)")
    return manifest


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_layers(layers: list[int] | str, n_layer: int, auto: str) -> list[int]:
    """Block indices in [0, n_layer); "auto" is every layer (auto="all") or the last (auto="last")."""
    if layers == "auto":
        return list(range(n_layer)) if auto == "all" else [n_layer - 1]
    resolved = []
    for layer in layers:
        index = layer + n_layer if layer < 0 else layer
        if not 0 <= index < n_layer:
            raise UserError(f"task.layers: {layer} is not a layer of this {n_layer}-layer backbone")
        resolved.append(index)
    return resolved


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def state_checksum(module: nn.Module) -> str:
    """A digest of every parameter and buffer, to show frozen weights did not move."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()

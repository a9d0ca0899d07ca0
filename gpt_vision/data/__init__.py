"""Shard stream, transforms and the palette tokenizer."""

from gpt_vision.data.config import AugmentConfig, DataConfig, TokenizerConfig
from gpt_vision.data.manifest import Manifest, load_manifest
from gpt_vision.data.palette import Palette, fit_palette, load_or_fit_palette
from gpt_vision.data.stream import ShardLoader
from gpt_vision.data.transforms import build_transform

__all__ = [
    "AugmentConfig", "DataConfig", "TokenizerConfig", "Manifest", "load_manifest", "Palette",
    "fit_palette", "load_or_fit_palette", "ShardLoader", "build_transform",
]

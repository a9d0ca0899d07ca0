"""Frozen-backbone features for linear probes: one pass over a split, every requested layer at once,
pooled (task.pooling) and cached on disk as float16 `.npy`; and the pooling itself, which the
fine-tune classifier head shares.

A cache entry is a folder named by a digest of what determines the features (the weights, the
palette, the split and its shards, the eval-time transform, the layers, the attention), so a
repeated probe on the same init reads the features back instead of running the backbone.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt_vision.data.stream import ShardLoader
from gpt_vision.layout import atomic_dir
from gpt_vision.model import feature_inputs
from gpt_vision.model.gpt import GPT
from gpt_vision.model.pooling import grid_pool
from gpt_vision.tasks.backbone import state_checksum
from gpt_vision.tasks.harness import autocast, to_device

FEATURES_FILE = "features.npy"


@dataclass(frozen=True)
class Pooling:
    """How block outputs [B, L, d] become candidate vectors: see TaskConfig.pooling."""

    kind: str = "mean"
    grid_size: int = 2

    def dim(self, width: int, layers: int) -> int:
        """Length of one candidate vector."""
        if self.kind == "grid":
            return self.grid_size * self.grid_size * width
        return width * layers if self.kind == "concat" else width

    def __call__(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """[B, candidates, dim]: one candidate per layer, or one for all layers with concat."""
        if self.kind == "grid":
            return torch.stack([grid_pool(h, self.grid_size) for h in hidden], dim=1)
        means = [h.mean(dim=1) for h in hidden]
        return torch.cat(means, dim=-1)[:, None] if self.kind == "concat" else torch.stack(means, dim=1)


@dataclass
class Features:
    features: np.ndarray  # float16 [N, candidates, dim]
    labels: np.ndarray  # int64 [N]
    keys: np.ndarray  # str [N]
    layers: list[int]


@torch.no_grad()
def extract_features(model: GPT, loader: ShardLoader, layers: list[int], pooling: Pooling, attention: str | None,
                     device: torch.device, progress=None) -> Features:
    """Pooled outputs of `layers` for every sample of the loader (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    chunks, labels, keys = [], [], []
    try:
        for batch in loader:
            batch = to_device(batch, device)
            with autocast(device):
                outs = model.features(feature_inputs(model.config, batch), layers, pool="none", attention=attention)
            chunks.append(pooling([o.float() for o in outs]).to(torch.float16).cpu().numpy())
            labels.append(batch["label"].cpu().numpy())
            keys.extend(batch["key"])
            if progress is not None:
                progress.update(len(batch["key"]))
    finally:
        model.train(was_training)
    return Features(np.concatenate(chunks), np.concatenate(labels), np.asarray(keys), list(layers))


def cache_key(model: GPT, palette_centroids: np.ndarray, loader: ShardLoader, layers: list[int], pooling: Pooling,
              attention: str | None) -> str:
    """Digest of everything the features depend on."""
    doc = {
        "weights": state_checksum(model),
        "model": dataclasses.asdict(model.config),
        "palette": hashlib.sha256(np.ascontiguousarray(palette_centroids).tobytes()).hexdigest(),
        "manifest": loader.manifest.location,
        "split": loader.split,
        "shards": [(s.url, s.num_samples) for s in loader.manifest.shards(loader.split)],
        "augment": dataclasses.asdict(loader.cfg.augment),
        "layers": list(layers),
        "pooling": dataclasses.asdict(pooling),
        "attention": attention,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_features(cache_dir: Path, model: GPT, palette_centroids: np.ndarray, loader: ShardLoader,
                    layers: list[int], pooling: Pooling, attention: str | None, device: torch.device, progress=None
                    ) -> tuple[Features, bool]:
    """Features from the cache, or extracted and stored there; returns (features, was_cached)."""
    entry = Path(cache_dir) / cache_key(model, palette_centroids, loader, layers, pooling, attention)
    if (entry / FEATURES_FILE).is_file():
        features = np.load(entry / FEATURES_FILE, allow_pickle=False)
        labels = np.load(entry / "labels.npy", allow_pickle=False)
        keys = np.load(entry / "keys.npy", allow_pickle=False)
        return Features(features, labels, keys, list(layers)), True
    result = extract_features(model, loader, layers, pooling, attention, device, progress)
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(entry) as staging:
            np.save(staging / "labels.npy", result.labels, allow_pickle=False)
            np.save(staging / "keys.npy", result.keys, allow_pickle=False)
            (staging / "meta.json").write_text(json.dumps({"split": loader.split, "layers": list(layers),
                                                           "samples": int(len(result.labels))}))
            np.save(staging / FEATURES_FILE, result.features, allow_pickle=False)  # last: marks the entry complete
    except OSError:
        if not (entry / FEATURES_FILE).is_file():  # another run may have stored the same entry first
            raise
    return result, False

"""Small structured image datasets written as real shards, shared by e2e/dist/reliability tests."""
from pathlib import Path

import numpy as np

from data_shards import write_shards


def toy_images(count: int, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale images whose class is a brightness/stripe pattern: learnable, not noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=count)
    grid = np.arange(size)
    images = np.empty((count, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        stripes = ((grid[:, None] + grid[None, :] * (label % 2)) // (1 + label // 2)) % 2
        base = 60 + 120 * stripes + rng.integers(0, 30, size=(size, size))
        images[i] = np.clip(base, 0, 255)
    return images, labels.astype(np.int64)


def write_toy_shards(directory: Path, train: int = 256, test: int = 64, size: int = 8, shard_size: int = 64) -> Path:
    """Train/test shards of toy images; returns the manifest path."""
    train_x, train_y = toy_images(train, size, seed=0)
    test_x, test_y = toy_images(test, size, seed=1)
    write_shards({"train": (train_x, train_y), "test": (test_x, test_y)}, None, directory, "toy",
                 shard_size=shard_size, classes=["a", "b", "c", "d"])
    return Path(directory) / "manifest.json"


def tiny_overrides(manifest: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long pretraining run on toy shards."""
    return [
        "name=toy",
        f"run_dir={run_dir}",
        f"data.manifest={manifest}",
        "data.num_workers=0",
        "data.shuffle_buffer=32",
        "tokenizer.clusters=8",
        "tokenizer.sample_pixels=4000",
        "model.n_layer=2",
        "model.n_embd=32",
        "model.n_head=2",
        "optim.lr=3e-3",
        "schedule.warmup_steps=2",
        "train.steps=8",
        "train.micro_batch_size=8",
        "train.log_every=1",
        "train.eval_every=0",
        "train.peak_flops=1e12",
        "checkpoint.every=2",
        "logging.progress=false",
        *extra,
    ]

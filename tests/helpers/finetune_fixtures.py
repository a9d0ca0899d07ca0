"""Test helpers for the fine-tune tasks: labeled shards whose class is the mean-brightness bucket,
a tiny pretrained checkpoint made by the real pretraining, and config overrides for fast runs."""
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards.writer import write_shards
from gpt_vision.config_loader import load_config
from gpt_vision.distributed import DistEnv
from gpt_vision.run_configs import PretrainConfig
from gpt_vision.tasks.pretrain import run_pretraining
from gpt_vision.train import preemption

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                 master_port=29500, launcher="python")
CLASSES = 3
SIZE = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny models on a shared 2-core machine run many times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def brightness_images(count: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Class c: every pixel drawn uniformly from the c-th third of [0, 255] (a mean-brightness bucket)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=count)
    width = 256 // CLASSES
    low = labels[:, None, None] * width
    images = (low + rng.integers(0, width, size=(count, size, size))).astype(np.uint8)
    return images, labels.astype(np.int64)


def write_brightness_shards(root: Path, train: int = 240, test: int = 90, size: int = SIZE) -> Path:
    splits = {"train": brightness_images(train, 0, size), "test": brightness_images(test, 1, size)}
    write_shards(splits, None, root, "brightness", shard_size=100, classes=[f"b{i}" for i in range(CLASSES)], mode="L")
    return root / "manifest.json"


def pretrain_tiny(manifest: Path, run_dir: Path, steps: int = 4, *extra: str) -> Path:
    """A real pretraining run of a 2-layer, 32-wide GPT; returns the run directory."""
    overrides = [
        "name=tiny", f"run_dir={run_dir}", f"data.manifest={manifest}", "data.num_workers=0",
        "data.shuffle_buffer=16", "tokenizer.clusters=8", "tokenizer.sample_pixels=2000", "tokenizer.iterations=5",
        "model.n_layer=2", "model.n_embd=32", "model.n_head=2", f"train.steps={steps}", "train.micro_batch_size=8",
        "train.eval_every=0", "train.log_every=1", "schedule.warmup_steps=1", "checkpoint.every=2",
        "logging.progress=false", "logging.tensorboard=false", "optim.lr=3e-3", *extra,
    ]
    preemption.clear()
    run_pretraining(load_config(PretrainConfig, None, overrides), SINGLE)
    return run_dir


def finetune_overrides(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.manifest={manifest}", f"output_dir={out}", "data.num_workers=0", "data.shuffle_buffer=16",
            "logging.progress=false", "schedule.warmup_steps=5", "train.log_every=5", "train.eval_batch_size=32",
            *extra]


def random_init_export(manifest: Path, out: Path, n_layer: int = 2, n_embd: int = 32, seed: int = 0) -> Path:
    """An export (model.safetensors + config.yaml + palette.npy) of a randomly initialized GPT."""
    import dataclasses

    import yaml
    from safetensors.torch import save_file

    from gpt_vision.data.palette import fit_palette
    from gpt_vision.model import ModelConfig, build_model

    palette = fit_palette(str(manifest), "train", 8, 2000, 5, 0)
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=palette.size, image_size=SIZE)
    model = build_model(cfg)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(cfg)}))
    palette.save(out / "palette.npy")
    return out

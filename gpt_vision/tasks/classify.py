"""What every fine-tune task shares: the backbone from `init` checked against the data, the output
folder, a step-counting training loop, one-pass evaluation, metrics and the files a run leaves.

Files of a run (`output_dir`): config.yaml (resolved), results.json, predictions.npz (test keys,
labels, logits: results can be recomputed from it), model.safetensors + classifier.yaml (what was
trained and how to rebuild it), palette.npy, tensorboard/, metrics.jsonl.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn

from gpt_vision.config import dump_config
from gpt_vision.data.manifest import Manifest, load_manifest
from gpt_vision.data.palette import Palette
from gpt_vision.data.stream import ShardLoader
from gpt_vision.errors import UserError
from gpt_vision.export import PALETTE_FILE, WEIGHTS_FILE, load_pretrained
from gpt_vision.model import ModelConfig
from gpt_vision.model.gpt import GPT
from gpt_vision.tasks.finetune_config import FinetuneConfig
from gpt_vision.train.metrics import MetricsLogger
from gpt_vision.train.optim import learning_rate

log = logging.getLogger(__name__)
CLASSIFIER_FILE = "classifier.yaml"
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.npz"


# ---- inputs -------------------------------------------------------------------------------------

@dataclass
class Backbone:
    model: GPT
    palette: Palette
    source: str


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
    check_data_fits(pretrained.model.config, palette, cfg, f"init {cfg.init}")
    return Backbone(pretrained.model, palette, pretrained.source)


def check_data_fits(model_cfg: ModelConfig, palette: Palette, cfg: FinetuneConfig, what: str) -> Manifest:
    """The shards (after resize/crop) must have the geometry and channels the model was trained on."""
    manifest = load_manifest(cfg.data.manifest)
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
    if not manifest.classes:
        raise UserError(f"{manifest.location} has no classes: fine-tuning needs labeled shards")
    return manifest


def pick_device(cfg: FinetuneConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 on CUDA; plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def eval_loader(cfg: FinetuneConfig, split: str, palette: Palette, batch_size: int | None = None) -> ShardLoader:
    """One unshuffled pass: every sample of `split` exactly once, without random augmentation."""
    return ShardLoader(cfg.data, split, palette, batch_size or cfg.train.eval_batch_size, seed=cfg.seed, train=False)


# ---- output folder ------------------------------------------------------------------------------

def prepare_output_dir(cfg: FinetuneConfig) -> Path:
    """Create the output folder; a non-empty one is refused unless overwrite=true, which clears
    the previous results but keeps a feature cache kept inside it."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise UserError(f"output_dir {out} is not empty; choose another or set overwrite=true")
        keep = cfg.feature_cache_dir.resolve()
        for child in out.iterdir():
            if child.resolve() == keep:
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output_dir {out}: {exc.strerror}") from None
    dump_config(cfg, out / "config.yaml")
    return out


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False))
    os.replace(tmp, path)


def save_predictions(path: Path, keys: list[str], labels: np.ndarray, logits: np.ndarray, **extra: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, keys=np.asarray(keys), labels=labels, logits=logits, **extra)
    os.replace(tmp, path)


def save_model(out: Path, module: nn.Module, description: dict, palette: Palette) -> None:
    """model.safetensors + classifier.yaml (how to rebuild it) + palette.npy, each written atomically."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, out / WEIGHTS_FILE)
    tmp = out / f".{CLASSIFIER_FILE}.tmp"
    tmp.write_text(yaml.safe_dump(description, sort_keys=False))
    os.replace(tmp, out / CLASSIFIER_FILE)
    palette.save(out / PALETTE_FILE)


def new_logger(out: Path, cfg: FinetuneConfig, total_steps: int) -> MetricsLogger:
    out.mkdir(parents=True, exist_ok=True)
    return MetricsLogger(out, cfg.logging, enabled=True, total_steps=total_steps, start_step=0)


# ---- metrics ------------------------------------------------------------------------------------

def classification_metrics(labels: np.ndarray, logits: np.ndarray, num_classes: int) -> dict:
    """top1, top5 (top-k with k = min(5, classes)), per-class accuracy and the confusion matrix."""
    labels = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float32)
    predicted = logits.argmax(axis=1)
    k = min(5, num_classes)
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    support = confusion.sum(axis=1)
    per_class = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(num_classes)]
    return {
        "top1": float((predicted == labels).mean()) if len(labels) else 0.0,
        "top5": float((topk == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "samples": int(len(labels)),
    }


def confusion_image(confusion: np.ndarray, cell: int = 12) -> np.ndarray:
    """Row-normalized confusion matrix as a grayscale heat map (white = all of the row), HWC uint8."""
    confusion = np.asarray(confusion, dtype=np.float64)
    rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    image = np.kron(np.rint(rows * 255).astype(np.uint8), np.ones((cell, cell), dtype=np.uint8))
    return np.repeat(image[:, :, None], 3, axis=2)


def bar_chart(values: list[float], bar: int = 12, height: int = 100) -> np.ndarray:
    """Values in [0, 1] as vertical bars (one per layer, left to right), HWC uint8; the best is red."""
    image = np.full((height, bar * len(values) + 2, 3), 255, dtype=np.uint8)
    best = int(np.argmax(values))
    for i, value in enumerate(values):
        top = height - int(round(max(0.0, min(1.0, value)) * (height - 1)))
        color = (200, 30, 30) if i == best else (60, 60, 60)
        image[top:, 2 + i * bar: i * bar + bar - 1] = color
    return image


# ---- training and evaluation --------------------------------------------------------------------

def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def fit(
    loss_fn: Callable[[dict, int], tuple[torch.Tensor, dict[str, float]]],
    batches: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    cfg: FinetuneConfig,
    logger: MetricsLogger,
    params: list[nn.Parameter],
    tag: str = "train",
) -> list[float]:
    """`cfg.train.steps` optimizer steps with warmup+cosine LR; returns the per-step losses.

    `loss_fn(batch, step)` returns the loss and scalars to log (e.g. batch accuracy).
    """
    losses = []
    steps = cfg.train.steps
    iterator = iter(batches)
    for step in range(steps):
        lr = learning_rate(step, steps, cfg.optim.lr, cfg.schedule)
        set_lr(optimizer, lr)
        batch = next(iterator)
        loss, stats = loss_fn(batch, step)
        if not torch.isfinite(loss):
            raise UserError(f"{tag}: the loss became {loss.item()} at step {step}; lower optim.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % cfg.train.log_every == 0 or step == steps - 1:
            logger.scalars(step, {"loss": losses[-1], "lr": lr, **stats}, prefix=tag)
        logger.advance(1, {"loss": losses[-1]})
    return losses


@torch.no_grad()
def predict(predict_fn: Callable[[dict], torch.Tensor], loader: ShardLoader, device: torch.device
            ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys, labels and float32 logits of every sample of the loader's split (read once)."""
    keys, labels, logits = [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device):
            out = predict_fn(batch)
        keys.extend(batch["key"])
        labels.append(batch["label"].cpu().numpy())
        logits.append(out.float().cpu().numpy())
    if not keys:
        raise UserError(f"split '{loader.split}' gave no samples to evaluate")
    return keys, np.concatenate(labels), np.concatenate(logits)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == labels).float().mean())


def smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def state_checksum(module: nn.Module) -> str:
    """A digest of every parameter and buffer, to show frozen weights did not move."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def report(out: Path, logger: MetricsLogger, results: dict, num_classes: int, started: float) -> dict:
    """Finish results.json (wall time) and log the test confusion matrix; returns the results."""
    results["wall_time_s"] = round(time.time() - started, 3)
    write_json(out / RESULTS_FILE, results)
    logger.image_grid(0, "test/confusion_matrix", confusion_image(np.asarray(results["confusion"])))
    logger.scalars(0, {"top1": results["top1"], "top5": results["top5"]}, prefix="test")
    return results


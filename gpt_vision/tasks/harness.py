"""The fine-tune harness: what linear probe, attentive probe, full fine-tune and distillation share
(device, seeding, loaders, optimizer, the one fit loop, prediction, saved files, the report).
A task supplies only its module, its loss and, for probes, its feature source.

Files of a run (`output_dir`): config.yaml (resolved), results.json, predictions.npz (test keys,
labels, logits: results can be recomputed from it), model.safetensors + classifier.yaml (what was
trained and how to rebuild it), palette.npy, tensorboard/, metrics.jsonl.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from gpt_vision.config_loader import dump_config
from gpt_vision.data.manifest import Manifest
from gpt_vision.data.palette import Palette
from gpt_vision.data.stream import ShardLoader
from gpt_vision.errors import UserError
from gpt_vision.layout import CLASSIFIER_FILE, CONFIG_FILE, MODEL_FILE, PALETTE_FILE, atomic_file, atomic_path, write_atomic
from gpt_vision.optim import adamw_kwargs, learning_rate, param_groups
from gpt_vision.run_configs import FinetuneConfig
from gpt_vision.tasks.scores import classification_metrics, confusion_image
from gpt_vision.train.metrics import MetricsLogger

RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.npz"

LossFn = Callable[[dict, int], tuple[torch.Tensor, dict[str, float]]]


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
    dump_config(cfg, out / CONFIG_FILE)
    return out


def write_json(path: Path, doc: dict) -> None:
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=False))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == labels).float().mean())


@dataclass
class Predictions:
    keys: list[str]
    labels: np.ndarray
    logits: np.ndarray  # float32 [N, classes]


class FinetuneHarness:
    """One fine-tune run in `out`: use as a context manager so the logger is closed."""

    def __init__(self, cfg: FinetuneConfig, palette: Palette, manifest: Manifest, trainings: int = 1):
        self.cfg = cfg
        self.palette = palette
        self.manifest = manifest
        self.classes = list(manifest.classes)
        self.started = time.time()
        self.device = pick_device(cfg)
        self.out = prepare_output_dir(cfg)
        self.read_keys: dict[str, list[str]] = {}
        self.baseline_logits: dict[str, np.ndarray] = {}  # test logits of each baseline, saved beside the model's
        self.logger = MetricsLogger(self.out, cfg.logging, enabled=True, total_steps=cfg.train.steps * trainings,
                                    start_step=0)

    def __enter__(self) -> "FinetuneHarness":
        return self

    def __exit__(self, *exc) -> None:
        self.logger.close()

    def seed(self) -> None:
        """Seed before building each trained module, so baselines start where the model did."""
        torch.manual_seed(self.cfg.seed)

    def train_loader(self) -> ShardLoader:
        """Endless shuffled, augmented batches of the training split."""
        cfg = self.cfg
        return ShardLoader(cfg.data, cfg.data.train_split, self.palette, cfg.train.batch_size, seed=cfg.seed, train=True)

    def eval_loader(self, split: str) -> ShardLoader:
        """One unshuffled pass: every sample of `split` exactly once, without random augmentation."""
        return ShardLoader(self.cfg.data, split, self.palette, self.cfg.train.eval_batch_size, seed=self.cfg.seed,
                           train=False)

    def optimizer(self, module: nn.Module, groups: list[dict] | None = None) -> torch.optim.Optimizer:
        groups = groups if groups is not None else param_groups(module, self.cfg.optim)
        return torch.optim.AdamW(groups, **adamw_kwargs(self.cfg.optim, self.device))

    def fit(self, module: nn.Module, loss_fn: LossFn, batches: Iterable[dict], tag: str,
            optimizer: torch.optim.Optimizer | None = None) -> list[float]:
        """`train.steps` optimizer steps of `module` with warmup+cosine LR (times each group's
        `lr_scale`); returns the per-step losses. `loss_fn(batch, step)` gives the loss and
        scalars to log; batches are moved to the device here."""
        cfg = self.cfg
        optimizer = optimizer or self.optimizer(module)
        params = [p for p in module.parameters() if p.requires_grad]
        module.train()
        losses = []
        iterator = iter(batches)
        for step in range(cfg.train.steps):
            lr = learning_rate(step, cfg.train.steps, cfg.optim.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss, stats = loss_fn(to_device(next(iterator), self.device), step)
            if not torch.isfinite(loss):
                raise UserError(f"{tag}: the loss became {loss.item()} at step {step}; lower optim.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1:
                self.logger.scalars(step, {"loss": losses[-1], "lr": lr, **stats}, prefix=tag)
            self.logger.advance(1, {"loss": losses[-1]})
        module.eval()
        return losses

    @torch.no_grad()
    def predict(self, predict_fn: Callable[[dict], torch.Tensor], split: str | None = None) -> Predictions:
        """Keys, labels and float32 logits of every sample of `split` (default: the test split), read once."""
        loader = self.eval_loader(split or self.cfg.data.test_split)
        keys, labels, logits = [], [], []
        for batch in loader:
            batch = to_device(batch, self.device)
            with autocast(self.device):
                out = predict_fn(batch)
            keys.extend(batch["key"])
            labels.append(batch["label"].cpu().numpy())
            logits.append(out.float().cpu().numpy())
        if not keys:
            raise UserError(f"split '{loader.split}' gave no samples to evaluate")
        if self.read_keys.setdefault(loader.split, keys) != keys:
            raise RuntimeError(f"evaluation passes read split '{loader.split}' in different orders")
        return Predictions(keys, np.concatenate(labels), np.concatenate(logits))

    def scores(self, labels: np.ndarray, logits: np.ndarray) -> dict:
        return classification_metrics(labels, logits, self.classes)

    def save(self, module: nn.Module, description: dict, predictions: Predictions, **extra: np.ndarray) -> None:
        """model.safetensors + classifier.yaml (how to rebuild it) + palette.npy + predictions.npz
        (with every baseline's test logits), each written atomically."""
        out = self.out
        state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
        with atomic_path(out / MODEL_FILE) as tmp:
            save_file(state, str(tmp))
        write_atomic(out / CLASSIFIER_FILE, yaml.safe_dump({**description, "classes": self.classes}, sort_keys=False))
        self.palette.save(out / PALETTE_FILE)
        baselines = {f"{name}_logits": logits for name, logits in self.baseline_logits.items()}
        with atomic_file(out / PREDICTIONS_FILE) as handle:
            np.savez(handle, keys=np.asarray(predictions.keys), labels=predictions.labels, logits=predictions.logits,
                     **baselines, **extra)

    def report(self, results: dict) -> dict:
        """results.json: the task's `model` metrics and `baselines` side by side, the data it was
        measured on, warnings and wall time; the test confusion matrix goes to TensorBoard."""
        cfg = self.cfg
        model = results["model"]
        results = {
            "task": cfg.task.kind, **results,
            "top1": model["top1"], "top5": model["top5"], "samples": model["samples"],
            "data": {"manifest": self.manifest.location, "train_split": cfg.data.train_split,
                     "test_split": cfg.data.test_split, "val_fraction": cfg.task.val_fraction,
                     "classes": self.classes, **results.get("data", {})},
            "warnings": results.get("warnings", []),
            "wall_time_s": round(time.time() - self.started, 3),
        }
        write_json(self.out / RESULTS_FILE, results)
        self.logger.image_grid(0, "test/confusion_matrix", confusion_image(np.asarray(model["confusion"])))
        self.logger.scalars(0, {"top1": model["top1"], "top5": model["top5"]}, prefix="test")
        return results

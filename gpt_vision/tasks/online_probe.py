"""The online linear probe: while pretraining runs, is the model learning features that beat pixels?

Every `train.probe_every` steps the loop calls an `OnlineProbe`. It holds a fixed labelled subset
(the first `online_probe.train_images` images of the train split and `test_images` of the test
split, read and tokenized once on every rank), runs the model over it in eval mode without
gradients, and on rank 0 fits a closed-form ridge classifier per layer (penalty chosen on a carve of
the train images), scoring it on the test images. The same classifier on raw pixels is the baseline.

Sharded strategies (FSDP, ZeRO-3) gather parameters inside the forward of the wrapped module, so
every rank runs the forward over its own slice of the subset, the same number of batches on every
rank; the pooled features meet through one sum over ranks of a zero-padded buffer. Only the
Strategy interface is used here: no backend is named.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gpt_vision.data.config import DataConfig
from gpt_vision.data.manifest import load_manifest
from gpt_vision.data.palette import Palette
from gpt_vision.data.stream import ShardLoader
from gpt_vision.errors import UserError
from gpt_vision.model import ModelConfig, feature_inputs
from gpt_vision.parallel.base import Strategy
from gpt_vision.tasks.features import Pooling
from gpt_vision.train.config import OnlineProbeConfig
from gpt_vision.train.loop import to_device

# Ridge penalties tried, in units of the number of fitted samples (features are standardized).
PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
READ_BATCH = 256


# ---- the classifier -----------------------------------------------------------------------------

@dataclass
class RidgeClassifier:
    """Least squares on one-hot targets with an L2 penalty, over standardized features."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    penalty: float
    val_top1: float

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(x.double(), self.mean, self.scale, self.weight, self.bias).argmax(1)


def _logits(x, mean, scale, weight, bias) -> torch.Tensor:
    return ((x - mean) / scale) @ weight + bias


def _ridge_solutions(x: torch.Tensor, labels: torch.Tensor, num_classes: int, penalties: list[float]):
    """(mean, scale, [(weight, bias) per penalty]) from one eigendecomposition of the smaller Gram matrix."""
    mean = x.mean(0)
    scale = x.std(0, unbiased=False) + 1e-6
    z = (x - mean) / scale
    targets = F.one_hot(labels, num_classes).double()
    bias = targets.mean(0)
    targets = targets - bias
    primal = z.shape[1] <= z.shape[0]
    evals, evecs = torch.linalg.eigh(z.T @ z if primal else z @ z.T)
    projected = evecs.T @ (z.T @ targets if primal else targets)
    solutions = []
    for penalty in penalties:
        coef = evecs @ (projected / (evals.clamp_min(0) + penalty)[:, None])
        solutions.append((coef if primal else z.T @ coef, bias))
    return mean, scale, solutions


def fit_ridge(x: torch.Tensor, labels: torch.Tensor, num_classes: int, val_fraction: float,
              seed: int) -> RidgeClassifier:
    """Choose the penalty on a seeded held-out share of (x, labels), then refit on all of it."""
    x = x.double()
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    held, fitted = order[:n_val], order[n_val:]
    penalties = [p * len(fitted) for p in PENALTIES]
    mean, scale, solutions = _ridge_solutions(x[fitted], labels[fitted], num_classes, penalties)
    scores = [top1(_logits(x[held], mean, scale, w, b).argmax(1), labels[held]) for w, b in solutions]
    best = max(range(len(PENALTIES)), key=lambda i: (scores[i], PENALTIES[i]))
    mean, scale, [(weight, bias)] = _ridge_solutions(x, labels, num_classes, [PENALTIES[best] * n])
    return RidgeClassifier(mean, scale, weight, bias, PENALTIES[best], scores[best])


def top1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted == labels).double().mean())


# ---- the labelled subset ------------------------------------------------------------------------

@dataclass
class LabelledSubset:
    inputs: dict[str, torch.Tensor]  # "tokens" int64 [N, L], "pixels" uint8 [N, H, W, C]
    labels: torch.Tensor  # int64 [N]


def read_subset(data_cfg: DataConfig, split: str, palette: Palette, count: int) -> LabelledSubset:
    """The first `count` images of `split` in shard order (the eval-time transform), tokenized."""
    loader = ShardLoader(dataclasses.replace(data_cfg, num_workers=0), split, palette, READ_BATCH, train=False)
    tokens, pixels, labels = [], [], []
    taken = 0
    for batch in loader:
        keep = min(count - taken, len(batch["label"]))
        tokens.append(batch["tokens"][:keep])
        pixels.append(batch["pixels"][:keep])
        labels.append(batch["label"][:keep])
        taken += keep
        if taken == count:
            break
    subset = LabelledSubset({"tokens": torch.cat(tokens), "pixels": torch.cat(pixels)}, torch.cat(labels))
    if (subset.labels < 0).any():
        raise UserError(f"{loader.manifest.location}: split '{split}' has unlabelled images; "
                        "the online probe (train.probe_every) needs labels")
    return subset


# ---- features -----------------------------------------------------------------------------------

def probe_layers(layers: list[int] | str, n_layer: int) -> list[int]:
    """Block indices; "auto" is the blocks ending 1/4, 1/2, 3/4 of the depth and the last one."""
    if layers == "auto":
        return sorted({max(0, round(n_layer * f) - 1) for f in (0.25, 0.5, 0.75, 1.0)})
    outside = [layer for layer in layers if not -n_layer <= layer < n_layer]
    if outside:
        raise UserError(f"online_probe.layers: {outside[0]} is not a block of this {n_layer}-layer model")
    return sorted({layer % n_layer for layer in layers})


def check_pooling(cfg: OnlineProbeConfig, model_cfg: ModelConfig) -> None:
    """At startup, so a grid that does not fit fails before training, naming our key."""
    if cfg.pooling != "grid":
        return
    side = math.isqrt(model_cfg.seq_len)
    if side * side != model_cfg.seq_len or cfg.grid_size > side:
        raise UserError(f"online_probe.grid_size={cfg.grid_size} needs a square of at least "
                        f"{cfg.grid_size}x{cfg.grid_size} positions; the model has {model_cfg.seq_len}")


# ---- the probe ----------------------------------------------------------------------------------

class OnlineProbe:
    """Called by the loop; returns the scalars to log under `probe/` (empty on ranks other than 0)."""

    def __init__(self, cfg: OnlineProbeConfig, data_cfg: DataConfig, palette: Palette, model_cfg: ModelConfig,
                 strategy: Strategy, micro_batch_size: int, seed: int, message: Callable[[str], None] = print):
        self.run_started = time.perf_counter()
        check_pooling(cfg, model_cfg)
        manifest = load_manifest(data_cfg.manifest)
        if not manifest.classes:
            raise UserError(f"{manifest.location} has no classes; the online probe (train.probe_every) needs labels")
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.strategy = strategy
        self.seed = seed
        self.message = message
        self.num_classes = len(manifest.classes)
        self.batch_size = cfg.batch_size or micro_batch_size
        self.layers = probe_layers(cfg.layers, model_cfg.n_layer)
        self.pooling = Pooling(cfg.pooling, cfg.grid_size)
        self.train_set = read_subset(data_cfg, data_cfg.train_split, palette, cfg.train_images)
        self.test_set = read_subset(data_cfg, cfg.test_split or data_cfg.val_split, palette, cfg.test_images)
        self.pixels_top1: float | None = None
        self.seconds = time.perf_counter() - self.run_started

    @torch.no_grad()
    def features(self, subset: LabelledSubset) -> list[torch.Tensor]:
        """Pooled float32 features [N, F] of every probed layer, on every rank (a collective)."""
        strategy = self.strategy
        n = len(subset.labels)
        per_rank = math.ceil(n / strategy.world_size)
        start = strategy.rank * per_rank
        mine = torch.arange(start, start + per_rank).clamp_max(n - 1)  # padded: equal batches everywhere
        module = strategy.module
        was_training = module.training
        module.eval()
        chunks = []
        try:
            for first in range(0, per_rank, self.batch_size):
                index = mine[first:first + self.batch_size]
                batch = to_device({k: v[index] for k, v in subset.inputs.items()}, strategy.device)
                with strategy.autocast():
                    hidden = module(feature_inputs(self.model_cfg, batch), features=self.layers)
                chunks.append(self.pooling([h.float() for h in hidden]))
        finally:
            module.train(was_training)
        local = torch.cat(chunks).transpose(0, 1)  # [layers, per_rank, F]
        everything = local.new_zeros(local.shape[0], per_rank * strategy.world_size, local.shape[2])
        everything[:, start:start + per_rank] = local
        return list(strategy.all_reduce_sum(everything)[:, :n].cpu())

    def classify(self, train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[float, float]:
        """(test top-1, held-out train top-1) of a ridge classifier fitted on the train subset."""
        clf = fit_ridge(train_x, self.train_set.labels, self.num_classes, self.cfg.val_fraction, self.seed)
        return top1(clf.predict(test_x), self.test_set.labels), clf.val_top1

    def __call__(self) -> dict[str, float]:
        started = time.perf_counter()
        train, test = self.features(self.train_set), self.features(self.test_set)
        if self.strategy.rank != 0:
            return {}
        scalars: dict[str, float] = {}
        held_out = {}
        for layer, train_x, test_x in zip(self.layers, train, test):
            scalars[f"top1/layer{layer}"], held_out[layer] = self.classify(train_x, test_x)
        best = max(self.layers, key=lambda layer: held_out[layer])  # chosen without the test images
        scalars["top1"], scalars["best_layer"] = scalars[f"top1/layer{best}"], float(best)
        if self.pixels_top1 is None:
            flat = [s.inputs["pixels"].flatten(1).float() for s in (self.train_set, self.test_set)]
            self.pixels_top1, _ = self.classify(*flat)
            scalars["pixels_top1"] = self.pixels_top1
        elapsed = time.perf_counter() - started
        self.seconds += elapsed
        scalars["seconds"] = elapsed
        scalars["seconds_total"] = self.seconds
        scalars["run_fraction"] = self.seconds / (time.perf_counter() - self.run_started)
        self.message(f"online probe: top-1 {scalars['top1']:.3f} (layer {best}), pixels {self.pixels_top1:.3f}, "
                     f"{elapsed:.1f} s ({100 * scalars['run_fraction']:.1f}% of the run so far)")
        return scalars

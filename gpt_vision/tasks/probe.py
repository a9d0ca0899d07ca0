"""Probes on a frozen backbone: iGPT's linear probe (with a layer sweep) and AIM's attentive probe.

Linear probe: average-pooled features of each candidate layer, BatchNorm without affine, then a
linear layer (the MAE recipe). All candidate layers are probed at once from one cached feature
pass; the layer is chosen on a seeded validation split carved from train, then tested.
Attentive probe: one learned query cross-attends (multi-head) over the per-position features of
one layer, then BatchNorm and a linear layer; the backbone runs on every batch (per-position
features are too large to cache).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gpt_vision.data.stream import ShardLoader
from gpt_vision.errors import UserError
from gpt_vision.model import feature_inputs
from gpt_vision.model.gpt import GPT
from gpt_vision.tasks import classify
from gpt_vision.tasks.classify import Backbone
from gpt_vision.tasks.features import cached_features
from gpt_vision.tasks.finetune_config import FinetuneConfig
from gpt_vision.train.optim import adamw_kwargs, param_groups

log = logging.getLogger(__name__)


class LinearProbe(nn.Module):
    """`probes` independent BN(affine=False)+Linear heads over [B, probes, dim] -> [B, probes, classes]."""

    def __init__(self, probes: int, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(probes * dim, affine=False, eps=1e-6)
        self.weight = nn.Parameter(torch.empty(probes, dim, num_classes))
        self.bias = nn.Parameter(torch.zeros(probes, num_classes))
        nn.init.trunc_normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, probes, dim = x.shape
        x = self.norm(x.reshape(batch, probes * dim)).view(batch, probes, dim)
        return torch.einsum("bpd,pdc->bpc", x, self.weight) + self.bias

    def select(self, index: int) -> "LinearProbe":
        """The single probe `index` as its own module (what is saved)."""
        _, dim, classes = self.weight.shape
        single = LinearProbe(1, dim, classes)
        span = slice(index * dim, (index + 1) * dim)
        with torch.no_grad():
            single.weight.copy_(self.weight[index:index + 1])
            single.bias.copy_(self.bias[index:index + 1])
            single.norm.running_mean.copy_(self.norm.running_mean[span])
            single.norm.running_var.copy_(self.norm.running_var[span])
        return single


class AttentiveProbe(nn.Module):
    """A learned query attends over per-position features [B, L, d]; then BN and linear."""

    def __init__(self, dim: int, heads: int, num_classes: int):
        super().__init__()
        if dim % heads:
            raise UserError(f"task.attentive_heads={heads} does not divide the backbone width {dim}")
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out_norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.norm(x)
        pooled, _ = self.attn(self.query.expand(x.shape[0], -1, -1).to(kv.dtype), kv, kv, need_weights=False)
        return self.head(self.out_norm(pooled[:, 0]))


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


def attention_arg(cfg: FinetuneConfig) -> str | None:
    return cfg.task.attention or None


def index_batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless seeded epochs of shuffled index batches (the last short batch dropped)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, max(1, n - batch_size + 1), batch_size):
            yield order[start:start + batch_size]


@torch.no_grad()
def probe_logits(probe: nn.Module, features: torch.Tensor, batch_size: int) -> torch.Tensor:
    probe.eval()
    outs = [probe(features[i:i + batch_size].float()) for i in range(0, len(features), batch_size)]
    return torch.cat(outs).cpu()


def new_optimizer(module: nn.Module, cfg: FinetuneConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(module, cfg.optim), **adamw_kwargs(cfg.optim, device))


def run_linear_probe(cfg: FinetuneConfig, backbone: Backbone, out: Path) -> dict:
    started = time.time()
    device = classify.pick_device(cfg)
    model: GPT = freeze(backbone.model).to(device)
    checksum = classify.state_checksum(model)
    n_layer = model.config.n_layer
    layers = resolve_layers(cfg.task.layers, n_layer, auto="all")
    train_loader = classify.eval_loader(cfg, cfg.data.train_split, backbone.palette)
    with tqdm(total=train_loader.num_samples, unit="img", desc="features train", dynamic_ncols=True,
              disable=not cfg.logging.progress) as bar:
        train, cached = cached_features(cfg.feature_cache_dir, model, backbone.palette.centroids, train_loader,
                                        layers, attention_arg(cfg), device, bar)
    log.info("train features %s (%d samples, layers %s)", "from cache" if cached else "extracted", len(train.labels), layers)
    candidates = train.features.reshape(len(train.labels), 1, -1) if cfg.task.concat else train.features
    names = ["+".join(map(str, layers))] if cfg.task.concat else [str(layer) for layer in layers]
    num_classes = len(train_loader.manifest.classes)

    n = len(train.labels)
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_val = int(round(n * cfg.task.val_fraction))
    if len(names) > 1 and n_val == 0:
        raise UserError(f"task.val_fraction={cfg.task.val_fraction} leaves no validation samples to choose among layers {names}")
    fit_idx, val_idx = order[n_val:], order[:n_val]
    x = torch.from_numpy(candidates).to(device)
    y = torch.from_numpy(train.labels).to(device)
    x_fit, y_fit = x[torch.from_numpy(fit_idx).to(device)], y[torch.from_numpy(fit_idx).to(device)]

    torch.manual_seed(cfg.seed)
    probe = LinearProbe(len(names), candidates.shape[2], num_classes).to(device)
    optimizer = new_optimizer(probe, cfg, device)
    logger = classify.new_logger(out, cfg, cfg.train.steps)
    indices = index_batches(len(fit_idx), cfg.train.batch_size, cfg.seed)

    def batches():
        for idx in indices:
            idx = idx.to(device)
            yield {"x": x_fit[idx].float(), "y": y_fit[idx]}

    def loss_fn(batch, step):
        probe.train()
        logits = probe(batch["x"])  # [B, P, C]
        per_probe = nn.functional.cross_entropy(logits.permute(0, 2, 1), batch["y"][:, None].expand(-1, logits.shape[1]),
                                                reduction="none", label_smoothing=cfg.task.label_smoothing).mean(0)
        return per_probe.sum(), {"accuracy": classify.accuracy(logits.mean(1), batch["y"])}

    try:
        losses = classify.fit(loss_fn, batches(), optimizer, cfg, logger, list(probe.parameters()), tag="probe")
        per_layer: dict[str, float] = {}
        if n_val:
            val_logits = probe_logits(probe, x[torch.from_numpy(val_idx).to(device)], cfg.train.eval_batch_size)
            val_labels = torch.from_numpy(train.labels[val_idx])
            per_layer = {name: classify.accuracy(val_logits[:, i], val_labels) for i, name in enumerate(names)}
            for i, name in enumerate(names):
                logger.scalars(int(name.split("+")[0]), {"val_accuracy": per_layer[name]}, prefix="probe_layers")
            logger.image_grid(0, "probe/val_accuracy_per_layer", classify.bar_chart(list(per_layer.values())))
        chosen = max(range(len(names)), key=lambda i: per_layer.get(names[i], 0.0)) if per_layer else 0
        test_layers = layers if cfg.task.concat else [layers[chosen]]
        test_loader = classify.eval_loader(cfg, cfg.data.val_split, backbone.palette)
        with tqdm(total=test_loader.num_samples, unit="img", desc="features test", dynamic_ncols=True,
                  disable=not cfg.logging.progress) as bar:
            test, _ = cached_features(cfg.feature_cache_dir, model, backbone.palette.centroids, test_loader,
                                      test_layers, attention_arg(cfg), device, bar)
        head = probe.select(chosen).to(device)
        test_x = torch.from_numpy(test.features.reshape(len(test.labels), 1, -1)).to(device)
        logits = probe_logits(head, test_x, cfg.train.eval_batch_size)[:, 0].numpy()
        if classify.state_checksum(model) != checksum:
            raise RuntimeError("the frozen backbone's weights changed during probing")
        classify.save_predictions(out / classify.PREDICTIONS_FILE, test.keys.tolist(), test.labels, logits)
        classify.save_model(out, head, {
            "kind": "linear_probe", "init": backbone.source, "layers": test_layers, "concat": cfg.task.concat,
            "attention": cfg.task.attention, "num_classes": num_classes, "feature_dim": int(test_x.shape[2]),
            "classes": list(test_loader.manifest.classes),
        }, backbone.palette)
        results = {
            "task": "linear_probe", "init": backbone.source,
            **classify.classification_metrics(test.labels, logits, num_classes),
            "chosen_layer": test_layers if cfg.task.concat else layers[chosen],
            "per_layer": per_layer,
            "parameters": {"backbone": classify.count_parameters(model), "head": classify.count_parameters(head),
                           "trainable": classify.count_parameters(head)},
            "train_samples": int(len(fit_idx)), "val_samples": int(n_val),
            "final_train_loss": losses[-1], "features_cached": cached, "backbone_checksum": checksum,
        }
        return classify.report(out, logger, results, num_classes, started)
    finally:
        logger.close()


def run_attentive_probe(cfg: FinetuneConfig, backbone: Backbone, out: Path) -> dict:
    started = time.time()
    device = classify.pick_device(cfg)
    model: GPT = freeze(backbone.model).to(device)
    checksum = classify.state_checksum(model)
    (layer,) = resolve_layers(cfg.task.layers, model.config.n_layer, auto="last")
    attention = attention_arg(cfg)
    train_loader = ShardLoader(cfg.data, cfg.data.train_split, backbone.palette, cfg.train.batch_size,
                               seed=cfg.seed, train=True)
    num_classes = len(train_loader.manifest.classes)
    torch.manual_seed(cfg.seed)
    probe = AttentiveProbe(model.config.n_embd, cfg.task.attentive_heads, num_classes).to(device)
    optimizer = new_optimizer(probe, cfg, device)
    logger = classify.new_logger(out, cfg, cfg.train.steps)

    def run(batch) -> torch.Tensor:
        with torch.no_grad(), classify.autocast(device):
            (features,) = model.features(feature_inputs(model.config, batch), [layer], pool="none", attention=attention)
        return probe(features.float())

    def loss_fn(batch, step):
        probe.train()
        batch = classify.to_device(batch, device)
        logits = run(batch)
        loss = classify.smoothed_ce(logits, batch["label"], cfg.task.label_smoothing)
        return loss, {"accuracy": classify.accuracy(logits, batch["label"])}

    try:
        losses = classify.fit(loss_fn, train_loader, optimizer, cfg, logger, list(probe.parameters()), tag="probe")
        probe.eval()
        test_loader = classify.eval_loader(cfg, cfg.data.val_split, backbone.palette)
        keys, labels, logits = classify.predict(run, test_loader, device)
        if classify.state_checksum(model) != checksum:
            raise RuntimeError("the frozen backbone's weights changed during probing")
        classify.save_predictions(out / classify.PREDICTIONS_FILE, keys, labels, logits)
        classify.save_model(out, probe, {
            "kind": "attentive_probe", "init": backbone.source, "layers": [layer], "attention": cfg.task.attention,
            "heads": cfg.task.attentive_heads, "num_classes": num_classes, "feature_dim": model.config.n_embd,
            "classes": list(test_loader.manifest.classes),
        }, backbone.palette)
        results = {
            "task": "attentive_probe", "init": backbone.source,
            **classify.classification_metrics(labels, logits, num_classes),
            "chosen_layer": layer, "per_layer": {},
            "parameters": {"backbone": classify.count_parameters(model), "head": classify.count_parameters(probe),
                           "trainable": classify.count_parameters(probe)},
            "final_train_loss": losses[-1], "backbone_checksum": checksum,
        }
        return classify.report(out, logger, results, num_classes, started)
    finally:
        logger.close()

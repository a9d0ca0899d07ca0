"""Probes on a frozen backbone: iGPT's linear probe (with a layer sweep) and AIM's attentive probe.

Linear probe: pooled features (task.pooling) of each candidate layer, cached once, then one linear
classifier per candidate (tasks/linear.py); the layer is chosen on a seeded validation carve of
train, then tested. Attentive probe: one learned query cross-attends (multi-head) over the
per-position features of one layer, then BatchNorm and a linear layer; the backbone runs on every
batch (per-position features are too large to cache).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gpt_vision.errors import UserError
from gpt_vision.model import feature_inputs
from gpt_vision.run_configs import FinetuneConfig
from gpt_vision.tasks.backbone import Backbone, count_parameters, freeze, resolve_layers, state_checksum
from gpt_vision.tasks.baselines import keys_digest, pixel_baseline
from gpt_vision.tasks.features import Features, Pooling, cached_features
from gpt_vision.tasks.harness import FinetuneHarness, Predictions, accuracy, autocast
from gpt_vision.tasks.linear import LinearFit, carve, probe_logits, train_linear
from gpt_vision.tasks.scores import bar_chart

log = logging.getLogger(__name__)
# Validation accuracy (on the train carve) this far above test accuracy makes the layer choice
# unreliable: the carve does not represent the test split (or is too small); a warning is written.
VAL_TEST_GAP = 0.10


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


def probe_features(harness: FinetuneHarness, backbone: Backbone, split: str, layers: list[int]) -> tuple[Features, bool]:
    """Pooled features of `layers` over one eval pass of `split`, from the feature cache when there."""
    cfg = harness.cfg
    loader = harness.eval_loader(split)
    with tqdm(total=loader.num_samples, unit="img", desc=f"features {split}", dynamic_ncols=True,
              disable=not cfg.logging.progress) as bar:
        return cached_features(cfg.feature_cache_dir, backbone.model, backbone.palette.centroids, loader, layers,
                               Pooling(cfg.task.pooling, cfg.task.grid_size), cfg.task.attention or None,
                               harness.device, bar)


def layer_names(layers: list[int], pooling: str) -> list[str]:
    return ["+".join(map(str, layers))] if pooling == "concat" else [str(layer) for layer in layers]


def choose_layer(harness: FinetuneHarness, names: list[str], val_accuracy: list[float]) -> int:
    """The candidate best on the validation carve, logged per layer."""
    for name, value in zip(names, val_accuracy):
        harness.logger.scalars(int(name.split("+")[0]), {"val_accuracy": value}, prefix="probe_layers")
    if val_accuracy:
        harness.logger.image_grid(0, "probe/val_accuracy_per_layer", bar_chart(val_accuracy))
    return int(np.argmax(val_accuracy)) if val_accuracy else 0


def unreliable_choice(val_accuracy: float | None, test_accuracy: float) -> list[str]:
    if val_accuracy is None or val_accuracy - test_accuracy <= VAL_TEST_GAP:
        return []
    warning = (f"validation accuracy {val_accuracy:.4f} on the train carve is more than {VAL_TEST_GAP:.2f} above "
               f"test accuracy {test_accuracy:.4f}: the layer choice is unreliable")
    log.warning(warning)
    return [warning]


def run_linear_probe(cfg: FinetuneConfig, backbone: Backbone) -> dict:
    model, checksum = freeze(backbone.model), state_checksum(backbone.model)
    layers = resolve_layers(cfg.task.layers, model.config.n_layer, auto="all")
    names = layer_names(layers, cfg.task.pooling)
    trainings = 0 if cfg.task.probe_solver == "lbfgs" else 1 + ("pixels" in cfg.task.baselines)
    with FinetuneHarness(cfg, backbone.palette, backbone.manifest, trainings) as harness:
        model.to(harness.device)
        train, cached = probe_features(harness, backbone, cfg.data.train_split, layers)
        fit_idx, val_idx = carve(len(train.labels), cfg.task.val_fraction, cfg.seed)
        x, y = (torch.from_numpy(a).to(harness.device) for a in (train.features, train.labels))
        fitted = train_linear(harness, x, y, fit_idx, val_idx, tag="probe")
        chosen = choose_layer(harness, names, fitted.val_accuracy)
        test_layers = layers if cfg.task.pooling == "concat" else [layers[chosen]]
        test, _ = probe_features(harness, backbone, cfg.data.test_split, test_layers)
        head = fitted.probe.select(chosen)
        logits = probe_logits(head, torch.from_numpy(test.features).to(harness.device), cfg.train.eval_batch_size)
        predictions = Predictions(test.keys.tolist(), test.labels, logits[:, 0].cpu().numpy())
        if state_checksum(model) != checksum:
            raise RuntimeError("the frozen backbone's weights changed during probing")
        results = linear_probe_results(harness, fitted, names, chosen, test_layers, predictions, {
            "init": backbone.source, "features_cached": cached, "backbone_checksum": checksum,
            "parameters": {"backbone": count_parameters(model), "head": count_parameters(head),
                           "trainable": count_parameters(head)},
            "data": {"train_samples": len(fit_idx), "val_samples": len(val_idx),
                     "fit_keys": keys_digest(train.keys[fit_idx]), "test_keys": keys_digest(predictions.keys)},
        }, train.keys.tolist())
        harness.save(head, {"kind": "linear_probe", "init": backbone.source, "layers": test_layers,
                            "pooling": cfg.task.pooling, "grid_size": cfg.task.grid_size,
                            "attention": cfg.task.attention, "num_classes": len(harness.classes),
                            "feature_dim": int(test.features.shape[2])}, predictions)
        return harness.report(results)


def linear_probe_results(harness: FinetuneHarness, fitted: LinearFit, names: list[str], chosen: int,
                         test_layers: list[int], predictions: Predictions, results: dict, train_keys: list[str]) -> dict:
    """The probe's scores, per-layer validation accuracy, train loss and L2, the pixel baseline and
    the layer-choice warning."""
    cfg = harness.cfg
    scores = harness.scores(predictions.labels, predictions.logits)
    val = fitted.val_accuracy[chosen] if fitted.val_accuracy else None
    return {
        **results, "model": scores,
        "baselines": {"pixels": pixel_baseline(harness, predictions.keys, train_keys)} if "pixels" in cfg.task.baselines else {},
        "chosen_layer": test_layers if cfg.task.pooling == "concat" else test_layers[0],
        "per_layer": dict(zip(names, fitted.val_accuracy)), "per_layer_train_loss": dict(zip(names, fitted.train_loss)),
        "l2": dict(zip(names, fitted.l2)), "solver": cfg.task.probe_solver,
        "warnings": unreliable_choice(val, scores["top1"]),
    }


def on_backbone(probe: AttentiveProbe, model, layer: int, attention: str | None, device: torch.device):
    """batch -> the probe's logits over the frozen backbone's per-position features of `layer`."""
    def logits(batch: dict) -> torch.Tensor:
        with torch.no_grad(), autocast(device):
            (features,) = model.features(feature_inputs(model.config, batch), [layer], pool="none", attention=attention)
        return probe(features.float())

    return logits


def run_attentive_probe(cfg: FinetuneConfig, backbone: Backbone) -> dict:
    model, checksum = freeze(backbone.model), state_checksum(backbone.model)
    (layer,) = resolve_layers(cfg.task.layers, model.config.n_layer, auto="last")
    with FinetuneHarness(cfg, backbone.palette, backbone.manifest) as harness:
        harness.seed()
        probe = AttentiveProbe(model.config.n_embd, cfg.task.attentive_heads, len(harness.classes)).to(harness.device)
        logits = on_backbone(probe, model.to(harness.device), layer, cfg.task.attention or None, harness.device)

        def loss_fn(batch, step):
            out = logits(batch)
            loss = nn.functional.cross_entropy(out.float(), batch["label"], label_smoothing=cfg.task.label_smoothing)
            return loss, {"accuracy": accuracy(out, batch["label"])}

        losses = harness.fit(probe, loss_fn, harness.train_loader(), tag="probe")
        predictions = harness.predict(logits)
        if state_checksum(model) != checksum:
            raise RuntimeError("the frozen backbone's weights changed during probing")
        baselines = {"pixels": pixel_baseline(harness, predictions.keys)} if "pixels" in cfg.task.baselines else {}
        harness.save(probe, {"kind": "attentive_probe", "init": backbone.source, "layers": [layer],
                             "attention": cfg.task.attention, "heads": cfg.task.attentive_heads,
                             "num_classes": len(harness.classes), "feature_dim": model.config.n_embd}, predictions)
        return harness.report({
            "init": backbone.source, "model": harness.scores(predictions.labels, predictions.logits),
            "baselines": baselines, "chosen_layer": layer, "per_layer": {},
            "per_layer_train_loss": {str(layer): losses[-1]},
            "parameters": {"backbone": count_parameters(model), "head": count_parameters(probe),
                           "trainable": count_parameters(probe)},
            "backbone_checksum": checksum,
        })

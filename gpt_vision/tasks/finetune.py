"""Full fine-tuning: the backbone plus a classification head on pooled features of one layer.

iGPT fine-tunes with the classification loss and, optionally, the pretraining objective as well
(total = CE + generative_weight * objective loss). Layer-wise LR decay gives block i the scale
layer_decay ** (depth + 1 - (i + 1)) through the `lr_scale` key of its parameter group; the
embeddings get the smallest scale, the final norm and the heads 1.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from gpt_vision.config import build
from gpt_vision.data.palette import Palette
from gpt_vision.data.stream import ShardLoader
from gpt_vision.errors import UserError
from gpt_vision.export import PALETTE_FILE, WEIGHTS_FILE
from gpt_vision.model import ModelConfig, build_model, build_objective, feature_inputs
from gpt_vision.model.gpt import GPT
from gpt_vision.tasks import classify
from gpt_vision.tasks.classify import Backbone
from gpt_vision.tasks.finetune_config import FinetuneConfig
from gpt_vision.tasks.probe import resolve_layers
from gpt_vision.train.optim import adamw_kwargs


class Classifier(nn.Module):
    """Mean-pooled output of block `layer` -> LayerNorm -> dropout -> Linear."""

    def __init__(self, backbone: GPT, layer: int, num_classes: int, attention: str | None = None,
                 head_dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.layer = layer
        self.attention = attention
        self.norm = nn.LayerNorm(backbone.config.n_embd)
        self.dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(backbone.config.n_embd, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict) -> torch.Tensor:
        inputs = feature_inputs(self.backbone.config, batch)
        (pooled,) = self.backbone.features(inputs, [self.layer], pool="mean", attention=self.attention)
        return self.head(self.dropout(self.norm(pooled)))

    def describe(self) -> dict:
        return {"model": dataclasses.asdict(self.backbone.config), "layer": self.layer,
                "attention": self.attention or "", "num_classes": self.head.out_features,
                "head_dropout": self.dropout.p}


def load_finetuned(path: str | Path) -> tuple[Classifier, Palette, dict]:
    """A finetune output folder as (classifier on CPU, palette, its classifier.yaml)."""
    path = Path(path)
    described = path / classify.CLASSIFIER_FILE
    if not described.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"{path} is not a finetune output (expected {WEIGHTS_FILE} and {classify.CLASSIFIER_FILE})")
    doc = yaml.safe_load(described.read_text()) or {}
    if doc.get("kind") != "finetune":
        raise UserError(f"{described} describes a {doc.get('kind')!r} head; a teacher must be a task.kind=finetune output")
    model_cfg = build(ModelConfig, doc["model"], prefix="model")
    classifier = Classifier(build_model(model_cfg), doc["layer"], doc["num_classes"], doc["attention"] or None,
                            doc.get("head_dropout", 0.0))
    missing, unexpected = classifier.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=False)
    if missing or unexpected:
        raise UserError(f"{path / WEIGHTS_FILE} does not fit {described} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return classifier, Palette.load(path / PALETTE_FILE), doc


def layer_decay_groups(classifier: Classifier, cfg: FinetuneConfig) -> list[dict]:
    """AdamW groups by (depth, decayed?): Linear matrices decay, norms/biases/embeddings do not."""
    n_layer = classifier.backbone.config.n_layer
    decayed = {id(m.weight) for m in classifier.modules() if isinstance(m, nn.Linear)}
    if cfg.optim.decay_embeddings:
        decayed |= {id(m.weight) for m in classifier.modules() if isinstance(m, nn.Embedding)}
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in classifier.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone.blocks."):
            depth = int(name.split(".")[2]) + 1
        elif name.startswith(("backbone.ln_f", "backbone.head")) or not name.startswith("backbone."):
            depth = n_layer + 1
        else:
            depth = 0
        decay = id(param) in decayed
        group = groups.setdefault((depth, decay), {
            "params": [], "weight_decay": cfg.optim.weight_decay if decay else 0.0,
            "lr_scale": cfg.task.layer_decay ** (n_layer + 1 - depth),
        })
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def run_finetune(cfg: FinetuneConfig, backbone: Backbone, out: Path) -> dict:
    started = time.time()
    device = classify.pick_device(cfg)
    model = backbone.model
    (layer,) = resolve_layers(cfg.task.layers, model.config.n_layer, auto="last")
    train_loader = ShardLoader(cfg.data, cfg.data.train_split, backbone.palette, cfg.train.batch_size,
                               seed=cfg.seed, train=True)
    num_classes = len(train_loader.manifest.classes)
    torch.manual_seed(cfg.seed)
    classifier = Classifier(model, layer, num_classes, cfg.task.attention or None, cfg.task.head_dropout).to(device)
    optimizer = torch.optim.AdamW(layer_decay_groups(classifier, cfg), **adamw_kwargs(cfg.optim, device))
    objective = build_objective(model.config) if cfg.task.generative_weight else None
    logger = classify.new_logger(out, cfg, cfg.train.steps)

    def loss_fn(batch, step):
        classifier.train()
        batch = classify.to_device(batch, device)
        with classify.autocast(device):
            logits = classifier(batch)
            loss = classify.smoothed_ce(logits, batch["label"], cfg.task.label_smoothing)
            stats = {"accuracy": classify.accuracy(logits, batch["label"]), "class_loss": float(loss.detach())}
            if objective is not None:
                generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
                generative, _ = objective(model, batch, generator)
                loss = loss + cfg.task.generative_weight * generative
                stats["generative_loss"] = float(generative.detach())
        return loss, stats

    try:
        losses = classify.fit(loss_fn, train_loader, optimizer, cfg, logger, list(classifier.parameters()), tag="finetune")
        classifier.eval()
        test_loader = classify.eval_loader(cfg, cfg.data.val_split, backbone.palette)
        keys, labels, logits = classify.predict(classifier, test_loader, device)
        classify.save_predictions(out / classify.PREDICTIONS_FILE, keys, labels, logits)
        classify.save_model(out, classifier, {"kind": "finetune", "init": backbone.source, **classifier.describe(),
                                              "classes": list(test_loader.manifest.classes)}, backbone.palette)
        head = classify.count_parameters(classifier) - classify.count_parameters(model)
        results = {
            "task": "finetune", "init": backbone.source,
            **classify.classification_metrics(labels, logits, num_classes),
            "chosen_layer": layer, "per_layer": {},
            "parameters": {"backbone": classify.count_parameters(model), "head": head,
                           "trainable": classify.count_parameters(classifier, trainable_only=True)},
            "first_train_loss": losses[0], "final_train_loss": losses[-1],
        }
        return classify.report(out, logger, results, num_classes, started)
    finally:
        logger.close()

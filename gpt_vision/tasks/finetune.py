"""Full fine-tuning: the backbone plus a classification head on pooled features (task.pooling).

iGPT fine-tunes with the classification loss and, optionally, the pretraining objective as well
(total = CE + generative_weight * objective loss). Layer-wise LR decay gives block i the scale
layer_decay ** (depth + 1 - (i + 1)) through the `lr_scale` key of its parameter group; the
embeddings get the smallest scale, the final norm and the heads 1. The `scratch` baseline trains
the same classifier from random init on the labels only, for the same steps.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from gpt_vision.data.palette import Palette
from gpt_vision.errors import UserError
from gpt_vision.export import model_config, read_yaml_mapping, weight_shapes
from gpt_vision.layout import CLASSIFIER_FILE, Kind, MODEL_FILE, PALETTE_FILE, kind_of
from gpt_vision.model import build_model, build_objective, feature_inputs
from gpt_vision.model.gpt import GPT
from gpt_vision.model.shapes import check_weights_fit
from gpt_vision.run_configs import FinetuneConfig
from gpt_vision.tasks.backbone import Backbone, count_parameters, resolve_layers
from gpt_vision.tasks.baselines import pixel_baseline
from gpt_vision.tasks.features import Pooling
from gpt_vision.tasks.harness import FinetuneHarness, accuracy, autocast
from gpt_vision.tasks.linear import LinearProbe, carve, train_linear


class Classifier(nn.Module):
    """Pooled output of block(s) `layers` -> LayerNorm -> dropout -> Linear."""

    def __init__(self, backbone: GPT, layers: list[int], num_classes: int, attention: str | None = None,
                 head_dropout: float = 0.0, pooling: Pooling = Pooling()):
        super().__init__()
        self.backbone = backbone
        self.layers = list(layers)
        self.attention = attention
        self.pooling = pooling
        dim = pooling.dim(backbone.config.n_embd, len(self.layers))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.dropout(self.head_input(batch)))

    def head_input(self, batch: dict) -> torch.Tensor:
        """The normalized pooled features the head reads (before dropout)."""
        inputs = feature_inputs(self.backbone.config, batch)
        hidden = self.backbone.features(inputs, self.layers, pool="none", attention=self.attention)
        return self.norm(self.pooling(hidden)[:, 0])

    def describe(self) -> dict:
        return {"model": dataclasses.asdict(self.backbone.config), "layers": self.layers,
                "pooling": self.pooling.kind, "grid_size": self.pooling.grid_size,
                "attention": self.attention or "", "num_classes": self.head.out_features,
                "head_dropout": self.dropout.p}


def load_finetuned(path: str | Path) -> tuple[Classifier, Palette, dict]:
    """A finetune output folder as (classifier on CPU, palette, its classifier.yaml)."""
    path = Path(path)
    described = path / CLASSIFIER_FILE
    if kind_of(path) is not Kind.FINETUNED:
        raise UserError(f"{path} is not a finetune output (expected {MODEL_FILE} and {CLASSIFIER_FILE})")
    doc = read_yaml_mapping(described)
    if doc.get("kind") != "finetune":
        raise UserError(f"{described} describes a {doc.get('kind')!r} head; a teacher must be a task.kind=finetune output")
    model_cfg = model_config(doc.get("model"), described)
    backbone = {key.removeprefix("backbone."): shape for key, shape in weight_shapes(path / MODEL_FILE).items()
                if key.startswith("backbone.")}
    check_weights_fit(backbone, model_cfg, str(described), str(path / MODEL_FILE))
    pooling = Pooling(doc.get("pooling", "mean"), doc.get("grid_size", 2))
    classifier = Classifier(build_model(model_cfg), doc.get("layers", [doc.get("layer")]), doc["num_classes"],
                            doc["attention"] or None, doc.get("head_dropout", 0.0), pooling)
    missing, unexpected = classifier.load_state_dict(load_file(str(path / MODEL_FILE)), strict=False)
    if missing or unexpected:
        raise UserError(f"{path / MODEL_FILE} does not fit {described} (missing {missing[:3]}, unexpected {unexpected[:3]})")
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


def fit_head_as_probe(harness: FinetuneHarness, model: nn.Module, heads: list[nn.Linear], tag: str) -> float:
    """LP-FT: solve the heads as the linear probe (L-BFGS, L2 chosen on the validation carve) on the
    frozen, unaugmented features `model.head_input` gives on the training split, folding the
    probe's standardization into each Linear. Returns the probe's validation accuracy."""
    model.eval()
    features = harness.predict(model.head_input, harness.cfg.data.train_split)
    x = torch.from_numpy(features.logits).to(harness.device)
    y = torch.from_numpy(features.labels).to(harness.device)
    fit_idx, val_idx = carve(len(x), harness.cfg.task.val_fraction, harness.cfg.seed)
    fitted = train_linear(harness, x[:, None, :], y, fit_idx, val_idx, f"{tag}_head")
    for head in heads:
        fold_probe_into_head(fitted.probe, head)
    return fitted.val_accuracy[0] if fitted.val_accuracy else float("nan")


@torch.no_grad()
def fold_probe_into_head(probe: LinearProbe, head: nn.Linear) -> None:
    """head(x) == probe(x) for a single-candidate probe: its standardization moves into the Linear."""
    scale = (probe.norm.running_var + probe.norm.eps).rsqrt()
    weight = probe.weight[0] * scale[:, None]  # [dim, classes]
    head.weight.copy_(weight.T)
    head.bias.copy_(probe.bias[0] - probe.norm.running_mean @ weight)


def train_classifier(harness: FinetuneHarness, classifier: Classifier, generative_weight: float, tag: str) -> list[float]:
    """Class cross-entropy (+ generative_weight * the backbone's pretraining objective) for train.steps,
    from a head fitted as a probe first when task.head_init=probe."""
    cfg, device = harness.cfg, harness.device
    if cfg.task.head_init == "probe":
        accuracy_before = fit_head_as_probe(harness, classifier, [classifier.head], tag)
        harness.logger.scalars(0, {"head_probe_val_accuracy": accuracy_before}, prefix=tag)
    objective = build_objective(classifier.backbone.config) if generative_weight else None

    def loss_fn(batch, step):
        with autocast(device):
            logits = classifier(batch)
            loss = nn.functional.cross_entropy(logits.float(), batch["label"], label_smoothing=cfg.task.label_smoothing)
            stats = {"accuracy": accuracy(logits, batch["label"]), "class_loss": float(loss.detach())}
            if objective is not None:
                generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
                generative = objective(classifier.backbone, batch, generator)
                loss = loss + generative_weight * generative
                stats["generative_loss"] = float(generative.detach())
        return loss, stats

    optimizer = harness.optimizer(classifier, layer_decay_groups(classifier, cfg))
    return harness.fit(classifier, loss_fn, harness.train_loader(), tag, optimizer)


def new_classifier(harness: FinetuneHarness, backbone: GPT) -> Classifier:
    task = harness.cfg.task
    harness.seed()
    layers = resolve_layers(task.layers, backbone.config.n_layer, auto="last")
    return Classifier(backbone, layers, len(harness.classes), task.attention or None, task.head_dropout,
                      Pooling(task.pooling, task.grid_size)).to(harness.device)


def scratch_baseline(harness: FinetuneHarness, backbone: GPT, test_keys: list[str]) -> dict:
    """The same classifier from random init, labels only, the same steps and test samples."""
    harness.seed()
    classifier = new_classifier(harness, build_model(backbone.config))
    losses = train_classifier(harness, classifier, 0.0, tag="baseline_scratch")
    predictions = harness.predict(classifier)
    if predictions.keys != test_keys:
        raise RuntimeError("the scratch baseline read different test samples than the model")
    harness.baseline_logits["scratch"] = predictions.logits
    return {**harness.scores(predictions.labels, predictions.logits), "final_train_loss": losses[-1]}


def run_finetune(cfg: FinetuneConfig, backbone: Backbone) -> dict:
    trainings = 2 if "scratch" in cfg.task.baselines else 1
    with FinetuneHarness(cfg, backbone.palette, backbone.manifest, trainings) as harness:
        classifier = new_classifier(harness, backbone.model)
        losses = train_classifier(harness, classifier, cfg.task.generative_weight, tag="finetune")
        predictions = harness.predict(classifier)
        baselines = {}
        if "pixels" in cfg.task.baselines:
            baselines["pixels"] = pixel_baseline(harness, predictions.keys)
        if "scratch" in cfg.task.baselines:
            baselines["scratch"] = scratch_baseline(harness, backbone.model, predictions.keys)
        harness.save(classifier, {"kind": "finetune", "init": backbone.source, **classifier.describe()}, predictions)
        backbone_params = count_parameters(backbone.model)
        return harness.report({
            "init": backbone.source, "model": harness.scores(predictions.labels, predictions.logits),
            "baselines": baselines, "chosen_layer": classifier.layers if cfg.task.pooling == "concat" else classifier.layers[0],
            "per_layer": {}, "first_train_loss": losses[0], "final_train_loss": losses[-1],
            "parameters": {"backbone": backbone_params, "head": count_parameters(classifier) - backbone_params,
                           "trainable": count_parameters(classifier, trainable_only=True)},
        })

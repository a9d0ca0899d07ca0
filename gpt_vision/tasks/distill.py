"""Distillation: a small student learns from a fine-tuned teacher (frozen, eval mode, no grad).

soft: (1 - alpha) * CE(class head, labels) + alpha * T^2 * KL(teacher/T || student/T)
hard: (1 - alpha) * CE(class head, labels) + alpha * CE(distillation head, teacher argmax)  (DeiT)
The distillation term goes to the distillation-token head when the student has one (else to the
class head); inference averages both heads. The same student is also trained from labels only
(both heads on the labels) so the gain from the teacher is measured in the same run.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt_vision.data.stream import ShardLoader
from gpt_vision.errors import ConfigError, UserError
from gpt_vision.model.student import Student, resolve_student
from gpt_vision.tasks import classify
from gpt_vision.tasks.finetune import Classifier, load_finetuned
from gpt_vision.tasks.finetune_config import FinetuneConfig
from gpt_vision.tasks.probe import freeze, new_optimizer


class TeacherLogits:
    """The frozen teacher's logits, remembered per sample key when views repeat (no random augmentation)."""

    def __init__(self, teacher: Classifier, device: torch.device, cache: bool):
        self.teacher = teacher
        self.device = device
        self.cache: dict[str, torch.Tensor] | None = {} if cache else None
        self.hits = 0

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        keys = batch["key"]
        if self.cache is not None and all(k in self.cache for k in keys):
            self.hits += len(keys)
            return torch.stack([self.cache[k] for k in keys]).to(self.device)
        with classify.autocast(self.device):
            logits = self.teacher(batch).float()
        if self.cache is not None:
            for key, row in zip(keys, logits.cpu()):
                self.cache[key] = row
        return logits


def distillation_loss(cls: torch.Tensor, dist: torch.Tensor | None, labels: torch.Tensor,
                      teacher: torch.Tensor | None, cfg: FinetuneConfig) -> torch.Tensor:
    """The loss of one batch; teacher=None trains from labels only (both heads on the labels)."""
    smoothing = cfg.task.label_smoothing
    class_loss = classify.smoothed_ce(cls, labels, smoothing)
    if teacher is None:
        return class_loss if dist is None else (class_loss + classify.smoothed_ce(dist, labels, smoothing)) / 2
    target_head = (dist if dist is not None else cls).float()
    if cfg.distill.mode == "soft":
        t = cfg.distill.temperature
        kd = F.kl_div(F.log_softmax(target_head / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                      reduction="batchmean", log_target=True) * (t * t)
    else:
        kd = F.cross_entropy(target_head, teacher.argmax(dim=-1))
    return (1 - cfg.distill.alpha) * class_loss + cfg.distill.alpha * kd


def train_student(cfg: FinetuneConfig, student: Student, teacher: TeacherLogits | None, palette, device,
                  out: Path, tag: str) -> list[float]:
    loader = ShardLoader(cfg.data, cfg.data.train_split, palette, cfg.train.batch_size, seed=cfg.seed, train=True)
    optimizer = new_optimizer(student, cfg, device)
    logger = classify.new_logger(out / tag, cfg, cfg.train.steps)

    def loss_fn(batch, step):
        student.train()
        batch = classify.to_device(batch, device)
        target = teacher(batch) if teacher is not None else None
        with classify.autocast(device):
            cls, dist = student(batch)
            loss = distillation_loss(cls.float(), None if dist is None else dist.float(), batch["label"], target, cfg)
        return loss, {"accuracy": classify.accuracy(cls, batch["label"])}

    try:
        return classify.fit(loss_fn, loader, optimizer, cfg, logger, list(student.parameters()), tag=tag)
    finally:
        logger.close()


def run_distill(cfg: FinetuneConfig) -> dict:
    """Checks the teacher, student and data first; the output folder is created only then."""
    started = time.time()
    device = classify.pick_device(cfg)
    teacher, palette, described = load_finetuned(cfg.distill.teacher)
    model_cfg = teacher.backbone.config
    manifest = classify.check_data_fits(model_cfg, palette, cfg, f"teacher {cfg.distill.teacher}")
    num_classes = described["num_classes"]
    if len(manifest.classes) != num_classes:
        raise UserError(f"teacher {cfg.distill.teacher} predicts {num_classes} classes, the data {manifest.location} "
                        f"has {len(manifest.classes)}")
    teacher = freeze(teacher).to(device)
    teacher_checksum = classify.state_checksum(teacher)
    s = cfg.student
    try:
        shape = resolve_student(s.preset, s.n_layer, s.n_embd, s.n_head, s.patch_size, s.distillation_token)
    except ConfigError as error:
        raise error.under("student") from None

    def new_student() -> Student:
        torch.manual_seed(cfg.seed)
        try:
            return Student(shape, model_cfg, num_classes).to(device)
        except ConfigError as error:
            raise error.under("student") from None

    teacher_params = classify.count_parameters(teacher)
    student = new_student()
    if student.num_parameters() > s.max_param_ratio * teacher_params:
        raise UserError(f"student {s.preset} has {student.num_parameters():,} parameters, more than "
                        f"student.max_param_ratio={s.max_param_ratio} of the teacher's {teacher_params:,}; choose a smaller student")
    augment = cfg.data.augment
    random_views = bool(augment.random_crop_padding or augment.flip)
    out = classify.prepare_output_dir(cfg)
    teacher_logits = TeacherLogits(teacher, device, cfg.distill.cache_teacher_logits and not random_views)

    losses = train_student(cfg, student, teacher_logits, palette, device, out, "distilled")
    runs = {"distilled": student}
    baseline_losses = None
    if cfg.distill.labels_only_baseline:
        runs["labels_only"] = new_student()
        baseline_losses = train_student(cfg, runs["labels_only"], None, palette, device, out, "labels_only")
    if classify.state_checksum(teacher) != teacher_checksum:
        raise RuntimeError("the teacher's weights changed during distillation")

    test_loader = classify.eval_loader(cfg, cfg.data.val_split, palette)
    keys, labels, teacher_test = classify.predict(teacher, test_loader, device)
    evaluated = {}
    for name, model in runs.items():
        model.eval()
        evaluated[name] = classify.predict(model.predict, test_loader, device)
        if evaluated[name][0] != keys:
            raise RuntimeError("evaluation passes read the test split in different orders")
    student.eval()
    _, _, class_head = classify.predict(lambda b: student(b)[0], test_loader, device)
    extra = {"teacher_logits": teacher_test, "class_head_logits": class_head}
    if "labels_only" in evaluated:
        extra["labels_only_logits"] = evaluated["labels_only"][2]
    distilled_logits = evaluated["distilled"][2]
    classify.save_predictions(out / classify.PREDICTIONS_FILE, keys, labels, distilled_logits, **extra)
    classify.save_model(out, student, {
        "kind": "student", "teacher": cfg.distill.teacher, "preset": s.preset, "family": shape.family,
        "n_layer": shape.n_layer, "n_embd": shape.n_embd, "n_head": shape.n_head, "patch_size": shape.patch_size,
        "distillation_token": shape.distillation_token, "num_classes": num_classes,
        "classes": list(manifest.classes),
    }, palette)
    results = {
        "task": "distill", "init": f"teacher {cfg.distill.teacher}", "mode": cfg.distill.mode,
        **classify.classification_metrics(labels, distilled_logits, num_classes),
        "teacher": classify.classification_metrics(labels, teacher_test, num_classes),
        "chosen_layer": None, "per_layer": {},
        "parameters": {"student": student.num_parameters(), "teacher": teacher_params,
                       "ratio": student.num_parameters() / teacher_params, "trainable": student.num_parameters()},
        "first_train_loss": losses[0], "final_train_loss": losses[-1],
        "teacher_checksum": teacher_checksum, "teacher_logit_cache_hits": teacher_logits.hits,
    }
    if "labels_only" in evaluated:
        results["labels_only"] = classify.classification_metrics(labels, evaluated["labels_only"][2], num_classes)
        results["labels_only"]["final_train_loss"] = baseline_losses[-1]
    logger = classify.new_logger(out, cfg, 0)
    try:
        return classify.report(out, logger, results, num_classes, started)
    finally:
        logger.close()

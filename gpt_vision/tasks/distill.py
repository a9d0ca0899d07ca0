"""Distillation: a small student learns from a fine-tuned teacher (frozen, eval mode, no grad).

soft: (1 - alpha) * CE(class head, labels) + alpha * T^2 * KL(teacher/T || student/T)
hard: (1 - alpha) * CE(class head, labels) + alpha * CE(distillation head, teacher argmax)  (DeiT)
The distillation term goes to the distillation-token head when the student has one (else to the
class head); inference averages both heads. The same student is also trained from labels only
(both heads on the labels) so the gain from the teacher is measured in the same run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt_vision.errors import ConfigError, UserError
from gpt_vision.model.student import Student, StudentShape, resolve_student
from gpt_vision.run_configs import FinetuneConfig
from gpt_vision.tasks.backbone import check_data_fits, count_parameters, freeze, state_checksum
from gpt_vision.tasks.baselines import pixel_baseline
from gpt_vision.tasks.finetune import Classifier, fit_head_as_probe, load_finetuned
from gpt_vision.tasks.harness import FinetuneHarness, accuracy, autocast


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
        with autocast(self.device):
            logits = self.teacher(batch).float()
        if self.cache is not None:
            for key, row in zip(keys, logits.cpu()):
                self.cache[key] = row
        return logits


def smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


def distillation_loss(cls: torch.Tensor, dist: torch.Tensor | None, labels: torch.Tensor,
                      teacher: torch.Tensor | None, cfg: FinetuneConfig) -> torch.Tensor:
    """The loss of one batch; teacher=None trains from labels only (both heads on the labels)."""
    smoothing = cfg.task.label_smoothing
    class_loss = smoothed_ce(cls, labels, smoothing)
    if teacher is None:
        return class_loss if dist is None else (class_loss + smoothed_ce(dist, labels, smoothing)) / 2
    target_head = (dist if dist is not None else cls).float()
    if cfg.distill.mode == "soft":
        t = cfg.distill.temperature
        kd = F.kl_div(F.log_softmax(target_head / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                      reduction="batchmean", log_target=True) * (t * t)
    else:
        kd = F.cross_entropy(target_head, teacher.argmax(dim=-1))
    return (1 - cfg.distill.alpha) * class_loss + cfg.distill.alpha * kd


def train_student(harness: FinetuneHarness, student: Student, teacher: TeacherLogits | None, tag: str) -> list[float]:
    def loss_fn(batch, step):
        target = teacher(batch) if teacher is not None else None
        with autocast(harness.device):
            cls, dist = student(batch)
            loss = distillation_loss(cls.float(), None if dist is None else dist.float(), batch["label"], target,
                                     harness.cfg)
        return loss, {"accuracy": accuracy(cls, batch["label"])}

    return harness.fit(student, loss_fn, harness.train_loader(), tag)


def student_shape(cfg: FinetuneConfig) -> StudentShape:
    s = cfg.student
    try:
        return resolve_student(s.preset, s.n_layer, s.n_embd, s.n_head, s.patch_size, s.distillation_token,
                               s.pooling, s.grid_size)
    except ConfigError as error:
        raise error.under("student") from None


def start_heads(harness: FinetuneHarness, student: Student) -> dict[str, torch.Tensor]:
    """Fit the heads as the probe on the student's own features when student.head_init=probe (once:
    the labels-only student starts from the same state), and return that starting state."""
    if harness.cfg.student.head_init == "probe":
        accuracy_before = fit_head_as_probe(harness, student, student.heads(), "student")
        harness.logger.scalars(0, {"head_probe_val_accuracy": accuracy_before}, prefix="student")
    return {key: value.detach().clone() for key, value in student.state_dict().items()}


def new_student(cfg: FinetuneConfig, shape: StudentShape, teacher: Classifier, num_classes: int) -> Student:
    """The seeded student, refused when it holds more than student.max_param_ratio of the teacher."""
    torch.manual_seed(cfg.seed)
    try:
        student = Student(shape, teacher.backbone.config, num_classes)
    except ConfigError as error:
        raise error.under("student") from None
    teacher_params = count_parameters(teacher)
    if student.num_parameters() > cfg.student.max_param_ratio * teacher_params:
        raise UserError(f"student {cfg.student.preset} has {student.num_parameters():,} parameters, more than "
                        f"student.max_param_ratio={cfg.student.max_param_ratio} of the teacher's {teacher_params:,}; "
                        "choose a smaller student")
    return student


def load_teacher(cfg: FinetuneConfig):
    """The frozen teacher, its palette, classes and the manifest, all checked before any output is written."""
    teacher, palette, described = load_finetuned(cfg.distill.teacher)
    manifest = check_data_fits(teacher.backbone.config, palette, cfg, f"teacher {cfg.distill.teacher}")
    if len(manifest.classes) != described["num_classes"]:
        raise UserError(f"teacher {cfg.distill.teacher} predicts {described['num_classes']} classes, the data "
                        f"{manifest.location} has {len(manifest.classes)}")
    return freeze(teacher), palette, manifest


def run_distill(cfg: FinetuneConfig) -> dict:
    """The distilled student beside its teacher, the same student from labels only, and pixels."""
    teacher, palette, manifest = load_teacher(cfg)
    shape = student_shape(cfg)
    student = new_student(cfg, shape, teacher, len(manifest.classes))
    trainings = 2 if cfg.distill.labels_only_baseline else 1
    with FinetuneHarness(cfg, palette, manifest, trainings) as harness:
        teacher_checksum = state_checksum(teacher.to(harness.device))
        augment = cfg.data.augment
        logits = TeacherLogits(teacher, harness.device, cfg.distill.cache_teacher_logits
                               and not (augment.random_crop_padding or augment.flip))
        start = start_heads(harness, student.to(harness.device))
        losses = train_student(harness, student, logits, "distilled")
        predictions = harness.predict(student.predict)
        baselines, extra = {}, {"teacher_logits": harness.predict(teacher).logits,
                                "class_head_logits": harness.predict(lambda b: student(b)[0]).logits}
        if cfg.distill.labels_only_baseline:
            baselines["labels_only"] = labels_only_baseline(harness, shape, teacher, start)
        if "pixels" in cfg.task.baselines:
            baselines["pixels"] = pixel_baseline(harness, predictions.keys)
        if state_checksum(teacher) != teacher_checksum:
            raise RuntimeError("the teacher's weights changed during distillation")
        harness.save(student, {"kind": "student", "teacher": cfg.distill.teacher, "preset": cfg.student.preset,
                               **student_description(shape), "num_classes": len(harness.classes)}, predictions, **extra)
        return harness.report({
            "init": f"teacher {cfg.distill.teacher}", "mode": cfg.distill.mode,
            "model": harness.scores(predictions.labels, predictions.logits),
            "teacher": harness.scores(predictions.labels, extra["teacher_logits"]), "baselines": baselines,
            "chosen_layer": None, "per_layer": {}, "first_train_loss": losses[0], "final_train_loss": losses[-1],
            "parameters": {"student": student.num_parameters(), "teacher": count_parameters(teacher),
                           "ratio": student.num_parameters() / count_parameters(teacher),
                           "trainable": student.num_parameters()},
            "teacher_checksum": teacher_checksum, "teacher_logit_cache_hits": logits.hits,
        })


def labels_only_baseline(harness: FinetuneHarness, shape: StudentShape, teacher: Classifier,
                         start: dict[str, torch.Tensor]) -> dict:
    """The same student, from the same start, trained from labels only, scored on the test split."""
    student = new_student(harness.cfg, shape, teacher, len(harness.classes)).to(harness.device)
    student.load_state_dict(start)
    losses = train_student(harness, student, None, "labels_only")
    predictions = harness.predict(student.predict)
    harness.baseline_logits["labels_only"] = predictions.logits
    return {**harness.scores(predictions.labels, predictions.logits), "final_train_loss": losses[-1]}


def student_description(shape: StudentShape) -> dict:
    return {"family": shape.family, "n_layer": shape.n_layer, "n_embd": shape.n_embd, "n_head": shape.n_head,
            "patch_size": shape.patch_size, "distillation_token": shape.distillation_token,
            "pooling": shape.pooling, "grid_size": shape.grid_size}

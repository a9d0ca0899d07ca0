"""The root configs of the two entry points, side by side: `PretrainConfig` and `FinetuneConfig`.

Each composes the sections its components own (data, model, optim, parallel, ...); the sections
only the fine-tune tasks read (task, student, distill, fine-tune train) are defined here too.
The backbone's shape and palette are never configured for fine-tuning: they come from `init`
(or, for distillation, from the teacher), and the data sections are checked against them at start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gpt_vision.checkpoint import CheckpointConfig
from gpt_vision.data.config import DataConfig, TokenizerConfig
from gpt_vision.errors import ConfigError, require_number
from gpt_vision.model.config import ModelConfig
from gpt_vision.optim import OptimConfig, ScheduleConfig
from gpt_vision.parallel.config import ParallelConfig
from gpt_vision.slurm_config import SlurmConfig
from gpt_vision.train.config import LoggingConfig, OnlineProbeConfig, TrainConfig


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; written resolved into the run directory."""

    name: str = ""
    # Default: runs/<name>. Checkpoints, TensorBoard, metrics and the resolved config go here.
    run_dir: str = ""
    seed: int = 0
    # Bitwise-reproducible kernels (slower); resume-equality tests turn it on.
    deterministic: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    online_probe: OnlineProbeConfig = field(default_factory=OnlineProbeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def check(self) -> None:
        if not self.name and not self.run_dir:
            raise ConfigError("name", "is required (the run goes to runs/<name>), or set run_dir")
        if self.model.vocab_size and self.model.vocab_size != self.tokenizer.clusters:
            raise ConfigError(
                "model.vocab_size",
                f"{self.model.vocab_size} differs from tokenizer.clusters={self.tokenizer.clusters} (leave it 0 to follow the palette)",
            )
        if self.schedule.warmup_steps > self.train.steps:
            raise ConfigError("schedule.warmup_steps", f"{self.schedule.warmup_steps} exceeds train.steps={self.train.steps}")

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


TaskKind = Literal["linear_probe", "attentive_probe", "finetune", "distill"]


Pooling = Literal["mean", "grid", "concat"]
Baseline = Literal["pixels", "scratch"]


@dataclass
class TaskConfig:
    """What is trained on top of the backbone, from which of its layers, and what it is compared with."""

    kind: TaskKind = "linear_probe"
    # "auto": linear_probe sweeps every layer (picked on a validation split carved from train);
    # attentive_probe and finetune use the last layer. A list of block indices (negative from the
    # end): linear_probe sweeps them (pooling=concat joins them), the others take one (or concat).
    layers: list[int] | str = "auto"
    # How a layer's [positions, d] outputs become one vector: mean (iGPT: average over positions),
    # grid (grid_size x grid_size average pooling of the token grid, concatenated), concat (the
    # means of every layer in task.layers, concatenated). attentive_probe pools by attention (mean).
    pooling: Pooling = "mean"
    grid_size: int = 2
    # Fraction of the training split held out (seeded) to choose the probe's layer and L2.
    val_fraction: float = 0.1
    # linear_probe (and the pixel baseline): lbfgs = full-batch logistic regression on standardized
    # features solved to convergence for each probe_l2, the best on the validation carve; adamw =
    # minibatch steps with optim.* and train.steps.
    probe_solver: Literal["lbfgs", "adamw"] = "lbfgs"
    probe_l2: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    probe_max_iter: int = 200
    # Computed in the same run on the same splits and image size: pixels = the linear probe on
    # standardized raw pixels; scratch = the same classifier from random init (finetune only).
    baselines: list[Baseline] = field(default_factory=lambda: ["pixels", "scratch"])
    # Attention of the frozen/fine-tuned backbone when extracting features; "" = the objective's own.
    attention: Literal["", "causal", "bidirectional"] = ""
    attentive_heads: int = 4
    label_smoothing: float = 0.0
    # finetune: total loss = CE(class) + generative_weight * pretraining objective (iGPT: both).
    generative_weight: float = 0.0
    # finetune: the LR of block i is lr * layer_decay ** (depth - i); 1.0 = no decay.
    layer_decay: float = 1.0
    head_dropout: float = 0.0
    # finetune: "probe" first fits the head as a converged linear probe on the frozen features
    # (LP-FT), so the first updates do not push a random head's gradients into the backbone;
    # "random" starts from a random head (benchmarks/RESULTS.md, Quality).
    head_init: Literal["probe", "random"] = "random"

    def check(self) -> None:
        if isinstance(self.layers, str) and self.layers != "auto":
            raise ConfigError("layers", f"must be 'auto' or a list of layer indices, got {self.layers!r}")
        if isinstance(self.layers, list) and not self.layers:
            raise ConfigError("layers", "is an empty list (use 'auto' or name at least one layer)")
        if self.pooling == "concat":
            if self.kind not in ("linear_probe", "finetune") or not isinstance(self.layers, list):
                raise ConfigError("pooling", "concat needs kind=linear_probe or finetune and an explicit list of layers")
        elif self.kind in ("attentive_probe", "finetune") and isinstance(self.layers, list) and len(self.layers) != 1:
            raise ConfigError("layers", f"{self.kind} uses one layer (or pooling=concat), got {self.layers}")
        if self.kind == "attentive_probe" and self.pooling != "mean":
            raise ConfigError("pooling", "attentive_probe pools by attention; leave pooling=mean")
        if self.grid_size < 1:
            raise ConfigError("grid_size", f"must be >= 1, got {self.grid_size}")
        require_number("val_fraction", self.val_fraction, "in [0, 0.9)", 0.0 <= self.val_fraction < 0.9)
        if not self.probe_l2 or not all(math.isfinite(value) and value >= 0 for value in self.probe_l2):
            raise ConfigError("probe_l2", f"must be a non-empty list of values >= 0, got {self.probe_l2}")
        if self.probe_max_iter < 1:
            raise ConfigError("probe_max_iter", f"must be >= 1, got {self.probe_max_iter}")
        if len(set(self.baselines)) != len(self.baselines):
            raise ConfigError("baselines", f"lists a baseline twice: {self.baselines}")
        if self.attentive_heads < 1:
            raise ConfigError("attentive_heads", f"must be >= 1, got {self.attentive_heads}")
        require_number("label_smoothing", self.label_smoothing, "in [0, 1)", 0.0 <= self.label_smoothing < 1.0)
        require_number("generative_weight", self.generative_weight, ">= 0", self.generative_weight >= 0)
        require_number("layer_decay", self.layer_decay, "in (0, 1]", 0.0 < self.layer_decay <= 1.0)
        require_number("head_dropout", self.head_dropout, "in [0, 1)", 0.0 <= self.head_dropout < 1.0)


@dataclass
class FinetuneDataConfig(DataConfig):
    """The data section of fine-tuning: train on `train_split`, report on `test_split`. The split
    that chooses a probe's layer is carved from train (task.val_fraction); `val_split` is the
    pretraining validation split and must not be set to anything else here."""

    test_split: str = "test"

    def check(self) -> None:
        super().check()
        if not self.test_split:
            raise ConfigError("test_split", "must name the split the results are reported on")
        if self.val_split != DataConfig.val_split and self.val_split != self.test_split:
            raise ConfigError("val_split", f"is not used by fine-tuning; set data.test_split={self.val_split} "
                                           "for the reported split (layer choice uses task.val_fraction)")


@dataclass
class FinetuneTrainConfig:
    """Steps, not epochs: a probe on cached features counts steps over the in-memory features."""

    steps: int = 1000
    batch_size: int = 64
    eval_batch_size: int = 256
    log_every: int = 20

    def check(self) -> None:
        for name in ("steps", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")


@dataclass
class StudentConfig:
    """The distillation student; a preset fills the shape fields left at 0 (see model/student.py)."""

    preset: str = "gpt-student-tiny"
    n_layer: int = 0
    n_embd: int = 0
    n_head: int = 0
    patch_size: int = 0
    distillation_token: bool = True
    # What the heads read: "token" (DeiT's class and distillation tokens) or "grid" (the k x k cell
    # averages of the pixel/patch tokens, like the teacher's grid head; both heads read them).
    pooling: Literal["token", "grid"] = "token"
    grid_size: int = 7
    # "probe" first fits the heads as the converged linear probe on the student's own initial
    # features (labels only, no teacher), the same for the distilled and the labels-only student;
    # needs pooling=grid (a random class token carries little).
    head_init: Literal["probe", "random"] = "random"
    # A student may hold at most this fraction of the teacher's parameters.
    max_param_ratio: float = 0.25

    def check(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "patch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0 (0 = from the preset), got {getattr(self, name)}")
        if self.grid_size < 1:
            raise ConfigError("grid_size", f"must be >= 1, got {self.grid_size}")
        if self.head_init == "probe" and self.pooling != "grid":
            raise ConfigError("head_init", "probe needs student.pooling=grid (a random class token carries little to fit)")
        require_number("max_param_ratio", self.max_param_ratio, "in (0, 1]", 0.0 < self.max_param_ratio <= 1.0)


@dataclass
class DistillConfig:
    # A finetune output directory (model.safetensors + classifier.yaml + palette.npy).
    teacher: str = ""
    mode: Literal["soft", "hard"] = "soft"
    temperature: float = 3.0
    # Weight of the distillation term; the label cross-entropy gets 1 - alpha.
    alpha: float = 0.5
    # Reuse teacher logits per sample key (only without random augmentation, where views repeat).
    cache_teacher_logits: bool = True
    # Also train the same student from labels only, for comparison.
    labels_only_baseline: bool = True

    def check(self) -> None:
        require_number("temperature", self.temperature, "> 0", self.temperature > 0)
        require_number("alpha", self.alpha, "in [0, 1]", 0.0 <= self.alpha <= 1.0)


@dataclass
class FinetuneConfig:
    """Everything `launch/finetune.py` needs; written resolved into the output directory."""

    # A step dir, a run dir, an export dir or a local HF ImageGPT dir (not used by distill).
    init: str = ""
    output_dir: str = ""
    overwrite: bool = False
    # Where linear-probe features are cached; "" = <output_dir>/feature_cache.
    feature_cache: str = ""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    task: TaskConfig = field(default_factory=TaskConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    # Only `path` is read: the palette for HF ImageGPT inits, or a cross-check of the checkpoint's.
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir", "is required (results, predictions and the trained head go there)")
        if self.task.kind == "distill":
            if not self.distill.teacher:
                raise ConfigError("distill.teacher", "is required for task.kind=distill (a finetune output directory)")
            if self.init:
                raise ConfigError("init", "is not used by distill (the student starts from scratch; set distill.teacher)")
        elif not self.init:
            raise ConfigError("init", "is required: a step dir, run dir, export dir or HF ImageGPT dir")
        if self.schedule.warmup_steps > self.train.steps:
            raise ConfigError("schedule.warmup_steps", f"{self.schedule.warmup_steps} exceeds train.steps={self.train.steps}")

    @property
    def feature_cache_dir(self) -> Path:
        return Path(self.feature_cache) if self.feature_cache else Path(self.output_dir) / "feature_cache"

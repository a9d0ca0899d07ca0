"""The loop's config sections: what it counts (`train:`), the online probe it runs (`online_probe:`), where it logs (`logging:`)."""
from dataclasses import dataclass
from typing import Literal

from gpt_vision.errors import ConfigError, require_number


@dataclass
class TrainConfig:
    """What the loop counts: optimizer steps and samples, never epochs."""

    steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    # 0: micro_batch_size * grad_accum * world size. Set it to have the launcher verify that.
    global_batch_size: int = 0
    eval_every: int = 500
    eval_batches: int = 0  # 0: the whole held-out split
    log_every: int = 10
    sample_every: int = 0  # steps between sample grids in TensorBoard; 0: never
    probe_every: int = 0  # steps between online linear probes (section online_probe); 0: never
    max_consecutive_skips: int = 5
    compile: bool = False
    # Peak FLOP/s for MFU; 0: measure a matmul at start (dtype of the run).
    peak_flops: float = 0.0
    # Minutes of wall clock the run should fit; > 0 replaces `steps` by a plan measured over the
    # first steps (recorded in config.yaml and checkpoints, kept on resume). 0: off.
    time_budget_min: float = 0.0

    def check(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "log_every", "max_consecutive_skips"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        for name in ("global_batch_size", "eval_every", "eval_batches", "sample_every", "time_budget_min",
                     "probe_every"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        require_number("peak_flops", self.peak_flops, ">= 0 (0 measures it)", self.peak_flops >= 0)
        if self.global_batch_size and self.global_batch_size % (self.micro_batch_size * self.grad_accum):
            raise ConfigError(
                "global_batch_size",
                f"{self.global_batch_size} is not a multiple of micro_batch_size*grad_accum "
                f"({self.micro_batch_size}*{self.grad_accum})",
            )


@dataclass
class OnlineProbeConfig:
    """What the online probe (gpt_vision.tasks.online_probe) reads and fits every train.probe_every steps."""

    # The first N labelled images of the train split / of the test split, read once per run.
    train_images: int = 1000
    test_images: int = 500
    test_split: str = ""  # "": data.val_split
    # "auto": the blocks at 1/4, 1/2, 3/4 of the depth and the last one.
    layers: list[int] | str = "auto"
    # mean: average over positions (iGPT); grid: grid_size x grid_size spatial averages, concatenated.
    pooling: Literal["mean", "grid"] = "mean"
    grid_size: int = 2
    batch_size: int = 0  # 0: train.micro_batch_size
    # Share of the train images held out to choose the ridge penalty and the best layer.
    val_fraction: float = 0.2

    def check(self) -> None:
        for name in ("train_images", "test_images", "grid_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 0:
            raise ConfigError("batch_size", f"must be >= 0 (0: train.micro_batch_size), got {self.batch_size}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if isinstance(self.layers, str) and self.layers != "auto":
            raise ConfigError("layers", f"must be 'auto' or a list of block indices, got {self.layers!r}")
        if isinstance(self.layers, list) and not self.layers:
            raise ConfigError("layers", "is an empty list (use 'auto' or name at least one block)")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True

"""The `slurm:` config section: resources, time limit and requeue policy of a Slurm job.

Kept apart from the submitit launcher (`gpt_vision.slurm`) so that loading a config never
imports submitit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from gpt_vision.errors import ConfigError


@dataclass
class SlurmConfig:
    partition: str = ""
    account: str = ""
    qos: str = ""
    nodes: int = 1
    gpus_per_node: int = 0  # tasks per node = max(1, gpus_per_node): one rank per GPU
    tasks_per_node: int = 0  # 0: follow gpus_per_node
    cpus_per_task: int = 8
    mem_gb: int = 0  # 0: the partition's default
    time_min: int = 60
    constraint: str = ""
    # Seconds of warning before the time limit (USR1), time to checkpoint and requeue.
    signal_delay_s: int = 120
    max_requeues: int = 10
    array_parallelism: int = 16
    log_dir: str = ""  # default: <run_dir>/slurm
    extra: dict[str, str] = field(default_factory=dict)  # more sbatch options, e.g. {"exclusive": ""}

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    def check(self) -> None:
        for name in ("nodes", "cpus_per_task", "time_min", "array_parallelism"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "tasks_per_node", "mem_gb", "signal_delay_s", "max_requeues"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.signal_delay_s >= self.time_min * 60:
            raise ConfigError("signal_delay_s", f"{self.signal_delay_s}s warning does not fit in time_min={self.time_min}")
        for key in self.extra:
            if not re.fullmatch(r"[a-z][a-z0-9_-]*", key):
                raise ConfigError("extra", f"{key!r} is not an sbatch option name (e.g. exclusive, mail-type)")

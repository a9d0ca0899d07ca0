"""In-process pretraining runs for drills that need no kill (faster than a subprocess)."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import torch

from gpt_vision.config_loader import load_config
from gpt_vision.distributed import DistEnv
from gpt_vision.export import load_pretrained
from gpt_vision.run_configs import PretrainConfig
from gpt_vision.tasks.pretrain import run_pretraining
from gpt_vision.train import preemption
from tests.helpers.toydata import tiny_overrides

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                 master_port=29500, launcher="python")


def pretrain(manifest: Path, run_dir: Path, *extra: str, env: DistEnv = SINGLE, fault_injector=None):
    cfg = load_config(PretrainConfig, None, tiny_overrides(manifest, run_dir, "deterministic=true", *extra))
    preemption.clear()
    return run_pretraining(cfg, env, fault_injector=fault_injector)


class Payload:
    """Unpickling this calls open(marker, "w"): the file's existence proves code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@contextlib.contextmanager
def tmpfs(mount: Path, size: str = "4m"):
    """A real tmpfs of `size` mounted at `mount` (needs root), unmounted afterwards."""
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk_at(step_to_fill: int, disk: Path, leave_bytes: int = 48 << 10):
    """A fault injector: at `step_to_fill` (after the step-2 checkpoint) fill the disk up to
    `leave_bytes` (by default room for logs, not a save); rank 0 fills it for all."""
    def inject(step, strategy, loss):
        if step == step_to_fill and strategy.rank == 0 and not (disk / "filler").exists():
            stats = os.statvfs(disk)
            with open(disk / "filler", "wb") as handle:
                handle.write(b"\0" * max(stats.f_bavail * stats.f_frsize - leave_bytes, 0))
        return loss
    return inject


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(path).model.state_dict()


def differing_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not bitwise equal (or exist on one side only)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


def first_difference(a: dict[int, float], b: dict[int, float]) -> int | None:
    for step in sorted(a.keys() | b.keys()):
        if a.get(step) != b.get(step):
            return step
    return None

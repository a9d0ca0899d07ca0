"""Tiny pretraining runs for the Slurm tests: toy shards, a small config file, run inspection."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
import yaml

from gpt_vision.config_loader import parse_override

from slurm_jobs import REPO
from tests.helpers.toydata import tiny_overrides, write_toy_shards

PRETRAIN_SH = REPO / "slurm" / "pretrain.sh"
# CPU-only local nodes: no GPUs, one CPU per rank, little memory.
CPU_SBATCH = ("--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G")
SLURM_OVERRIDES = ("slurm.cpus_per_task=1", "slurm.mem_gb=2", "slurm.time_min=10", "slurm.signal_delay_s=60")


def write_config(directory: Path, run_dir: Path, *extra: str) -> Path:
    """Toy shards + a YAML config of the tiny-model settings; returns the config path."""
    manifest = write_toy_shards(directory / "shards")
    tree: dict = {}
    for item in tiny_overrides(manifest, run_dir, "deterministic=true", *extra):
        key, value = parse_override(item)
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    path = directory / "pretrain.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def train_steps(run_dir: Path) -> list[int]:
    """The step of every logged training window, in file order (log_every=1: one per step)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["split"] == "train"]


def train_samples(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["samples"] for r in rows if r["split"] == "train"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from gpt_vision.export import load_pretrained

    return load_pretrained(run_dir).model.state_dict()


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


def scancel(job_id: int) -> None:
    subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)


def sbatch_run(options: list[str], args: list[str], **env: object) -> int:
    """`sbatch OPTIONS slurm/pretrain.sh ARGS` (run from the repo, as users do); returns the job id."""
    out = subprocess.run(
        ["sbatch", "--parsable", *options, str(PRETRAIN_SH), *args],
        capture_output=True, text=True, timeout=60, check=True, cwd=REPO,
        env={**os.environ, **{k: str(v) for k, v in env.items()}},
    ).stdout.strip()
    return int(out.split(";")[0])

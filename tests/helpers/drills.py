"""Subprocess runs of the real CLI (python or torchrun), kill -9 helpers and metrics readers
shared by the reliability drills."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.toydata import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
LAUNCH = str(REPO / "launch" / "pretrain.py")


def command(nproc: int) -> list[str]:
    if nproc == 1:
        return [PYTHON, LAUNCH]
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()), LAUNCH]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("GPTV_TEST_KILL_IN_SAVE", None)
    env.update(extra)
    return env


def run_cli(args: list[str], nproc: int = 1, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real pretraining entry point in a subprocess; returns code, stdout, stderr."""
    return subprocess.run(command(nproc) + args, cwd=REPO, env=env or child_env(), capture_output=True,
                          text=True, timeout=timeout)


def start_cli(args: list[str], nproc: int = 1, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """Like `run_cli` but returns at once, in its own process group so `kill_group` reaches every rank."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(command(nproc) + args, cwd=REPO, env=env or child_env(), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """kill -9 the launcher and all its ranks at once (a node dying)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for_step(keys_file: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> bool:
    """Poll the batch-key log until rank 0 has consumed a batch of `step`; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if keys_file.is_file():
            steps = [json.loads(line)["step"] for line in keys_file.read_text().splitlines() if line.endswith("}")]
            if steps and max(steps) >= step:
                return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise TimeoutError(f"run did not reach step {step} in {timeout}s")


def overrides(manifest: Path, run_dir: Path, *extra: str) -> list[str]:
    return tiny_overrides(manifest, run_dir, "deterministic=true", *extra)


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a resumed run rewrites steps after its checkpoint, the last row wins."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}


def batch_keys(keys_dir: Path, rank: int = 0) -> dict[tuple[int, int], list[str]]:
    """(step, micro) -> keys consumed; after a resume the replayed steps overwrite the lost ones."""
    path = keys_dir / f"keys-rank{rank}.jsonl"
    out = {}
    for line in path.read_text().splitlines():
        if line.endswith("}"):
            row = json.loads(line)
            out[(row["step"], row["micro"])] = row["keys"]
    return out

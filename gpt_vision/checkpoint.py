"""Checkpoint directories: step folders with a commit marker, an atomic `latest`, pruning, resume state.

A step folder is trusted only once `COMMITTED` exists; it is written last, by rank 0, after
every rank has finished its shards. Anything without it (a crash, a kill, a full disk) is
ignored by `latest_complete` and never pruned in favour of it.
"""
from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt_vision.errors import ConfigError, UserError
from gpt_vision.layout import (
    CHECKPOINTS_DIR,
    COMMIT_MARKER,
    LATEST_FILE,
    META_FILE,
    complete_steps,
    is_complete,
    latest_complete,
    rank_file_name,
    read_json,
    read_meta,
    step_dir_name,
    write_atomic,
)

@dataclass
class CheckpointConfig:
    every: int = 1000
    keep_last: int = 3
    # auto: continue from the newest complete step if there is one; never: refuse an existing
    # run directory; otherwise a step directory or run directory to start from.
    resume: str = "auto"

    def check(self) -> None:
        if self.every <= 0:
            raise ConfigError("every", f"must be positive, got {self.every}")
        if self.keep_last < 1:
            raise ConfigError("keep_last", f"must be >= 1 (the newest complete step is always kept), got {self.keep_last}")


def _test_kill_point(point: str, rank: int, step: int) -> None:
    """Reliability-drill hook: `GPTV_TEST_KILL_IN_SAVE=<point>:<rank>[:<step>]` SIGKILLs this
    process at that named point of `save`/`prune` (points: shards, rank_state, meta, marker,
    latest, prune), to prove a save killed anywhere never yields a loadable partial step."""
    wanted = os.environ.get("GPTV_TEST_KILL_IN_SAVE")
    if wanted and wanted in (f"{point}:{rank}", f"{point}:{rank}:{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    """This process's RNG states, JSON-safe (no pickle in checkpoints)."""
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": repr(random.getstate()),
        "numpy": base64.b64encode(np.random.get_state()[1].astype(np.uint32).tobytes()).decode(),
        "numpy_pos": int(np.random.get_state()[2]),
        "numpy_gauss": [int(np.random.get_state()[3]), float(np.random.get_state()[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    decoded = _decode_rng(state)
    torch.set_rng_state(decoded["torch"])
    random.setstate(decoded["python"])
    np.random.set_state(decoded["numpy"])
    if "cuda" in decoded and torch.cuda.is_available():
        torch.cuda.set_rng_state(decoded["cuda"])


def _decode_rng(state: dict) -> dict:
    """`rng_state()`'s output back as the generators' own types, each checked for its size."""
    def state_bytes(key: str, like: torch.Tensor) -> torch.Tensor:
        raw = base64.b64decode(state[key], validate=True)
        if len(raw) != like.numel():
            raise ValueError(f"'{key}' state has {len(raw)} bytes, expected {like.numel()}")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    decoded = {"torch": state_bytes("torch", torch.get_rng_state())}
    version, internal, gauss = _parse_python_state(state["python"])
    if len(internal) != len(random.getstate()[1]):
        raise ValueError(f"'python' state has {len(internal)} words, expected {len(random.getstate()[1])}")
    decoded["python"] = (version, internal, gauss)
    keys = np.frombuffer(base64.b64decode(state["numpy"], validate=True), dtype=np.uint32)
    if keys.size != np.random.get_state()[1].size:
        raise ValueError(f"'numpy' state has {keys.size} words, expected {np.random.get_state()[1].size}")
    has_gauss, numpy_gauss = state["numpy_gauss"]
    decoded["numpy"] = ("MT19937", keys, int(state["numpy_pos"]), int(has_gauss), float(numpy_gauss))
    if "cuda" in state and torch.cuda.is_available():
        decoded["cuda"] = state_bytes("cuda", torch.cuda.get_rng_state())
    return decoded


def _parse_python_state(text: str) -> tuple:
    """Parse `repr(random.getstate())` without eval: (int, tuple of ints, None|float)."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?|None", text)
    version = int(numbers[0])
    gauss_text = numbers[-1]
    internal = tuple(int(n) for n in numbers[1:-1])
    gauss = None if gauss_text == "None" else float(gauss_text)
    return version, internal, gauss


class CheckpointManager:
    """Saves and finds step folders under `<run_dir>/checkpoints` for one training run.

    `save` is a collective: every rank calls it; the strategy writes its native shards,
    each rank its own small JSON (data position, RNG), then rank 0 commits.
    """

    def __init__(self, run_dir: Path, cfg: CheckpointConfig, strategy):
        self.root = Path(run_dir) / CHECKPOINTS_DIR
        self.cfg = cfg
        self.strategy = strategy

    def due(self, step: int) -> bool:
        """Whether the loop saves after `step` on its regular cadence (`checkpoint.every`)."""
        return step % self.cfg.every == 0

    def save(self, step: int, meta: dict, rank_state: dict, files: dict[str, bytes] | None = None) -> Path:
        """Write step `step`; `files` (e.g. the palette) are written by rank 0 beside the shards."""
        strategy = self.strategy
        step_dir = self.root / step_dir_name(step)
        if strategy.rank == 0:
            if step_dir.exists() and not is_complete(step_dir):
                shutil.rmtree(step_dir)  # a stale partial save of this same step
            step_dir.mkdir(parents=True, exist_ok=True)
        strategy.barrier()
        started = time.perf_counter()
        if is_complete(step_dir):
            return step_dir
        with self._storage_errors(step_dir):
            self._write(step, step_dir, meta, rank_state, files, started)
        strategy.barrier()
        return step_dir

    @contextlib.contextmanager
    def _storage_errors(self, step_dir: Path):
        """A full disk or an I/O error while saving becomes one line; the step stays uncommitted."""
        try:
            yield
        except Exception as error:
            cause = _storage_cause(error) or _full_disk(step_dir)
            if cause is None:
                raise
            previous = self.latest()
            raise UserError(
                f"cannot write checkpoint {step_dir}: {cause}; it stays incomplete "
                f"and is ignored; newest complete checkpoint: {previous or 'none'}"
            ) from None

    def _write(self, step: int, step_dir: Path, meta: dict, rank_state: dict, files: dict[str, bytes] | None,
               started: float) -> None:
        strategy = self.strategy
        strategy.save(step_dir)
        _test_kill_point("shards", strategy.rank, step)
        write_atomic(step_dir / rank_file_name(strategy.rank), json.dumps(rank_state))
        _test_kill_point("rank_state", strategy.rank, step)
        strategy.barrier()
        if strategy.rank == 0:
            for name, data in (files or {}).items():
                write_atomic(step_dir / name, data)
            full_meta = dict(meta, step=step, world_size=strategy.world_size, strategy=strategy.name,
                             save_seconds=round(time.perf_counter() - started, 3))
            write_atomic(step_dir / META_FILE, json.dumps(full_meta, indent=1))
            _test_kill_point("meta", strategy.rank, step)
            write_atomic(step_dir / COMMIT_MARKER, f"{step}\n")
            _test_kill_point("marker", strategy.rank, step)
            write_atomic(self.root / LATEST_FILE, step_dir.name + "\n")
            _test_kill_point("latest", strategy.rank, step)
            self.prune(step)

    def prune(self, step: int = -1) -> None:
        """Delete complete steps beyond `keep_last`; un-commit first so a kill mid-delete is harmless."""
        for old in complete_steps(self.root)[: -self.cfg.keep_last]:
            (old / COMMIT_MARKER).unlink()
            _test_kill_point("prune", self.strategy.rank, step)
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        return latest_complete(self.root)

    def load_rank_state(self, step_dir: Path) -> tuple[dict, dict | None]:
        """meta.json and this rank's own state (None when the saved world size differs)."""
        meta = read_meta(step_dir)
        rank_file = step_dir / rank_file_name(self.strategy.rank)
        if meta.get("world_size") == self.strategy.world_size and rank_file.is_file():
            return meta, read_rank_state(rank_file)
        fallback = step_dir / rank_file_name(0)
        return meta, (read_rank_state(fallback) | {"foreign_world_size": True}) if fallback.is_file() else None


def _storage_cause(error: Exception) -> str | None:
    """The storage's reason when `error` is a failed write (full disk, I/O error), else None: an
    OSError (our writers name the file; strategies raise their backend's storage failures as one)."""
    if isinstance(error, OSError):
        return f"{error.strerror or error} ({error.filename})" if error.filename else (error.strerror or str(error))
    return None


def _full_disk(step_dir: Path) -> str | None:
    """For writers that hide the OS's error (DeepSpeed's torch.save: "unexpected pos ..."): under 1 MiB free."""
    try:
        stats = os.statvfs(step_dir)
        return os.strerror(errno.ENOSPC) if stats.f_bavail * stats.f_frsize < 1 << 20 else None
    except OSError:
        return None


def read_rank_state(path: Path) -> dict:
    """A rank's data position and RNG states, checked whole before anything is restored."""
    state = read_json(path, "rank state")
    for key in ("data", "rng"):
        if not isinstance(state.get(key), dict):
            raise UserError(f"{path}: damaged rank state (no '{key}' object); restore it or resume from another step")
    try:
        _decode_rng(state["rng"])
    except (IndexError, KeyError, TypeError, ValueError) as error:
        detail = f"no {error} entry" if isinstance(error, KeyError) else str(error)
        raise UserError(f"{path}: damaged RNG state ({detail}); restore it or resume from another step") from None
    return state

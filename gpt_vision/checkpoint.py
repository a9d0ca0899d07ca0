"""Checkpoint directories: step folders with a commit marker, an atomic `latest`, pruning, export.

A step folder is trusted only once `COMMITTED` exists; it is written last, by rank 0, after
every rank has finished its shards. Anything without it (a crash, a kill, a full disk) is
ignored by `latest_complete` and never pruned in favour of it.
"""
from __future__ import annotations

import base64
import contextlib
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

COMMIT_MARKER = "COMMITTED"
META_FILE = "meta.json"
LATEST_FILE = "latest"
STEP_RE = re.compile(r"^step-(\d{7,})$")


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


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary sibling, fsync, then rename over `path`: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def is_complete(step_dir: Path) -> bool:
    return (step_dir / COMMIT_MARKER).is_file() and (step_dir / META_FILE).is_file()


def complete_steps(checkpoints: Path) -> list[Path]:
    """Complete step folders, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = []
    for child in checkpoints.iterdir():
        match = STEP_RE.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_complete(checkpoints: Path) -> Path | None:
    """The newest complete step; `latest` is a hint for users, the commit markers decide."""
    steps = complete_steps(checkpoints)
    return steps[-1] if steps else None


def read_meta(step_dir: Path) -> dict:
    try:
        return json.loads((step_dir / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {step_dir}: cannot read {META_FILE}: {exc}") from None


def resolve_step_dir(path: str | Path) -> Path:
    """A step folder, a run folder (its newest complete step) or a checkpoints folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint path {path} does not exist")
    if STEP_RE.match(path.name):
        if not is_complete(path):
            raise UserError(f"checkpoint {path} is incomplete (no {COMMIT_MARKER} marker): the save did not finish")
        return path
    for checkpoints in (path / "checkpoints", path):
        found = latest_complete(checkpoints)
        if found is not None:
            return found
    raise UserError(f"{path} holds no complete checkpoint (expected step-NNNNNNN folders with {COMMIT_MARKER})")


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
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    version, internal, gauss = _parse_python_state(state["python"])
    random.setstate((version, internal, gauss))
    keys = np.frombuffer(base64.b64decode(state["numpy"]), dtype=np.uint32)
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, state["numpy_pos"], has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


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
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.strategy = strategy

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
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if not isinstance(error, OSError) and "os error" not in text.lower():
                raise
            previous = self.latest()
            raise UserError(
                f"cannot write checkpoint {step_dir}: {getattr(error, 'strerror', None) or text}; it stays incomplete "
                f"and is ignored; newest complete checkpoint: {previous or 'none'}"
            ) from None

    def _write(self, step: int, step_dir: Path, meta: dict, rank_state: dict, files: dict[str, bytes] | None,
               started: float) -> None:
        strategy = self.strategy
        strategy.save(step_dir)
        _test_kill_point("shards", strategy.rank, step)
        write_atomic(step_dir / f"rank-{strategy.rank:05d}.json", json.dumps(rank_state))
        _test_kill_point("rank_state", strategy.rank, step)
        strategy.barrier()
        if strategy.rank == 0:
            for name, data in (files or {}).items():
                write_atomic(step_dir / name, data)
            full_meta = dict(meta, step=step, world_size=strategy.world_size, strategy=strategy.name,
                             save_seconds=round(time.perf_counter() - started, 3))
            write_atomic(step_dir / META_FILE, json.dumps(full_meta, indent=1))
            _fsync_dir(step_dir)
            _test_kill_point("meta", strategy.rank, step)
            write_atomic(step_dir / COMMIT_MARKER, f"{step}\n")
            _fsync_dir(step_dir)
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
        rank_file = step_dir / f"rank-{self.strategy.rank:05d}.json"
        same_world = meta.get("world_size") == self.strategy.world_size
        if same_world and rank_file.is_file():
            return meta, json.loads(rank_file.read_text())
        fallback = step_dir / "rank-00000.json"
        return meta, (json.loads(fallback.read_text()) | {"foreign_world_size": True}) if fallback.is_file() else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Rank-0 reporting: TensorBoard scalars and images, a JSONL file for scripts, a tqdm bar."""
from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from gpt_vision.errors import UserError
from gpt_vision.layout import METRICS_FILE, TENSORBOARD_DIR
from gpt_vision.train.config import LoggingConfig


class JsonlFile:
    """Appends one record per line, each with a single `write` of the whole line: a reader (or a
    crash, or a full disk) never leaves half a record; a failed write is cut back off the file."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def append(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        start = os.fstat(self.fd).st_size
        try:
            written = os.write(self.fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            os.ftruncate(self.fd, start)
            raise UserError(f"cannot write {self.path}: {error.strerror}; it ends with the last complete record; "
                            "free space (or set logging.jsonl=false) and resume") from None

    def close(self) -> None:
        os.close(self.fd)


class MetricsLogger:
    """Writes nothing on ranks other than 0, so callers need no rank checks."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        self.bar = None
        if not enabled:
            return
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step or None)
        if cfg.jsonl:
            self.jsonl = JsonlFile(Path(run_dir) / METRICS_FILE)
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        if self.jsonl is not None:
            self.jsonl.append({"step": step, "split": prefix, "time": round(time.time(), 3), **values})

    def image_grid(self, step: int, tag: str, grid_hwc: np.ndarray) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, grid_hwc, step, dataformats="HWC")

    def advance(self, steps: int, postfix: dict[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.bar is not None:
            self.bar.close()


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.5) -> float:
    """Achieved FLOP/s of a square matmul: the MFU denominator when no peak is configured."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    _sync(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bytes(device: torch.device) -> float:
    """Peak accelerator memory, or this process's resident set size on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/statm") as handle:
            return float(int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        return 0.0


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> one [rows*H, columns*W, C] grid with 2-pixel gutters."""
    n, h, w, c = images.shape
    rows = (n + columns - 1) // columns
    grid = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = image
    return grid

"""On-disk layouts: the file names of run, step, export, fine-tune and HF folders, which kind a
folder is (`kind_of`), what an `init=` path resolves to, and the one atomic writer.

Run folder:      config.yaml, palette.npy, metrics.jsonl, tensorboard/, checkpoints/
checkpoints/:    step-NNNNNNN/ ..., latest (a hint for users; the commit markers decide)
Step folder:     meta.json, rank-NNNNN.json, palette.npy, the strategy's files (model.safetensors +
                 optimizer.pt, DCP's .metadata + *.distcp, or deepspeed/), COMMITTED (written last)
Export folder:   model.safetensors, config.yaml (model + source step), palette.npy
Fine-tune output: model.safetensors, classifier.yaml, palette.npy, config.yaml, results.json
HF ImageGPT:     config.json + model.safetensors | model.safetensors.index.json | pytorch_model.bin

Every file we write goes through `atomic_path` / `atomic_file` / `write_atomic` / `atomic_dir`:
a temporary sibling, fsynced, renamed over the target, the folder fsynced; readers never see half
a file and modes follow the umask like every other file the user creates.
"""
from __future__ import annotations

import contextlib
import enum
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from gpt_vision.errors import UserError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
META_FILE = "meta.json"
COMMIT_MARKER = "COMMITTED"
LATEST_FILE = "latest"
PALETTE_FILE = "palette.npy"
CONFIG_FILE = "config.yaml"
CLASSIFIER_FILE = "classifier.yaml"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
DCP_METADATA_FILE = ".metadata"
HF_CONFIG_FILE = "config.json"
HF_INDEX_FILE = "model.safetensors.index.json"
HF_LEGACY_FILE = "pytorch_model.bin"
STEP_RE = re.compile(r"^step-(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.json"


class Kind(enum.Enum):
    RUN = "run"
    CHECKPOINTS = "checkpoints"
    STEP = "step"
    EXPORT = "export"
    FINETUNED = "finetune output"
    HF = "HF ImageGPT"


def kind_of(path: str | Path) -> Kind | None:
    """What `path` is, from its name and the files it holds; None for anything else.

    Step folders are recognised first: single/ddp/fairscale steps also hold model.safetensors,
    so looking for weights alone would take them for exports.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    if STEP_RE.match(path.name) or (path / META_FILE).is_file() and (path / COMMIT_MARKER).is_file():
        return Kind.STEP
    if (path / CHECKPOINTS_DIR).is_dir():
        return Kind.RUN
    if path.name == CHECKPOINTS_DIR or (path / LATEST_FILE).is_file() or any(
            STEP_RE.match(child.name) for child in path.iterdir()):
        return Kind.CHECKPOINTS
    if (path / HF_CONFIG_FILE).is_file() and any((path / name).is_file() for name in (MODEL_FILE, HF_INDEX_FILE, HF_LEGACY_FILE)):
        return Kind.HF
    if (path / MODEL_FILE).is_file() and (path / CLASSIFIER_FILE).is_file():
        return Kind.FINETUNED
    if (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file():
        return Kind.EXPORT
    return None


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


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or one UserError naming the file (missing, damaged, not an object)."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what}: {exc.strerror}") from None
    except ValueError as exc:
        raise UserError(f"{path}: damaged {what} (not valid JSON: {exc}); restore it or use another checkpoint") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: damaged {what} (expected a JSON object, found {type(doc).__name__})")
    return doc


def read_meta(step_dir: Path) -> dict:
    return read_json(Path(step_dir) / META_FILE, "checkpoint metadata")


def resolve_step_dir(path: str | Path) -> Path:
    """A step folder, a run folder or a checkpoints folder -> a complete step folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint path {path} does not exist")
    kind = kind_of(path)
    if kind is Kind.STEP:
        if not is_complete(path):
            raise UserError(f"checkpoint {path} is incomplete (no {COMMIT_MARKER} marker): the save did not finish")
        return path
    found = latest_complete(path / CHECKPOINTS_DIR if kind is Kind.RUN else path)
    if found is None:
        raise UserError(f"{path} holds no complete checkpoint (expected step-NNNNNNN folders with {COMMIT_MARKER})")
    return found


@dataclass(frozen=True)
class Init:
    """What an `init=` path resolved to. `path` holds the weights (the step folder for runs)."""

    kind: Kind
    path: Path
    run_dir: Path | None = None  # the run a step belongs to, when it sits in <run>/checkpoints/


def resolve_init(init: str | Path) -> Init:
    """A run (its newest complete step), a checkpoints folder, a step, an export or an HF folder."""
    path = Path(init)
    if not path.exists():
        raise UserError(f"init path {path} does not exist")
    kind = kind_of(path)
    if kind in (Kind.EXPORT, Kind.HF):
        return Init(kind, path)
    if kind is Kind.FINETUNED:
        raise UserError(f"{path} is a fine-tune output; init takes a run, step, export or HF ImageGPT folder")
    step_dir = resolve_step_dir(path)
    checkpoints = step_dir.parent
    run_dir = checkpoints.parent if checkpoints.name == CHECKPOINTS_DIR else None
    return Init(Kind.STEP, step_dir, run_dir)


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _finish(path: Path) -> None:
    """Give a written file the mode the user's umask asks for (some writers, safetensors among
    them, create 0600 files) and fsync it."""
    os.chmod(path, 0o666 & ~_umask())
    _fsync(path)


def _storage_error(error: BaseException, path: Path) -> OSError | None:
    """`error` as an OSError naming `path` when the storage failed (safetensors only says
    "... (os error 28)"); None when it is not a storage failure."""
    if isinstance(error, OSError):
        if error.filename is None and error.errno is not None:
            return OSError(error.errno, error.strerror or str(error), str(path))
        return error
    code = _OS_ERROR.search(str(error))
    return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) if code else None


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it is fsynced and renamed over
    `path` and the folder fsynced, on failure removed (an existing `path` stays as it was).
    A storage failure comes out as an OSError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _finish(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        storage = _storage_error(error, path)
        if storage is not None and storage is not error:
            raise storage from None
        raise
    _fsync(path.parent)


class _RecordingWriter(io.RawIOBase):
    """A file that remembers its OS error: torch.save hides a failed write behind its own
    RuntimeError ("unexpected pos ..."), and the OS's reason (a full disk) is what users need."""

    def __init__(self, raw):
        self.raw = raw
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def write(self, data) -> int:
        """All of `data`, or an OSError (a raw write may stop short of it when the disk fills)."""
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += self.raw.write(view[done:])
        except OSError as error:
            self.error = error
            raise
        return done


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """`atomic_path` with the temporary file open for binary writing."""
    with atomic_path(path) as tmp, open(tmp, "wb", buffering=0) as raw:
        handle = _RecordingWriter(raw)
        try:
            yield handle
        except Exception:
            if handle.error is not None:
                raise handle.error from None
            raise


def write_atomic(path: str | Path, data: bytes | str) -> None:
    with atomic_file(path) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a staging folder beside `path`; on success its files are fsynced and it replaces
    `path` (absent or empty), on failure it is removed."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        for child in staging.iterdir():
            if child.is_file():
                _finish(child)
        _fsync(staging)
        if path.exists():
            path.rmdir()
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync(path.parent)

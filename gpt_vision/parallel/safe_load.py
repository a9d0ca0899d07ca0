"""Reading checkpoint files without ever running code a file carries.

A checkpoint directory may come from elsewhere (a colleague, a download), and pickle runs any
callable a file names. So every pickle we read goes through an allowlist:

* torch files (`*.pt`): `torch.load(weights_only=True)`, plus the few extra classes a writer
  needs (`allowed`), e.g. DeepSpeed's loss scaler and ZeRO stage enum.
* DCP's `.metadata`: a plain pickle, read by `SafeDCPReader` with an unpickler that resolves only
  the classes DCP metadata is made of (`_DCP_METADATA_GLOBALS`, torch dtypes).
* DCP's non-tensor values (optimizer hyperparameters): `SafeDCPPlanner` reads them weights-only.

Anything else is a `UserError` naming the file and the refused global, raised before any
object from the file is built.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from gpt_vision.errors import UserError
from gpt_vision.layout import DCP_METADATA_FILE

_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+)")

# What `dcp.save` pickles into `.metadata` (torch 2.4-2.13): its own dataclasses, torch.Size,
# the layout helper (maps a name such as "torch.strided" to the layout) and the checkpoint path.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
}


def _refusal(path: Path, error: Exception) -> UserError:
    text = str(error)
    refused = _REFUSED_GLOBAL.search(text)
    if refused:
        why = f"it names the global {refused.group(1)}, which is not allowed in a checkpoint"
    else:
        detail = _UNPICKLER_ERROR.search(text)
        first = (detail.group(1) if detail else text.strip().splitlines()[0] if text.strip() else type(error).__name__)
        why = f"not a weights-only torch file ({first.strip()})"
    return UserError(f"{path}: refused to load: {why}; only tensors and plain data are accepted")


def load_torch_file(path: Path, allowed: Iterable[type] = (), mmap: bool = False) -> Any:
    """`torch.load` of `path` on the CPU, weights only, with the classes in `allowed` permitted.

    `mmap=True` maps tensor storages instead of reading them (cheap checks of big files; it
    needs the zip format every current `torch.save` writes).
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except Exception as error:  # weights_only refuses pickled code; damaged files raise too
        raise _refusal(Path(path), error) from None


def check_torch_files(directory: Path, allowed: Iterable[type] = ()) -> int:
    """Open every `*.pt` under `directory` weights-only (storages mapped, not read).

    For loaders we do not control (DeepSpeed's own), which unpickle with weights_only=False:
    they only get a directory in which every torch file passed this check. Returns the count.
    """
    allowed = list(allowed)
    paths = sorted(p for p in Path(directory).rglob("*.pt") if p.is_file())
    for path in paths:
        load_torch_file(path, allowed, mmap=True)
    return len(paths)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UserError(
            f"{self.path}: refused to load: it names the global {module}.{name}, which DCP metadata never holds"
        )


def read_dcp_metadata(path: Path) -> Metadata:
    """DCP's `.metadata` through the allowlist, checked to be DCP metadata at all."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} is missing: not a checkpoint written by the fsdp strategy") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), Path(path)).load()
    except UserError:
        raise
    except Exception as error:  # truncated or foreign bytes: pickle raises many types
        detail = " ".join(str(error).split())
        raise UserError(f"{path}: not a readable DCP metadata file ({type(error).__name__}: {detail})") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeDCPReader(dcp.FileSystemReader):
    """`FileSystemReader` whose metadata comes from `read_dcp_metadata`, parsed once and kept.

    Tensor data DCP already reads weights-only. The storage paths the metadata names must stay
    inside the checkpoint directory.
    """

    def __init__(self, directory: Path):
        super().__init__(str(directory))
        self.directory = Path(directory)
        self._metadata: Metadata | None = None

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP must not fall back to per-rank files
        if self._metadata is None:
            path = self.directory / DCP_METADATA_FILE
            metadata = read_dcp_metadata(path)
            root = self.directory.resolve()
            ends: dict[Path, int] = {}
            for info in (metadata.storage_data or {}).values():
                target = (root / str(info.relative_path)).resolve()
                if target.parent != root:
                    raise UserError(f"{path}: refused to load: it points at {info.relative_path}, outside {self.directory}")
                ends[target] = max(ends.get(target, 0), info.offset + info.length)
            for target, end in sorted(ends.items()):
                size = target.stat().st_size if target.is_file() else None
                if size is None or size < end:
                    have = "is missing" if size is None else f"holds {size} bytes"
                    raise UserError(f"{self.directory / target.name}: damaged checkpoint shard ({have}, {path.name} "
                                    f"expects at least {end}); restore it or use another step")
            self._metadata = metadata
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class SafeDCPPlanner(dcp.DefaultLoadPlanner):
    """`DefaultLoadPlanner` that unpickles non-tensor values weights-only (DCP's own does not)."""

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = Path(directory)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        where = self.metadata.storage_data[read_item.storage_index].relative_path
        try:
            loaded = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as error:  # weights_only refuses pickled code
            raise _refusal(self.directory / f"{where} (value {fqn})", error) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def dcp_load(state: dict[str, Any], directory: Path, no_dist: bool = False) -> None:
    """`dcp.load` of `directory` into `state` through the safe reader and planner.

    The metadata is read (and refused, if it must be, as are shards shorter than it says) before
    DCP starts, so every rank raises the same `UserError` without entering a collective; a
    refusal or a damaged file met inside DCP reaches every rank as a `CheckpointException`,
    turned into one `UserError`.
    """
    reader = SafeDCPReader(directory)
    reader.read_metadata()
    try:
        dcp.load(state, storage_reader=reader, planner=SafeDCPPlanner(directory), no_dist=no_dist)
    except CheckpointException as error:
        causes = [exc for exc, _ in error.failures.values()]
        refusals = [exc for exc in causes if isinstance(exc, UserError)]
        if refusals:
            raise UserError(str(refusals[0])) from None
        detail = " ".join(str(causes[0]).split())[:300] if causes else "no detail"
        raise UserError(f"{directory}: damaged DCP checkpoint ({type(causes[0]).__name__ if causes else 'error'}: "
                        f"{detail}); restore it or use another step") from None

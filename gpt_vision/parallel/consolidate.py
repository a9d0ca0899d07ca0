"""Offline readers: a strategy's checkpoint directory -> the full fp32 model state, one process.

No process group is needed, and the world size that wrote the directory does not matter.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from gpt_vision.errors import UserError
from gpt_vision.parallel import common

_MODEL_PREFIX = "model."


def consolidate_full_files(directory: Path) -> dict[str, torch.Tensor]:
    """single / ddp / fairscale: the model file already holds the full state."""
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in common.read_model_file(directory).items()}


def consolidate_dcp(directory: Path) -> dict[str, torch.Tensor]:
    """fsdp: allocate every `model.*` tensor from the DCP metadata, then let DCP fill them."""
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise UserError(f"{directory} has no DCP .metadata: not a checkpoint written by the fsdp strategy")
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    model = {}
    for key, entry in metadata.state_dict_metadata.items():
        if key.startswith(_MODEL_PREFIX) and isinstance(entry, TensorStorageMetadata):
            model[key[len(_MODEL_PREFIX):]] = torch.empty(entry.size, dtype=entry.properties.dtype)
    if not model:
        raise UserError(f"{directory}: the DCP checkpoint holds no model tensors")
    with warnings.catch_warnings():  # DCP warns that no process group exists: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model}, checkpoint_id=str(directory), no_dist=True)
    return {common.clean_key(k): v.to(torch.float32) if v.is_floating_point() else v for k, v in model.items()}

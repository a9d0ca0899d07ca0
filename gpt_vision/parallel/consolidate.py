"""Offline readers: a strategy's checkpoint directory -> the full fp32 model state, one process.

No process group is needed, and the world size that wrote the directory does not matter.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from gpt_vision.errors import UserError
from gpt_vision.layout import DCP_METADATA_FILE
from gpt_vision.parallel import common, safe_load

_MODEL_PREFIX = "model."


def consolidate_full_files(directory: Path) -> dict[str, torch.Tensor]:
    """single / ddp / fairscale: the model file already holds the full state."""
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in common.read_model_file(directory).items()}


def consolidate_dcp(directory: Path) -> dict[str, torch.Tensor]:
    """fsdp: allocate every `model.*` tensor from the DCP metadata, then let DCP fill them."""
    directory = Path(directory)
    metadata = safe_load.read_dcp_metadata(directory / DCP_METADATA_FILE)
    model = {}
    for key, entry in metadata.state_dict_metadata.items():
        if key.startswith(_MODEL_PREFIX) and isinstance(entry, TensorStorageMetadata):
            model[key[len(_MODEL_PREFIX):]] = torch.empty(entry.size, dtype=entry.properties.dtype)
    if not model:
        raise UserError(f"{directory}: the DCP checkpoint holds no model tensors")
    with warnings.catch_warnings():  # DCP warns that no process group exists: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        safe_load.dcp_load({"model": model}, directory, no_dist=True)
    return {common.clean_key(k): v.to(torch.float32) if v.is_floating_point() else v for k, v in model.items()}

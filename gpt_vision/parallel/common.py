"""Plain (unsharded) checkpoint files of the single/ddp/fairscale strategies and state-dict key cleanup."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gpt_vision.errors import UserError
from gpt_vision.layout import MODEL_FILE, OPTIMIZER_FILE, atomic_file, atomic_path
from gpt_vision.parallel.safe_load import load_torch_file

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def clean_key(key: str) -> str:
    """State-dict key without the prefixes torch.compile and DDP-like wrappers add."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
        key = key.replace("._orig_mod.", ".")
    return key


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copy of `model.state_dict()` with wrapper prefixes removed."""
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if value.is_floating_point():
            value = value.to(torch.float32)
        out[clean_key(key)] = value.to("cpu", copy=True)
    return out


def write_full_files(directory: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """`model.safetensors` + `optimizer.pt`, each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / MODEL_FILE) as tmp:
        # safetensors refuses tensors sharing storage (tied weights); plain_state_dict copied each.
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp))
    with atomic_file(directory / OPTIMIZER_FILE) as handle:
        torch.save(optimizer_state, handle)


def read_model_file(directory: Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: not a checkpoint written by the single/ddp/fairscale strategies")
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors reports a damaged or foreign file with its own error types
        raise UserError(f"{path} is not a readable safetensors file: {error}") from None


def read_optimizer_file(directory: Path) -> dict:
    path = Path(directory) / OPTIMIZER_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: the checkpoint has no optimizer state")
    return load_torch_file(path)


def load_model_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load `state` into `model`, naming the checkpoint when keys or shapes disagree."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()
        raise UserError(f"{source}: model weights do not fit this model: {' '.join(first_line[:3])}") from None

"""One-process access to trained weights, whatever strategy and world size wrote them.

`export_checkpoint` turns a step folder into `model.safetensors` + `config.yaml` + `palette.npy`;
`load_pretrained` reads a step folder, a run folder, such an export, or a local HF ImageGPT
folder, and returns the model with its palette (the fine-tune entry point's `init`).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from gpt_vision import checkpoint as ckpt
from gpt_vision.config import build
from gpt_vision.data.palette import Palette
from gpt_vision.errors import UserError
from gpt_vision.model import ModelConfig, build_model
from gpt_vision.model.gpt import GPT
from gpt_vision.parallel import load_consolidated

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
PALETTE_FILE = "palette.npy"


@dataclass
class Pretrained:
    model: GPT
    palette: Palette | None
    source: str  # what `init` resolved to, for logs and results


def consolidated_state(step_dir: Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    meta = ckpt.read_meta(step_dir)
    if "model" not in meta or "strategy" not in meta:
        raise UserError(f"checkpoint {step_dir}: meta.json lacks the model config or strategy")
    model_cfg = build(ModelConfig, meta["model"])
    return load_consolidated(step_dir, meta["strategy"]), model_cfg


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write an export into `out` (created; an existing non-empty folder is refused)."""
    step_dir = ckpt.resolve_step_dir(checkpoint)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export folder {out} exists and is not empty; choose another")
    state, model_cfg = consolidated_state(step_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / WEIGHTS_FILE),
                  metadata={"source": str(step_dir), "step": str(ckpt.read_meta(step_dir)["step"])})
        (staging / CONFIG_FILE).write_text(yaml.safe_dump({"model": dataclasses.asdict(model_cfg)}, sort_keys=False))
        if (step_dir / PALETTE_FILE).is_file():
            shutil.copyfile(step_dir / PALETTE_FILE, staging / PALETTE_FILE)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _model_from(state: dict[str, torch.Tensor], model_cfg: ModelConfig, where: str) -> GPT:
    model = build_model(model_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{where}: weights do not fit the model config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def load_pretrained(init: str | Path) -> Pretrained:
    """Resolve `init` (step dir, run dir, export, HF ImageGPT dir) to a model on CPU, fp32."""
    path = Path(init)
    if not path.exists():
        raise UserError(f"init path {path} does not exist")
    if (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file():
        doc = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
        if "model" not in doc:
            raise UserError(f"{path / CONFIG_FILE} has no 'model' section: not a gpt_vision export")
        model_cfg = build(ModelConfig, doc["model"], prefix="model")
        model = _model_from(load_file(str(path / WEIGHTS_FILE)), model_cfg, str(path))
        palette = Palette.load(path / PALETTE_FILE) if (path / PALETTE_FILE).is_file() else None
        return Pretrained(model, palette, f"export {path}")
    if (path / "config.json").is_file() and ((path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file()):
        from gpt_vision.interop.hf_imagegpt import import_hf_imagegpt

        return Pretrained(import_hf_imagegpt(path), None, f"hf {path}")
    step_dir = ckpt.resolve_step_dir(path)
    state, model_cfg = consolidated_state(step_dir)
    palette = Palette.load(step_dir / PALETTE_FILE) if (step_dir / PALETTE_FILE).is_file() else None
    return Pretrained(_model_from(state, model_cfg, str(step_dir)), palette, f"checkpoint {step_dir}")

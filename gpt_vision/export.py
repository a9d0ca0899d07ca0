"""One-process access to trained weights, whatever strategy and world size wrote them.

`export_checkpoint` turns a step folder into `model.safetensors` + `config.yaml` + `palette.npy`;
`load_pretrained` reads a step folder, a run folder, such an export, or a local HF ImageGPT
folder, and returns the model with its palette (the fine-tune entry point's `init`). Both check
the model config against the weights' shapes before writing or building anything.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gpt_vision import layout
from gpt_vision.config_loader import build
from gpt_vision.data.palette import Palette
from gpt_vision.errors import ConfigError, UserError
from gpt_vision.layout import CONFIG_FILE, Kind, META_FILE, MODEL_FILE, PALETTE_FILE
from gpt_vision.model import ModelConfig, build_model
from gpt_vision.model.gpt import GPT
from gpt_vision.model.shapes import check_weights_fit
from gpt_vision.parallel import load_consolidated

EXPORT_KEYS = ("model", "source")  # config.yaml: the model section, and the step it came from


@dataclass
class Pretrained:
    model: GPT
    palette: Palette | None
    source: str  # what `init` resolved to, for logs and results


def model_config(values, where: Path) -> ModelConfig:
    """A saved 'model' section (meta.json, config.yaml, classifier.yaml) as a checked ModelConfig."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: no 'model' section (a mapping); not a gpt_vision checkpoint or export")
    try:
        return build(ModelConfig, values, prefix="model")
    except ConfigError as error:
        raise UserError(f"{where}: {error}") from None


def consolidated_state(step_dir: Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """The step's full fp32 state, its model config (checked against the state) and meta.json."""
    meta = layout.read_meta(step_dir)
    if not isinstance(meta.get("strategy"), str) or not isinstance(meta.get("step"), int):
        raise UserError(f"{step_dir / META_FILE}: damaged checkpoint metadata (no 'strategy' or 'step')")
    model_cfg = model_config(meta.get("model"), step_dir / META_FILE)
    state = load_consolidated(step_dir, meta["strategy"])
    check_weights_fit({k: tuple(v.shape) for k, v in state.items()}, model_cfg, str(step_dir / META_FILE), str(step_dir))
    return state, model_cfg, meta


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write an export into `out` (created; an existing non-empty folder is refused); its
    config.yaml records the step folder and step it came from (`source`)."""
    step_dir = layout.resolve_step_dir(checkpoint)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export folder {out} exists and is not empty; choose another")
    state, model_cfg, meta = consolidated_state(step_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = {"checkpoint": str(step_dir.resolve()), "step": meta["step"]}
    with layout.atomic_dir(out) as staging:
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / MODEL_FILE),
                  metadata={k: str(v) for k, v in source.items()})
        doc = {"model": dataclasses.asdict(model_cfg), "source": source}
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))
        if (step_dir / PALETTE_FILE).is_file():
            (staging / PALETTE_FILE).write_bytes((step_dir / PALETTE_FILE).read_bytes())
    return out


def export_source(path: Path) -> dict:
    """The `source` an export records: {'checkpoint': step folder, 'step': N}."""
    return yaml.safe_load((Path(path) / CONFIG_FILE).read_text())["source"]


def read_yaml_mapping(file: Path, known_keys: tuple[str, ...] | None = None) -> dict:
    """A saved YAML mapping (an export's config.yaml, a classifier.yaml); bad YAML, and keys
    outside `known_keys` when given, are refused in one line naming the file."""
    try:
        doc = yaml.safe_load(file.read_text())
    except OSError as error:
        raise UserError(f"{file}: cannot read it: {error.strerror}") from None
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0] if str(error) else "invalid YAML"
        raise UserError(f"{file} is not valid YAML ({first}); write it again (re-export, re-train)") from None
    if not isinstance(doc, dict):
        raise UserError(f"{file}: expected a mapping; write it again (re-export, re-train)")
    unknown = sorted(set(doc) - set(known_keys or doc))
    if unknown:
        raise UserError(f"{file}: unknown key '{unknown[0]}' (known: {', '.join(known_keys)})")
    return doc


def weight_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the tensors."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors reports a damaged or foreign file with its own error types
        raise UserError(f"{file} is not a readable safetensors file: {error}") from None


def _model_from(state: dict[str, torch.Tensor], model_cfg: ModelConfig) -> GPT:
    model = build_model(model_cfg)
    model.load_state_dict(state, strict=True)
    return model


def load_pretrained(init: str | Path) -> Pretrained:
    """Resolve `init` (step dir, run dir, export, HF ImageGPT dir) to a model on CPU, fp32."""
    found = layout.resolve_init(init)
    path = found.path
    if found.kind is Kind.HF:
        from gpt_vision.interop.hf_imagegpt import import_hf_imagegpt

        return Pretrained(import_hf_imagegpt(path), None, f"hf {path}")
    palette = Palette.load(path / PALETTE_FILE) if (path / PALETTE_FILE).is_file() else None
    if found.kind is Kind.EXPORT:
        model_cfg = model_config(read_yaml_mapping(path / CONFIG_FILE, EXPORT_KEYS).get("model"), path / CONFIG_FILE)
        check_weights_fit(weight_shapes(path / MODEL_FILE), model_cfg, str(path / CONFIG_FILE), str(path / MODEL_FILE))
        return Pretrained(_model_from(load_file(str(path / MODEL_FILE)), model_cfg), palette, f"export {path}")
    state, model_cfg, _ = consolidated_state(path)
    return Pretrained(_model_from(state, model_cfg), palette, f"checkpoint {path}")

"""Import / export HuggingFace ImageGPT (`ImageGPTForCausalImageModeling`) checkpoints.

Works on local directories only (config.json + model.safetensors, a sharded safetensors index, or
pytorch_model.bin read with weights_only=True) and needs no `transformers` install.

Mapping details: HF keeps SOS as the last row of `transformer.wte` (vocab_size = palette + 1) and an
untied `lm_head` of palette rows; its linears are GPT-2 `Conv1D`s whose weights are stored
[in, out], the transpose of ours; its "LayerNorm" is the gain-only RMS norm with eps 1e-5.
"""

import json
import math
import os
import re
from pathlib import Path

import torch

from gpt_vision.errors import UserError
from gpt_vision.layout import HF_CONFIG_FILE, HF_INDEX_FILE, HF_LEGACY_FILE, MODEL_FILE, atomic_path, read_json, write_atomic
from gpt_vision.model.config import ModelConfig
from gpt_vision.model.gpt import GPT, NORM_EPS, build_model
from gpt_vision.model.shapes import check_weights_fit
from gpt_vision.parallel.safe_load import load_torch_file

# HF config values our model reproduces exactly; anything else is refused rather than approximated.
_REQUIRED = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": False,
}
_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu"}
_IGNORED_KEYS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old checkpoints

_BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_BLOCK_KEY = re.compile(r"^transformer\.h\.(\d+)\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)$")
_TOP_LEVEL = {"transformer.wte.weight": "wte.weight", "transformer.wpe.weight": "wpe.weight",
              "transformer.ln_f.weight": "ln_f.weight", "lm_head.weight": "head.weight"}


def _model_config(hf: dict, source: Path) -> ModelConfig:
    def refuse(what: str) -> UserError:
        return UserError(f"{source}: unsupported ImageGPT config: {what}")

    if hf.get("model_type") != "imagegpt":
        raise refuse(f"model_type is {hf.get('model_type')!r}, expected 'imagegpt'")
    for key, value in _REQUIRED.items():
        if hf.get(key, value) != value:
            raise refuse(f"{key}={hf[key]!r} (only {value!r} is supported)")
    n_embd, n_positions = hf.get("n_embd", 512), hf.get("n_positions", 1024)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise refuse(f"n_inner={hf['n_inner']} (only 4 * n_embd = {4 * n_embd} is supported)")
    activation = hf.get("activation_function", "quick_gelu")
    if activation not in _ACTIVATIONS:
        raise refuse(f"activation_function={activation!r} (supported: {', '.join(_ACTIVATIONS)})")
    if not math.isclose(hf.get("layer_norm_epsilon", 1e-5), NORM_EPS):
        raise refuse(f"layer_norm_epsilon={hf['layer_norm_epsilon']} (only {NORM_EPS} is supported)")
    side = math.isqrt(n_positions)
    if side * side != n_positions:
        raise refuse(f"n_positions={n_positions} is not a square image")
    cfg = ModelConfig(
        n_layer=hf.get("n_layer", 24),
        n_embd=n_embd,
        n_head=hf.get("n_head", 8),
        vocab_size=hf.get("vocab_size", 513) - 1,
        image_size=side,
        norm="rms",
        activation=_ACTIVATIONS[activation],
        dropout=float(hf.get("resid_pdrop", 0.1)),
        objective="next_pixel",
    )
    cfg.check()
    return cfg


def _load_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index, legacy = (directory / n for n in (MODEL_FILE, HF_INDEX_FILE, HF_LEGACY_FILE))
    try:
        if single.exists():
            return load_file(single)
        if index.exists():
            shards = sorted(set(read_json(index, "safetensors index").get("weight_map", {}).values()))
            state = {}
            for shard in shards:
                state.update(load_file(directory / shard))
            return state
    except UserError:
        raise
    except Exception as error:  # safetensors reports a damaged or foreign file with its own error types
        raise UserError(f"{directory}: unreadable safetensors weights ({error})") from None
    if legacy.exists():
        return load_torch_file(legacy)
    raise UserError(f"{directory}: no {MODEL_FILE}, {HF_INDEX_FILE} or {HF_LEGACY_FILE}")


def _our_names(hf: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    """HF tensors under our names (linears transposed), as many blocks as the file holds."""
    missing = [key for key in _TOP_LEVEL if key not in hf]
    if missing:
        raise UserError(f"{directory}: the weights lack {', '.join(missing)}")
    wte = hf.pop("transformer.wte.weight")
    state = {"wte.weight": wte[:-1], "sos": wte[-1]}
    state.update({ours: hf.pop(theirs) for theirs, ours in _TOP_LEVEL.items() if ours != "wte.weight"})
    for key in [key for key in hf if _BLOCK_KEY.match(key)]:
        index, part, kind = _BLOCK_KEY.match(key).groups()
        value = hf.pop(key)
        state[f"blocks.{index}.{part}.{kind}"] = value.t() if part in _BLOCK_LINEARS and kind == "weight" else value
    if hf:
        raise UserError(f"{directory}: unsupported ImageGPT weights: {', '.join(sorted(hf)[:5])}")
    return state


def import_hf_imagegpt(directory: str | os.PathLike) -> GPT:
    """A next_pixel GPT (fp32, CPU) with the weights of a local HF ImageGPT directory."""
    directory = Path(directory)
    config_file = directory / HF_CONFIG_FILE
    if not config_file.exists():
        raise UserError(f"{directory}: no {HF_CONFIG_FILE} (expected a HuggingFace ImageGPT directory)")
    cfg = _model_config(read_json(config_file, "HF config"), config_file)
    hf = {k: v for k, v in _load_state(directory).items() if not k.endswith(_IGNORED_KEYS)}
    hf = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v for k, v in hf.items()}
    if "lm_head.weight" not in hf:
        raise UserError(f"{directory}: no lm_head.weight (a bare ImageGPTModel has no head to import)")

    state = _our_names(hf, directory)
    check_weights_fit({k: tuple(v.shape) for k, v in state.items()}, cfg, str(config_file), str(directory))
    model = build_model(cfg)
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True)
    return model


def _hf_config(cfg: ModelConfig) -> dict:
    return {
        "model_type": "imagegpt",
        "architectures": ["ImageGPTForCausalImageModeling"],
        "vocab_size": cfg.vocab_size + 1,
        "n_positions": cfg.seq_len,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": cfg.activation,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": NORM_EPS,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": False,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
    }


def export_hf_imagegpt(model: GPT, directory: str | os.PathLike) -> None:
    """Write config.json + model.safetensors that `ImageGPTForCausalImageModeling.from_pretrained` loads.

    Each file is written atomically, so a failure leaves earlier files intact.
    """
    from safetensors.torch import save_file

    cfg = model.config
    if cfg.objective != "next_pixel" or cfg.norm != "rms":
        raise UserError(f"only next_pixel models with norm=rms map to ImageGPT (this one: {cfg.objective}, {cfg.norm})")
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {
        "transformer.wte.weight": torch.cat([sd["wte.weight"], sd["sos"][None]]),
        "transformer.wpe.weight": sd["wpe.weight"],
        "transformer.ln_f.weight": sd["ln_f.weight"],
        "lm_head.weight": sd["head.weight"],
    }
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            out[f"{dst}{norm}.weight"] = sd[f"{src}{norm}.weight"]
        for linear in _BLOCK_LINEARS:
            out[f"{dst}{linear}.weight"] = sd[f"{src}{linear}.weight"].t()
            out[f"{dst}{linear}.bias"] = sd[f"{src}{linear}.bias"]
    out = {k: v.contiguous() for k, v in out.items()}

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / MODEL_FILE) as tmp:
        save_file(out, tmp, metadata={"format": "pt"})
    write_atomic(directory / HF_CONFIG_FILE, json.dumps(_hf_config(cfg), indent=2) + "\n")

"""The parameter shapes a model config implies, checked against saved weights before a model is
built: a config that contradicts its weights (say a width of 4,000,000 beside 32-wide tensors)
is refused in one line instead of allocating terabytes."""
from __future__ import annotations

import dataclasses
import re

import torch

from gpt_vision.errors import ConfigError, UserError
from gpt_vision.model.config import ModelConfig
from gpt_vision.model.gpt import GPT

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """`state_dict` shapes of the model `cfg` describes, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPT(cfg.resolved())
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_weights_fit(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, config_file: str, weights_file: str) -> None:
    """Refuse (UserError naming both files and the config key) weights of other shapes than `cfg`'s."""
    try:
        cfg.check()
        for key in ("vocab_size", "image_size"):
            if getattr(cfg, key) <= 0:
                raise ConfigError(key, f"must be > 0, got {getattr(cfg, key)}")
    except ConfigError as error:
        raise UserError(f"{config_file}: model.{error.key}: {error.message}") from None
    cfg = cfg.resolved()
    blocks = len({int(m.group(1)) for key in shapes if (m := _BLOCK.match(key))})
    if blocks != cfg.n_layer:  # checked first: a huge n_layer would be slow to build even on meta
        raise UserError(f"{config_file}: model.n_layer={cfg.n_layer} does not fit {weights_file}, which holds {blocks} blocks")
    expected = expected_shapes(cfg)
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        raise UserError(f"{config_file}: the model it describes does not fit {weights_file} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise UserError(f"{config_file}: {_culprits(cfg, shape, tuple(shapes[key]))} does not fit {weights_file}: "
                            f"{key} is {list(shapes[key])} there but {list(shape)} by the config; fix or restore that file")


def _culprits(cfg: ModelConfig, expected: tuple[int, ...], actual: tuple[int, ...]) -> str:
    """The config keys whose values are the dimensions that differ, e.g. 'model.n_embd=4000000'."""
    wrong = {e for e, a in zip(expected, actual) if e != a}
    names = [f"model.{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
             if type(getattr(cfg, f.name)) is int and getattr(cfg, f.name) in wrong]
    return ", ".join(names) if names else "the model config"

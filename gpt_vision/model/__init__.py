"""The generative image transformer: config, presets, model, objectives, FLOP counts."""

from gpt_vision.model.config import ModelConfig
from gpt_vision.model.flops import flops_per_token
from gpt_vision.model.gpt import GPT, build_model
from gpt_vision.model.objectives import bits_per_dim, build_objective, feature_inputs, patchify
from gpt_vision.model.presets import PRESETS

__all__ = [
    "GPT",
    "ModelConfig",
    "PRESETS",
    "build_model",
    "bits_per_dim",
    "build_objective",
    "feature_inputs",
    "flops_per_token",
    "patchify",
]

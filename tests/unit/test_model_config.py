"""ModelConfig resolution/validation, the preset registry and the parameter/FLOP counts."""

import pytest
import torch

from gpt_vision.errors import ConfigError
from gpt_vision.model import PRESETS, GPT, ModelConfig, build_model, flops_per_token
from gpt_vision.model.flops import non_embedding_parameters


def test_preset_fills_only_unset_fields():
    cfg = ModelConfig(preset="igpt-s", n_layer=2).resolved()
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (2, 512, 8)


def test_unknown_preset_lists_known_names():
    with pytest.raises(ConfigError) as err:
        ModelConfig(preset="igpt-huge").resolved()
    assert err.value.key == "preset"
    assert all(name in str(err.value) for name in PRESETS)


@pytest.mark.parametrize(
    "fields, key",
    [
        (dict(n_layer=2, n_embd=30, n_head=4), "n_head"),
        (dict(n_embd=32, n_head=4), "n_layer"),
        (dict(preset="igpt-tiny", objective="next_patch", image_size=10, patch_size=4), "patch_size"),
        (dict(preset="igpt-tiny", mask_ratio=1.0), "mask_ratio"),
        (dict(preset="igpt-tiny", dropout=-0.1), "dropout"),
        (dict(preset="igpt-tiny", channels=-1), "channels"),
    ],
)
def test_check_names_the_bad_field(fields, key):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**fields).check()
    assert err.value.key == key


def test_build_model_needs_palette_and_image_size():
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(preset="igpt-tiny", image_size=8))
    assert err.value.key == "vocab_size"


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("objective", ["next_pixel", "masked_pixel", "next_patch"])
def test_every_preset_builds_on_meta_with_expected_shapes(name, objective):
    cfg = ModelConfig(preset=name, vocab_size=512, image_size=32, channels=3, objective=objective).resolved()
    with torch.device("meta"):
        model = GPT(cfg)
    p = PRESETS[name]
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == p.n_layer
    assert model.blocks[0].attn.c_attn.weight.shape == (3 * p.n_embd, p.n_embd)
    assert model.blocks[0].mlp.c_fc.weight.shape == (4 * p.n_embd, p.n_embd)
    assert model.wpe.weight.shape == (cfg.seq_len, p.n_embd)
    out_dim = 4 * 4 * 3 if objective == "next_patch" else 512
    assert model.head.weight.shape == (out_dim, p.n_embd)
    x = (
        torch.zeros(2, cfg.seq_len, cfg.patch_dim, device="meta")
        if objective == "next_patch"
        else torch.zeros(2, cfg.seq_len, dtype=torch.long, device="meta")
    )
    kwargs = {"mask": torch.zeros(2, cfg.seq_len, dtype=torch.bool, device="meta")} if objective == "masked_pixel" else {}
    if objective == "next_patch":
        kwargs = {"prefix_len": torch.ones(2, dtype=torch.long, device="meta")}
    assert model(x, **kwargs).shape == (2, cfg.seq_len, out_dim)
    assert model.num_parameters(non_embedding=True) == non_embedding_parameters(cfg)


@pytest.mark.parametrize("name, paper", [("igpt-s", 76e6), ("igpt-m", 455e6), ("igpt-l", 1.4e9)])
def test_paper_parameter_counts(name, paper):
    """Paper counts are rounded (L: 1.36B reported as 1.4B), so allow 3 %."""
    cfg = ModelConfig(preset=name, vocab_size=512, image_size=32).resolved()
    with torch.device("meta"):
        total = GPT(cfg).num_parameters()
    assert abs(total - paper) / paper < 0.03, total


def test_flops_per_token_formula():
    cfg = ModelConfig(preset="igpt-tiny", vocab_size=16, image_size=8).resolved()
    n = build_model(cfg).num_parameters(non_embedding=True)
    assert flops_per_token(cfg, 64) == 6 * n + 12 * 4 * 128 * 64

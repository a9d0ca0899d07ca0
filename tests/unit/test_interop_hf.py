"""HuggingFace ImageGPT import/export against a real (random, tiny, never downloaded) HF model."""

import dataclasses
import json

import pytest
import torch

from gpt_vision.errors import UserError
from gpt_vision.interop import export_hf_imagegpt, import_hf_imagegpt
from gpt_vision.model import ModelConfig, build_model

transformers = pytest.importorskip("transformers")

PALETTE, SIDE = 16, 6


def random_hf_model(activation="quick_gelu", seed=0):
    torch.manual_seed(seed)
    config = transformers.ImageGPTConfig(
        vocab_size=PALETTE + 1, n_positions=SIDE * SIDE, n_embd=32, n_layer=2, n_head=4, activation_function=activation
    )
    model = transformers.ImageGPTForCausalImageModeling(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases and gains too, so a wrong mapping cannot hide behind 0 / 1
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def hf_logits(hf, tokens):
    sos = torch.full((tokens.shape[0], 1), PALETTE)
    with torch.no_grad():
        return hf(torch.cat([sos, tokens[:, :-1]], dim=1)).logits


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_import_matches_hf_logits(tmp_path, activation, weights_file):
    hf = random_hf_model(activation)
    hf.save_pretrained(tmp_path)
    if weights_file == "pytorch_model.bin":  # the legacy format older checkpoints ship (transformers 5 no longer writes it)
        torch.save(hf.state_dict(), tmp_path / weights_file)
        (tmp_path / "model.safetensors").unlink()
    model = import_hf_imagegpt(tmp_path).eval()
    assert model.config.activation == activation and model.config.vocab_size == PALETTE
    tokens = torch.randint(0, PALETTE, (3, SIDE * SIDE), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(ours, hf_logits(hf, tokens), rtol=0, atol=1e-5)


def test_export_import_round_trip_is_exact_and_hf_loads_it(tmp_path):
    torch.manual_seed(3)
    model = build_model(ModelConfig(preset="igpt-tiny", vocab_size=PALETTE, image_size=SIDE, activation="quick_gelu"))
    export_hf_imagegpt(model, tmp_path)
    back = import_hf_imagegpt(tmp_path)
    assert back.config == dataclasses.replace(model.config, preset="")
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, PALETTE, (2, SIDE * SIDE))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), hf_logits(hf, tokens), rtol=0, atol=1e-5)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"n_inner": 100}, "n_inner=100"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"n_positions": 30}, "not a square"),
        ({"model_type": "gpt2"}, "model_type"),
    ],
)
def test_unsupported_config_is_a_clear_error(tmp_path, change, message):
    random_hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        import_hf_imagegpt(tmp_path)


def test_missing_weights_is_a_clear_error(tmp_path):
    random_hf_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors"):
        import_hf_imagegpt(tmp_path)

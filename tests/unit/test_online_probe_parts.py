"""The online probe's pieces: the ridge classifier, the pooling, the layer choice, the config."""
import pytest
import torch

from gpt_vision.config_loader import load_config
from gpt_vision.errors import ConfigError, UserError
from gpt_vision.model import ModelConfig
from gpt_vision.run_configs import PretrainConfig
from gpt_vision.tasks.online_probe import (
    _ridge_solutions,
    check_pooling,
    fit_ridge,
    probe_layers,
    top1,
)
from gpt_vision.train.config import OnlineProbeConfig


def separable(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around well-separated random centres: linearly separable with a wide margin."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 4
    labels = torch.randint(0, classes, (n,), generator=generator)
    return centres[labels] + torch.randn(n, dim, generator=generator) * 0.5, labels


@pytest.mark.parametrize("dim", [16, 400])  # fewer and more features than samples
def test_ridge_separates_a_linearly_separable_set(dim):
    x, y = separable(300, dim, classes=5, seed=0)
    test_x, test_y = separable(300, dim, classes=5, seed=1)
    clf = fit_ridge(x, y, num_classes=5, val_fraction=0.2, seed=0)
    assert top1(clf.predict(test_x), test_y) >= 0.99
    assert clf.val_top1 >= 0.99


def test_ridge_on_unlearnable_labels_stays_near_chance():
    x, _ = separable(400, 16, classes=4, seed=0)
    noise = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(5))
    test_x, _ = separable(400, 16, classes=4, seed=1)
    test_noise = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(6))
    clf = fit_ridge(x, noise, num_classes=4, val_fraction=0.2, seed=0)
    assert top1(clf.predict(test_x), test_noise) < 0.4


@pytest.mark.parametrize("n, dim", [(50, 8), (20, 60)])
def test_both_ridge_forms_equal_the_normal_equations(n, dim):
    """Primal (d <= n) and dual (d > n) eigendecompositions give (Z'Z + lam I)^-1 Z'T."""
    x, y = separable(n, dim, classes=3, seed=2)
    x = x.double()
    mean, scale, [(weight, bias)] = _ridge_solutions(x, y, 3, [0.7])
    z = (x - mean) / scale
    targets = torch.nn.functional.one_hot(y, 3).double()
    expected = torch.linalg.solve(z.T @ z + 0.7 * torch.eye(dim, dtype=torch.float64), z.T @ (targets - targets.mean(0)))
    assert torch.allclose(weight, expected, atol=1e-8)
    assert torch.allclose(bias, targets.mean(0))


def test_auto_layers_include_the_middle_and_the_last():
    assert probe_layers("auto", 4) == [0, 1, 2, 3]
    assert probe_layers("auto", 8) == [1, 3, 5, 7]
    assert probe_layers("auto", 24) == [5, 11, 17, 23]
    assert probe_layers("auto", 1) == [0]
    assert probe_layers([-1, 0, 3], 4) == [0, 3]
    with pytest.raises(UserError, match="online_probe.layers: 4 is not a block of this 4-layer model"):
        probe_layers([4], 4)


def test_grid_larger_than_the_image_is_refused():
    model = ModelConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=8, image_size=4, channels=1)
    check_pooling(OnlineProbeConfig(pooling="grid", grid_size=4), model)
    with pytest.raises(UserError, match="online_probe.grid_size=5"):
        check_pooling(OnlineProbeConfig(pooling="grid", grid_size=5), model)


@pytest.mark.parametrize("override, message", [
    ("train.probe_every=-1", "train.probe_every"),
    ("online_probe.train_images=0", "online_probe.train_images"),
    ("online_probe.val_fraction=1.0", "online_probe.val_fraction"),
    ("online_probe.layers=middle", "online_probe.layers"),
    ("online_probe.pooling=max", "online_probe.pooling"),
])
def test_bad_probe_keys_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, None, ["name=x", override])

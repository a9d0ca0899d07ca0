"""Probe feature choices and the probe solver: each pooling mode's shape and values, convergence of
the default (L-BFGS) probe on a linearly separable toy set, the pixel baseline on the model's own
split, the layer-choice warning, and the split/manifest checks that run before any work."""
import numpy as np
import pytest
import torch

from data_shards.writer import write_shards
from tests.helpers.finetune_fixtures import (CLASSES, brightness_images, finetune_overrides, one_thread,  # noqa: F401
                               random_init_export, write_brightness_shards)
from gpt_vision.config_loader import load_config
from gpt_vision.data.manifest import load_manifest
from gpt_vision.data.palette import Palette
from gpt_vision.errors import ConfigError, UserError
from gpt_vision.export import load_pretrained
from gpt_vision.run_configs import FinetuneConfig
from gpt_vision.model.pooling import grid_pool
from gpt_vision.tasks.features import Pooling, extract_features
from gpt_vision.tasks.finetune_cli import run
from gpt_vision.tasks.harness import FinetuneHarness
from gpt_vision.tasks.linear import carve, probe_logits, train_linear
from gpt_vision.tasks.probe import VAL_TEST_GAP, unreliable_choice


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    manifest = write_brightness_shards(root / "shards", train=120, test=45)
    return manifest, random_init_export(manifest, root / "random-init")


def test_grid_pool_averages_each_cell_of_the_token_grid():
    hidden = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)  # a 4x4 grid, raster order
    assert grid_pool(hidden, 2).tolist() == [[2.5, 4.5, 10.5, 12.5]]  # top-left, top-right, bottom-left, bottom-right
    assert grid_pool(hidden, 1).tolist() == [[7.5]]
    with pytest.raises(UserError, match="grid_size=5"):
        grid_pool(hidden, 5)


@pytest.mark.parametrize("kind,shape", [("mean", (45, 2, 32)), ("grid", (45, 2, 4 * 32)), ("concat", (45, 1, 2 * 32))])
def test_feature_shape_of_each_pooling(setup, kind, shape):
    manifest, init = setup
    model = load_pretrained(init).model.eval()
    cfg = load_config(FinetuneConfig, None, finetune_overrides(manifest, "unused", f"init={init}"))
    from gpt_vision.data.stream import ShardLoader

    loader = ShardLoader(cfg.data, "test", Palette.load(init / "palette.npy"), 16, train=False)
    pooling = Pooling(kind, grid_size=2)
    features = extract_features(model, loader, [0, 1], pooling, None, torch.device("cpu")).features
    assert features.shape == shape and pooling.dim(32, 2) == shape[2]
    mean = extract_features(model, loader, [0, 1], Pooling("mean"), None, torch.device("cpu")).features
    if kind == "concat":  # the per-layer means side by side
        np.testing.assert_array_equal(features[:, 0], np.concatenate([mean[:, 0], mean[:, 1]], axis=1))
    if kind == "grid":  # the average of the k*k cells is the mean over positions
        cells = features.astype(np.float32).reshape(45, 2, 4, 32).mean(axis=2)
        np.testing.assert_allclose(cells, mean.astype(np.float32), atol=2e-3)


def separable_toy(n: int, seed: int, dim: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian points labelled by argmax of a fixed linear map, keeping only those with a margin."""
    rng = np.random.default_rng(seed)
    weights = np.random.default_rng(0).normal(size=(dim, CLASSES))
    x = rng.normal(size=(4 * n, dim))
    scores = x @ weights
    top2 = np.sort(scores, axis=1)[:, -2:]
    keep = np.flatnonzero(top2[:, 1] - top2[:, 0] > 0.5)[:n]
    return torch.from_numpy(x[keep, None, :]).float(), torch.from_numpy(scores[keep].argmax(1))


@pytest.mark.parametrize("solver,extra", [("lbfgs", []), ("adamw", ["train.steps=200", "optim.lr=1e-2"])])
def test_default_probe_converges_on_a_linearly_separable_set(setup, tmp_path, solver, extra):
    manifest, init = setup
    x, y = separable_toy(600, seed=1)
    test_x, test_y = separable_toy(300, seed=2)
    cfg = load_config(FinetuneConfig, None, finetune_overrides(manifest, tmp_path / "out", f"init={init}",
                                                               f"task.probe_solver={solver}", *extra))
    with FinetuneHarness(cfg, Palette.load(init / "palette.npy"), load_manifest(str(manifest))) as harness:
        fit_idx, val_idx = carve(len(y), 0.2, seed=0)
        fitted = train_linear(harness, x, y, fit_idx, val_idx, tag="toy")
    accuracy = float((probe_logits(fitted.probe, test_x, 256)[:, 0].argmax(1) == test_y).float().mean())
    if solver == "lbfgs":
        assert accuracy >= 0.99 and fitted.val_accuracy[0] >= 0.99
        assert fitted.l2[0] in cfg.task.probe_l2
    else:  # the minibatch option learns too, given steps and lr
        assert accuracy >= 0.9 and fitted.l2 == [None]


def test_pixel_baseline_runs_on_the_models_split(setup, tmp_path):
    """Brightness buckets are linearly separable in pixels: the baseline must reach 1.0 on the
    probe's own fit carve and test samples."""
    manifest, init = setup
    results = run(load_config(FinetuneConfig, None, finetune_overrides(
        manifest, tmp_path / "out", f"init={init}", "task.baselines=[pixels]", "task.val_fraction=0.25")))
    pixels = results["baselines"]["pixels"]
    assert pixels["top1"] == 1.0
    saved = np.load(tmp_path / "out" / "predictions.npz")
    assert (saved["pixels_logits"].argmax(1) == saved["labels"]).all()
    assert pixels["fit_keys"] == results["data"]["fit_keys"] and pixels["test_keys"] == results["data"]["test_keys"]
    assert pixels["samples"] == results["samples"] == 45 and set(pixels["per_class"]) == {"b0", "b1", "b2"}
    assert results["data"]["classes"] == ["b0", "b1", "b2"] and results["data"]["test_split"] == "test"
    assert results["data"]["manifest"] == str(manifest)
    assert set(results["per_layer_train_loss"]) == {"0", "1"}
    assert all(loss > 0 for loss in results["per_layer_train_loss"].values())
    off = run(load_config(FinetuneConfig, None, finetune_overrides(
        manifest, tmp_path / "off", f"init={init}", "task.baselines=[]", "task.pooling=grid", "task.grid_size=2")))
    assert off["baselines"] == {} and off["top1"] >= 0.9


def test_warning_when_validation_is_far_above_test(setup, tmp_path):
    assert unreliable_choice(0.95, 0.95 - VAL_TEST_GAP - 0.01)
    assert unreliable_choice(0.95, 0.95 - VAL_TEST_GAP + 0.01) == []
    assert unreliable_choice(None, 0.1) == []
    _, init = setup
    train, test = brightness_images(60, 0), brightness_images(30, 1)
    shifted = (test[0], (test[1] + 1) % CLASSES)  # a test split labelled unlike train
    write_shards({"train": train, "test": shifted}, None, tmp_path / "shards", "shifted", shard_size=100,
                 classes=["b0", "b1", "b2"], mode="L")
    results = run(load_config(FinetuneConfig, None, finetune_overrides(
        tmp_path / "shards" / "manifest.json", tmp_path / "out", f"init={init}", "task.baselines=[]",
        "task.val_fraction=0.25")))
    assert results["per_layer"][str(results["chosen_layer"])] >= 0.9 and results["top1"] <= 0.1
    assert len(results["warnings"]) == 1 and "layer choice is unreliable" in results["warnings"][0]


def test_a_manifest_without_the_test_split_fails_before_any_work(setup, tmp_path):
    _, init = setup
    images, labels = brightness_images(30, 0)
    write_shards({"train": (images, labels), "holdout": (images[:9], labels[:9])}, None, tmp_path / "shards",
                 "nt", shard_size=100, classes=["b0", "b1", "b2"], mode="L")
    manifest = tmp_path / "shards" / "manifest.json"
    cfg = load_config(FinetuneConfig, None, finetune_overrides(manifest, tmp_path / "out", f"init={init}"))
    with pytest.raises(UserError, match=r"no samples in split 'test' \(data.test_split; splits: holdout, train\)"):
        run(cfg)
    assert not (tmp_path / "out").exists()
    results = run(load_config(FinetuneConfig, None, finetune_overrides(
        manifest, tmp_path / "out", f"init={init}", "data.test_split=holdout", "task.baselines=[]")))
    assert results["samples"] == 9 and results["data"]["test_split"] == "holdout"


@pytest.mark.parametrize("overrides,key", [
    (["task.pooling=concat"], "task.pooling"),
    (["task.kind=attentive_probe", "task.pooling=grid"], "task.pooling"),
    (["task.kind=finetune", "task.layers=[0, 1]"], "task.layers"),
    (["task.grid_size=0"], "task.grid_size"),
    (["task.probe_l2=[]"], "task.probe_l2"),
    (["task.baselines=[pixels, pixels]"], "task.baselines"),
    (["data.val_split=holdout"], "data.val_split"),
])
def test_bad_feature_choices_are_refused_at_load(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(FinetuneConfig, None, ["init=x", "output_dir=y", "data.manifest=m", *overrides])

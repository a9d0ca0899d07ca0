"""Linear and attentive probes on a frozen, randomly initialized backbone over shards whose class
is the mean-brightness bucket: the pooled features carry the brightness, so a probe must find it."""
import json

import numpy as np
import pytest

from tests.helpers.finetune_fixtures import one_thread, finetune_overrides, random_init_export, write_brightness_shards  # noqa: F401
from gpt_vision.config_loader import load_config
from gpt_vision.export import load_pretrained
from gpt_vision.run_configs import FinetuneConfig
from gpt_vision.tasks.backbone import state_checksum
from gpt_vision.tasks.finetune_cli import run
from gpt_vision.tasks.scores import classification_metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    manifest = write_brightness_shards(root / "shards")
    return manifest, random_init_export(manifest, root / "random-init")


def probe(manifest, init, out, *extra):
    cfg = load_config(FinetuneConfig, None, finetune_overrides(
        manifest, out, f"init={init}", "task.kind=linear_probe", "train.steps=150", "train.batch_size=32",
        "optim.lr=1e-2", "optim.weight_decay=0", "optim.grad_clip=0", *extra))
    return run(cfg)


def test_layer_sweep_reaches_high_accuracy_and_leaves_backbone_unchanged(setup, tmp_path):
    manifest, init = setup
    before = state_checksum(load_pretrained(init).model)
    results = probe(manifest, init, tmp_path / "out", "task.layers=auto", "task.val_fraction=0.25")
    assert results["top1"] >= 0.9  # 3 classes: chance is 0.33
    assert set(results["per_layer"]) == {"0", "1"}
    assert all(0.0 <= acc <= 1.0 for acc in results["per_layer"].values())
    best = max(results["per_layer"], key=lambda k: results["per_layer"][k])
    assert results["per_layer"][str(results["chosen_layer"])] == results["per_layer"][best]
    assert results["backbone_checksum"] == before
    assert state_checksum(load_pretrained(init).model) == before
    assert results["data"]["val_samples"] == 60 and results["data"]["train_samples"] == 180 and results["samples"] == 90
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    predictions = np.load(tmp_path / "out" / "predictions.npz")
    recomputed = classification_metrics(predictions["labels"], predictions["logits"], ["b0", "b1", "b2"])
    assert recomputed == saved["model"] and recomputed["top1"] == saved["top1"]
    assert len(set(predictions["keys"].tolist())) == 90  # every test sample exactly once
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert list((tmp_path / "out" / "tensorboard").iterdir())


def test_repeated_probe_reads_cached_features(setup, tmp_path):
    manifest, init = setup
    cache = tmp_path / "cache"
    first = probe(manifest, init, tmp_path / "a", f"feature_cache={cache}")
    second = probe(manifest, init, tmp_path / "b", f"feature_cache={cache}")
    assert not first["features_cached"] and second["features_cached"]
    assert second["top1"] == first["top1"] and second["per_layer"] == first["per_layer"]
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 2  # train (all layers) and test (the chosen layer)
    assert all(np.load(p / "features.npy").dtype == np.float16 for p in entries)


def test_overwrite_keeps_the_feature_cache_and_refuses_without_it(setup, tmp_path):
    manifest, init = setup
    out = tmp_path / "out"
    probe(manifest, init, out)
    from gpt_vision.errors import UserError

    with pytest.raises(UserError, match="not empty"):
        probe(manifest, init, out)
    again = probe(manifest, init, out, "overwrite=true")
    assert again["features_cached"]


def test_concatenated_layers(setup, tmp_path):
    manifest, init = setup
    results = probe(manifest, init, tmp_path / "out", "task.layers=[0, 1]", "task.pooling=concat")
    assert results["chosen_layer"] == [0, 1]
    assert results["top1"] >= 0.9


def test_attentive_probe(setup, tmp_path):
    manifest, init = setup
    before = state_checksum(load_pretrained(init).model)
    cfg = load_config(FinetuneConfig, None, finetune_overrides(
        manifest, tmp_path / "out", f"init={init}", "task.kind=attentive_probe", "task.attentive_heads=2",
        "train.steps=120", "train.batch_size=16", "optim.lr=3e-3"))
    results = run(cfg)
    assert results["top1"] >= 0.8
    assert results["chosen_layer"] == 1
    assert results["backbone_checksum"] == before


def test_a_narrow_probe_sweep_keeps_the_pixel_baseline_sweep_wide(setup, tmp_path):
    """task.probe_l2 narrowed to one huge value: the model's probe must take it, the pixel baseline
    still chooses among PIXEL_L2 (a weak L2 wins on separable brightness buckets)."""
    from gpt_vision.tasks.baselines import PIXEL_L2

    manifest, init = setup
    results = probe(manifest, init, tmp_path / "out", "task.layers=[0]", "task.probe_l2=[1000.0]",
                    "task.baselines=[pixels]")
    pixels = results["baselines"]["pixels"]
    assert results["l2"] == {"0": 1000.0}
    assert pixels["l2"] in PIXEL_L2 and pixels["top1"] == 1.0

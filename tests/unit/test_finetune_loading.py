"""The fine-tune loader reads a real pretraining run (step dir, run dir, export) into exactly the
weights `load_pretrained` gives, with its palette; data or palette that do not fit are refused."""
import shutil

import numpy as np
import pytest
import torch

from tests.helpers.finetune_fixtures import one_thread, pretrain_tiny, write_brightness_shards  # noqa: F401
from gpt_vision import checkpoint as ckpt
from gpt_vision.config_loader import load_config
from gpt_vision.data.palette import Palette
from gpt_vision.errors import UserError
from gpt_vision.export import export_checkpoint, load_pretrained
from gpt_vision.interop.hf_imagegpt import export_hf_imagegpt
from gpt_vision.run_configs import FinetuneConfig
from gpt_vision.tasks.backbone import load_backbone


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    manifest = write_brightness_shards(root / "shards", train=64, test=16)
    run_dir = pretrain_tiny(manifest, root / "run", steps=4)
    return manifest, run_dir, root


def config(manifest, init, *extra):
    return load_config(FinetuneConfig, None, [f"init={init}", f"data.manifest={manifest}", "output_dir=unused", *extra])


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_step_dir_run_dir_and_export_load_bitwise_equal(run, tmp_path):
    manifest, run_dir, _ = run
    step_dir = ckpt.latest_complete(run_dir / "checkpoints")
    assert step_dir.name == "step-0000004"
    reference = load_pretrained(step_dir)
    export = export_checkpoint(step_dir, tmp_path / "export")
    for init in (step_dir, run_dir, export):
        backbone = load_backbone(config(manifest, init))
        assert_same_weights(backbone.model.state_dict(), reference.model.state_dict())
        np.testing.assert_array_equal(backbone.palette.centroids, reference.palette.centroids)
        assert backbone.model.config == reference.model.config
    older = load_backbone(config(manifest, run_dir / "checkpoints" / "step-0000002"))
    assert not torch.equal(older.model.wte.weight, reference.model.wte.weight)


def test_hf_init_needs_tokenizer_path(run, tmp_path):
    manifest, run_dir, _ = run
    reference = load_pretrained(run_dir)
    export_hf_imagegpt(reference.model, tmp_path / "hf")
    with pytest.raises(UserError, match="tokenizer.path"):
        load_backbone(config(manifest, tmp_path / "hf"))
    reference.palette.save(tmp_path / "palette.npy")
    backbone = load_backbone(config(manifest, tmp_path / "hf", f"tokenizer.path={tmp_path / 'palette.npy'}"))
    assert backbone.source.startswith("hf ")


@pytest.mark.parametrize("case", ["missing", "incomplete_step", "not_a_checkpoint", "other_palette",
                                  "other_geometry", "palette_size"])
def test_bad_init_is_one_clear_error(run, tmp_path, case):
    manifest, run_dir, root = run
    step_dir = ckpt.latest_complete(run_dir / "checkpoints")
    extra = []
    init = run_dir
    if case == "missing":
        init, expected = tmp_path / "nope", "does not exist"
    elif case == "incomplete_step":
        init = tmp_path / step_dir.name
        shutil.copytree(step_dir, init)
        (init / ckpt.COMMIT_MARKER).unlink()
        expected = "incomplete"
    elif case == "not_a_checkpoint":
        (tmp_path / "empty").mkdir()
        init, expected = tmp_path / "empty", "no complete checkpoint"
    elif case == "other_palette":
        Palette(np.linspace(0, 255, 8)[:, None]).save(tmp_path / "p.npy")
        extra, expected = [f"tokenizer.path={tmp_path / 'p.npy'}"], "differs from the palette"
    elif case == "other_geometry":
        manifest = write_brightness_shards(tmp_path / "big", train=8, test=8, size=12)
        expected = "takes 8x8 images but the data"
    else:
        export = export_checkpoint(step_dir, tmp_path / "export")
        Palette(np.linspace(0, 255, 16)[:, None]).save(export / "palette.npy")
        init, expected = export, "16 colors but the model's vocabulary is 8"
    with pytest.raises(UserError, match=expected) as error:
        load_backbone(config(manifest, init, *extra))
    assert "\n" not in str(error.value)

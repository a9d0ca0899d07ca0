"""The sampling CLI on a real (tiny) pretrained run: grid sizes, prompts kept, TensorBoard images."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpt_vision.config_loader import load_config
from gpt_vision.data.palette import Palette
from gpt_vision.distributed import DistEnv
from gpt_vision.export import export_checkpoint
from gpt_vision.run_configs import PretrainConfig
from gpt_vision.sampling import grid_shape
from gpt_vision.tasks.pretrain import run_pretraining
from gpt_vision.train import preemption
from tests.helpers.toydata import tiny_overrides, write_toy_shards

ROOT = Path(__file__).resolve().parents[2]
SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                 master_port=29500, launcher="python")
SIZE = 8  # toy images are 8x8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("sampling")
    manifest = write_toy_shards(base / "shards")
    run = base / "run"
    preemption.clear()
    run_pretraining(load_config(PretrainConfig, None, tiny_overrides(manifest, run, "train.steps=4")), SINGLE)
    return run


def sample_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def cell(grid: np.ndarray, row: int, col: int, side: int) -> np.ndarray:
    top, left = 2 + row * (side + 2), 2 + col * (side + 2)
    return grid[top:top + side, left:left + side]


def test_grids_have_the_promised_layout_and_completions_keep_the_prompt(run_dir, tmp_path):
    out = tmp_path / "out"
    done = sample_cli("--init", str(run_dir), "--out", str(out), "--completions", "3", "--per-image", "2",
                      "--samples", "5", "--seed", "1", "--scale", "4")
    assert done.returncode == 0, done.stderr
    side = SIZE * 4
    completions = np.asarray(Image.open(out / "completions.png"))
    unconditional = np.asarray(Image.open(out / "unconditional.png"))
    assert completions.shape == grid_shape(3 * 4, 2 + 2, SIZE, 4) == (3 * (side + 2) + 2, 4 * (side + 2) + 2)
    assert unconditional.shape == grid_shape(5, 5, SIZE, 4)

    tokens = np.load(out / "tokens.npz")
    half = (SIZE // 2) * SIZE
    assert tokens["completions"].shape == (3, 2, SIZE * SIZE)
    assert np.array_equal(tokens["completions"][:, :, :half], np.repeat(tokens["originals"][:, None, :half], 2, 1))
    assert not np.array_equal(tokens["completions"][:, :, half:], np.repeat(tokens["originals"][:, None, half:], 2, 1))
    assert tokens["unconditional"].shape == (5, SIZE * SIZE)

    palette = Palette.load(run_dir / "palette.npy")
    for image in range(3):
        original = palette.decode(tokens["originals"][image]).numpy().reshape(SIZE, SIZE)
        original_big = original.repeat(4, 0).repeat(4, 1)
        assert np.array_equal(cell(completions, image, 3, side), original_big)
        prompt = cell(completions, image, 0, side)
        assert np.array_equal(prompt[: side // 2], original_big[: side // 2])
        assert (prompt[side // 2:] == 128).all()
        for k in range(2):  # the top half of every completion is exactly the prompt
            assert np.array_equal(cell(completions, image, 1 + k, side)[: side // 2], original_big[: side // 2])

    summary = json.loads((out / "samples.json").read_text())
    assert summary["tensorboard"]["step"] == 4
    assert "completions:" in done.stdout and "tensorboard:" in done.stdout


def test_grids_reach_tensorboard_and_default_out_is_inside_the_run(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = sample_cli("--init", str(run_dir), "--completions", "2", "--per-image", "1", "--samples", "2")
    assert done.returncode == 0, done.stderr
    out = run_dir / "samples" / "step-0000004"
    assert (out / "completions.png").is_file() and (out / "unconditional.png").is_file()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert {"sampling/completions", "sampling/unconditional"} <= set(tags)
    image = events.Images("sampling/completions")[-1]
    assert image.step == 4 and (image.height, image.width) == grid_shape(2 * 3, 3, SIZE, 1)


def test_a_single_strategy_step_dir_is_a_checkpoint_not_an_export(run_dir):
    """Such a step holds model.safetensors like an export; it is still its run's step, so the
    grids go into the run (default --out) and its TensorBoard at that step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    step_dir = run_dir / "checkpoints" / "step-0000002"
    assert (step_dir / "model.safetensors").is_file()
    done = sample_cli("--init", str(step_dir), "--completions", "1", "--per-image", "1", "--samples", "1")
    assert done.returncode == 0, done.stderr
    assert (run_dir / "samples" / "step-0000002" / "completions.png").is_file()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert 2 in {image.step for image in events.Images("sampling/unconditional")}


def test_same_seed_same_samples_and_an_export_needs_out_and_data(run_dir, tmp_path):
    export = export_checkpoint(run_dir, tmp_path / "export")
    missing_out = sample_cli("--init", str(export), "--samples", "2", "--completions", "0")
    assert missing_out.returncode == 2 and "--out is required" in missing_out.stderr
    missing_data = sample_cli("--init", str(export), "--out", str(tmp_path / "x"), "--completions", "1")
    assert missing_data.returncode == 2 and "--data-manifest" in missing_data.stderr
    a = sample_cli("--init", str(export), "--out", str(tmp_path / "a"), "--completions", "0", "--samples", "3")
    b = sample_cli("--init", str(run_dir), "--out", str(tmp_path / "b"), "--completions", "0", "--samples", "3",
                   "--no-tensorboard")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert np.array_equal(np.load(tmp_path / "a" / "tokens.npz")["unconditional"],
                          np.load(tmp_path / "b" / "tokens.npz")["unconditional"])


def test_bad_arguments_are_one_line_errors(run_dir):
    done = sample_cli("--init", str(run_dir), "--temperature", "0")
    assert done.returncode == 2
    assert done.stderr.strip() == "gpt-vision-sample: error: --temperature must be > 0, got 0.0"
    done = sample_cli("--init", str(run_dir / "nope"))
    assert done.returncode == 2 and "does not exist" in done.stderr

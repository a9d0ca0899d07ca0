"""`make demo` at its small scale, end to end: every step runs, the files and TensorBoard tags the
README promises exist, and the summary carries numbers."""
import gzip
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpt_vision.sampling import cell_scale, grid_shape
from tests.helpers.toydata import toy_images

ROOT = Path(__file__).resolve().parents[2]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SMALL_IMAGE_SIZE = 8  # launch/demo.py SMALL: 8x8, 4 completions x 2 samples, 8 unconditional samples


def write_idx(directory: Path) -> Path:
    """Stand-in IDX files when the Debian package is absent (the folder name keeps FMNIST's classes)."""
    directory.mkdir(parents=True)
    for prefix, count, seed in (("train", 600, 0), ("t10k", 200, 1)):
        images, labels = toy_images(count, 28, seed)
        for kind, array, dims in (("images", images, 3), ("labels", labels.astype(np.uint8), 1)):
            header = struct.pack(">I", 0x0800 | dims) + b"".join(struct.pack(">I", d) for d in array.shape)
            with gzip.open(directory / f"{prefix}-{kind}-idx{dims}-ubyte.gz", "wb") as handle:
                handle.write(header + array.tobytes())
    return directory


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    args = [sys.executable, str(ROOT / "launch" / "demo.py"), "--small", "--out", str(out)]
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        args += ["--idx-dir", str(write_idx(tmp_path_factory.mktemp("idx") / "fashion-mnist"))]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout + done.stderr


def test_every_step_ran_as_a_printed_command_and_the_run_was_resumed(demo):
    out, log = demo
    commands = [line[2:] for line in log.splitlines() if line.startswith("$ ")]
    assert any(" -m data_shards make --source idx " in c for c in commands)
    assert any(" -m data_shards verify " in c for c in commands)
    pretrain = [c for c in commands if "launch/pretrain.py --nproc_per_node 2" in c]
    assert len(pretrain) == 2 and pretrain[0] == pretrain[1]  # the very same command resumes
    assert any(c.startswith("kill -USR1 ") for c in commands)
    assert "exited 85" in log and re.search(r"resumed from \S+step-\d+ at step \d+", log)
    for config in ("linear_probe.yaml", "finetune.yaml", "distill.yaml"):
        assert any(f"configs/finetune/{config}" in c for c in commands)
    assert any("launch/sample.py --init" in c for c in commands)


def test_sample_pngs_decode_with_the_expected_grid_size(demo):
    out, _ = demo
    scale = cell_scale(SMALL_IMAGE_SIZE, 0)
    completions = Image.open(out / "samples" / "completions.png")
    unconditional = Image.open(out / "samples" / "unconditional.png")
    completions.load(), unconditional.load()
    assert (completions.height, completions.width) == grid_shape(4 * (2 + 2), 2 + 2, SMALL_IMAGE_SIZE, scale)
    assert (unconditional.height, unconditional.width) == grid_shape(8, 8, SMALL_IMAGE_SIZE, scale)
    assert completions.mode == unconditional.mode == "L"
    assert len(np.unique(np.asarray(unconditional))) > 2  # drawn images, not a blank canvas


def test_tensorboard_holds_the_promised_scalars_and_images(demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = demo
    run = EventAccumulator(str(out / "run" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    run.Reload()
    tags = run.Tags()
    assert {"train/loss", "train/bits_per_dim", "train/tokens_per_s", "val/loss", "val/bits_per_dim"} <= set(tags["scalars"])
    assert {"samples/unconditional", "sampling/completions", "sampling/unconditional"} <= set(tags["images"])
    assert [event.step for event in run.Scalars("probe/top1")] == [24, 48]  # the online probe's curve
    assert all(0 <= event.value <= 1 for event in run.Scalars("probe/top1"))
    steps = [event.step for event in run.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 48  # resumed without repeating or losing steps
    assert all(np.isfinite(event.value) for event in run.Scalars("val/bits_per_dim"))
    probe = EventAccumulator(str(out / "probe" / "tensorboard"))
    probe.Reload()
    assert "test/top1" in probe.Tags()["scalars"]


def test_summary_is_printed_with_numbers_beside_their_baselines(demo):
    out, log = demo
    assert re.search(r"next_pixel, 48 steps\s+\d+\.\d+ bits/dim\s+[\d,]+\s+\d+s", log)
    baselines = {"linear probe \\(layer \\d+\\)": "pixels", "fine-tune": "scratch", "distilled student": "labels only"}
    for row, baseline in baselines.items():
        assert re.search(row + r"\s+\d+\.\d%\s+" + baseline + r" \d+\.\d%.*\s+[\d,]+\s+\d+s", log), row
    assert "tensorboard --logdir" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrain"]["steps"] == 48 and summary["pretrain"]["val_bits_per_dim"] > 0
    assert 0 <= summary["linear_probe"]["top1"] <= 1 and summary["distill"]["parameters"] < summary["pretrain"]["parameters"]
    for value in (summary["linear_probe"]["pixels_top1"], summary["finetune"]["scratch_top1"],
                  summary["distill"]["labels_only_top1"]):
        assert 0 <= value <= 1

"""`python launch/finetune.py` as users run it: a probe end to end, and bad inits as one line, exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.finetune_fixtures import random_init_export, write_brightness_shards

ROOT = Path(__file__).resolve().parents[2]

CONFIG = ROOT / "configs" / "finetune" / "linear_probe.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    manifest = write_brightness_shards(root / "shards", train=96, test=30)
    return manifest, random_init_export(manifest, root / "init")


def finetune(manifest, out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(ROOT / "launch" / "finetune.py"), "--config", str(CONFIG),
               f"data.manifest={manifest}", f"output_dir={out}", "data.num_workers=0", "logging.progress=false",
               "train.steps=20", "train.batch_size=16", "schedule.warmup_steps=2", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_probe_from_the_command_line(setup, tmp_path):
    manifest, init = setup
    done = finetune(manifest, tmp_path / "out", f"init={init}")
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert f"top1 {results['top1']:.4f}" in done.stdout
    assert f"| pixels {results['baselines']['pixels']['top1']:.4f}" in done.stdout
    assert (tmp_path / "out" / "config.yaml").is_file()


@pytest.mark.parametrize("case", ["missing", "incomplete", "not_checkpoint", "geometry", "no_init", "unknown_key",
                                  "no_test_split"])
def test_bad_init_exits_2_with_one_line(setup, tmp_path, case):
    manifest, init = setup
    args = [f"init={init}"]
    if case == "missing":
        args = [f"init={tmp_path / 'missing'}"]
    elif case == "incomplete":
        step = tmp_path / "run" / "checkpoints" / "step-0000005"
        step.mkdir(parents=True)
        (step / "meta.json").write_text("{}")
        args = [f"init={step}"]
    elif case == "not_checkpoint":
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "notes.txt").write_text("hello")
        args = [f"init={tmp_path / 'plain'}"]
    elif case == "geometry":
        manifest = write_brightness_shards(tmp_path / "big", train=8, test=8, size=10)
    elif case == "no_init":
        args = []
    elif case == "no_test_split":
        args.append("data.test_split=holdout")
    else:
        args.append("task.layer=3")
    done = finetune(manifest, tmp_path / "out", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt-vision-finetune: error: "), done.stderr
    assert not (tmp_path / "out" / "results.json").exists()

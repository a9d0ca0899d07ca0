"""Drills 13.1 and 13.4 through the real entry points: a manifest entry that would run a command
runs nowhere (a marker file proves it), and a shard changed after its manifest was written stops
pretraining before any step; each is one line and exit 2."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.drills import REPO, child_env, overrides, run_cli
from tests.helpers import shardgen
from tests.helpers.finetune_fixtures import random_init_export, write_brightness_shards

PIPE_REFUSED = "a pipe: name runs a shell command; refused unless data.allow_pipe: true"


def error_lines(prog: str, stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:")]


def piped_copy(manifest: Path, folder: Path, marker: Path) -> tuple[Path, str]:
    """A copy of the shard set whose first train entry is `pipe:touch MARKER; cat <the real shard>`."""
    shutil.copytree(manifest.parent, folder)
    doc = json.loads((folder / "manifest.json").read_text())
    first = doc["splits"]["train"]["shards"][0]
    first["file"] = f"pipe:touch {marker}; cat {folder / first['file']}"
    (folder / "manifest.json").write_text(json.dumps(doc))
    return folder / "manifest.json", first["file"]


def test_pretraining_refuses_a_pipe_entry_and_runs_nothing(manifest, tmp_path, figure):
    marker = tmp_path / "marker"
    piped, entry = piped_copy(manifest, tmp_path / "shards", marker)
    proc = run_cli(overrides(piped, tmp_path / "run"))
    lines = error_lines("gpt-vision-pretrain", proc.stderr)
    figure(f"exit {proc.returncode}; marker exists: {marker.exists()}; {lines}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines == [f"gpt-vision-pretrain: error: shard manifest {piped}: field 'splits.train.shards[0].file' "
                     f"is {entry!r}: {PIPE_REFUSED}"]
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_finetuning_refuses_a_pipe_entry_and_runs_nothing(tmp_path, figure):
    good = write_brightness_shards(tmp_path / "good", train=16, test=8)
    init = random_init_export(good, tmp_path / "init")
    marker = tmp_path / "marker"
    piped, entry = piped_copy(good, tmp_path / "shards", marker)
    command = [sys.executable, str(REPO / "launch" / "finetune.py"),
               "--config", str(REPO / "configs" / "finetune" / "linear_probe.yaml"), f"init={init}",
               f"data.manifest={piped}", f"output_dir={tmp_path / 'out'}", "data.num_workers=0", "logging.progress=false"]
    proc = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    lines = error_lines("gpt-vision-finetune", proc.stderr)
    figure(f"exit {proc.returncode}; marker exists: {marker.exists()}; {lines}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines == [f"gpt-vision-finetune: error: shard manifest {piped}: field 'splits.train.shards[0].file' "
                     f"is {entry!r}: {PIPE_REFUSED}"]
    assert not marker.exists()


@pytest.mark.parametrize("verify", ["hash", "size"])
def test_pretraining_refuses_a_shard_changed_after_its_manifest(manifest, tmp_path, figure, verify):
    """Every train shard is changed, so whichever the stream opens first is refused before any
    step (a shard is verified when first opened: with only a later shard changed, the steps before
    it would train, and whether the palette fit reads it first depends on a saved palette)."""
    copy = tmp_path / "shards"
    shutil.copytree(manifest.parent, copy)
    shards = sorted(copy.glob("train-*.tar"))
    for shard in shards:
        if verify == "hash":
            shardgen.relabel_to_zero(shard)  # every label 0, same size: only the hash sees it
        else:
            shard.write_bytes(shard.read_bytes()[:-1024])
    proc = run_cli(overrides(copy / "manifest.json", tmp_path / "run", f"data.verify={verify}"))
    lines = error_lines("gpt-vision-pretrain", proc.stderr)
    figure(f"data.verify={verify}: exit {proc.returncode}; {lines}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and any(lines[0].startswith(f"gpt-vision-pretrain: error: shard {shard} ") for shard in shards)
    assert f"manifest {copy / 'manifest.json'} says" in lines[0]
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))

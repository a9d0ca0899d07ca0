"""Format drills: damaged or contradictory files and full disks. Each case goes through a real entry
point (in this process where a fault is injected mid-run; a real 2-rank launch for fsdp) and must
end with exit code 2 and one line naming the file and what to do; nothing is written or
allocated for a file that contradicts itself, and a full disk never leaves a half-written record."""
import base64
import json
import os
import shutil
import stat
import subprocess

import pytest
import torch
import yaml

from gpt_vision import cli, layout
from gpt_vision.export import export_checkpoint, load_pretrained
from gpt_vision.interop.hf_imagegpt import export_hf_imagegpt
from gpt_vision.train import preemption
from tests.helpers.drills import LAUNCH, PYTHON, REPO, child_env
from tests.helpers.inproc import Payload, fill_disk_at, pretrain, tmpfs
from tests.helpers.toydata import tiny_overrides

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
STEP = "step-0000002"


def error_line(capsys, code: int) -> str:
    """The entry point's one error line, after checking the exit code and that it is alone."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1, (code, lines)
    return lines[0]


def pretrain_cli(monkeypatch, capsys, manifest, run, *extra: str, fault_injector=None) -> str:
    """`gpt-vision-pretrain` in this process (its signal handlers left alone), with a fault injector."""
    import gpt_vision.tasks.pretrain as task

    real = task.run_pretraining
    monkeypatch.setattr(task, "run_pretraining", lambda cfg, env: real(cfg, env, fault_injector=fault_injector))
    monkeypatch.setattr(preemption, "install_handlers", lambda: None)
    preemption.clear()
    code = cli.pretrain_main(tiny_overrides(manifest, run, "logging.tensorboard=false", *extra))
    return error_line(capsys, code)


@pytest.fixture(scope="module")
def single_run(manifest, tmp_path_factory):
    run = tmp_path_factory.mktemp("formats") / "run"
    pretrain(manifest, run, "train.steps=2", "schedule.warmup_steps=1", "checkpoint.every=2")
    return run


@pytest.fixture
def run_copy(single_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(single_run, copy)
    return copy


@needs_root
def test_disk_full_while_writing_optimizer_pt(manifest, small_disk, single_run, monkeypatch, capsys, figure):
    step = single_run / "checkpoints" / STEP
    room = -(-(step / layout.MODEL_FILE).stat().st_size // 4096) * 4096 + (3 << 12)  # the model fits, optimizer.pt not
    assert (step / layout.OPTIMIZER_FILE).stat().st_size > 2 * (3 << 12)
    run = small_disk / "run"
    line = pretrain_cli(monkeypatch, capsys, manifest, run, "train.steps=4",
                        fault_injector=fill_disk_at(2, small_disk, leave_bytes=room))
    figure(line)
    failed = run / "checkpoints" / "step-0000004"
    assert f"{failed}: No space left on device ({failed / layout.OPTIMIZER_FILE})" in line
    assert "newest complete checkpoint" in line and line.endswith(str(run / "checkpoints" / STEP))
    assert not layout.is_complete(failed) and not any(p.name.startswith(".") for p in failed.iterdir())


@needs_root
def test_disk_full_in_the_metrics_logger_leaves_whole_records(manifest, small_disk, monkeypatch, capsys, figure):
    run = small_disk / "run"
    line = pretrain_cli(monkeypatch, capsys, manifest, run, "train.steps=200", "checkpoint.every=1000",
                        fault_injector=fill_disk_at(2, small_disk, leave_bytes=0))
    text = (run / layout.METRICS_FILE).read_text()
    records = [json.loads(record) for record in text.splitlines()]
    figure(f"{line}; {len(records)} whole records, last step {records[-1]['step']}")
    assert f"cannot write {run / layout.METRICS_FILE}: No space left on device" in line
    assert text.endswith("\n") and records[-1]["step"] > 2


def corrupt_meta(run, tmp_path):
    (run / "checkpoints" / STEP / layout.META_FILE).write_text('{"step": 2, "strategy": "sin')
    return [cli.export_main, str(run), str(tmp_path / "export")], layout.META_FILE, "not valid JSON"


def corrupt_rank_state(run, tmp_path):
    (run / "checkpoints" / STEP / layout.rank_file_name(0)).write_bytes(b"\x00garbage")
    return "resume", layout.rank_file_name(0), "not valid JSON"


def shorten_rng_state(run, tmp_path):
    path = run / "checkpoints" / STEP / layout.rank_file_name(0)
    state = json.loads(path.read_text())
    state["rng"]["torch"] = base64.b64encode(base64.b64decode(state["rng"]["torch"])[:100]).decode()
    path.write_text(json.dumps(state))
    return "resume", layout.rank_file_name(0), "damaged RNG state ('torch' state has 100 bytes, expected 5056)"


def widen_meta(run, tmp_path):
    path = run / "checkpoints" / STEP / layout.META_FILE
    meta = json.loads(path.read_text())
    meta["model"]["n_embd"] = 4_000_000
    path.write_text(json.dumps(meta))
    return ([cli.export_main, str(run), str(tmp_path / "export")], layout.META_FILE,
            "model.n_embd=4000000 does not fit")


@pytest.mark.parametrize("damage", [corrupt_meta, corrupt_rank_state, shorten_rng_state, widen_meta])
def test_damaged_step_files_are_one_line(manifest, run_copy, tmp_path, monkeypatch, capsys, figure, damage):
    action, name, expected = damage(run_copy, tmp_path)
    if action == "resume":
        line = pretrain_cli(monkeypatch, capsys, manifest, run_copy, "train.steps=4")
    else:
        line = error_line(capsys, action[0](action[1:]))
    figure(line)
    assert str(run_copy / "checkpoints" / STEP / name) in line and expected in line
    assert not (tmp_path / "export").exists()
    assert layout.latest_complete(run_copy / "checkpoints").name == STEP  # nothing newer was committed


def sample_args(init, tmp_path):
    return ["--init", str(init), "--out", str(tmp_path / "samples"), "--completions", "0", "--samples", "1"]


@pytest.mark.parametrize("case", ["bad_yaml", "unknown_key", "wide_model"])
def test_a_bad_export_config_is_refused_before_building(manifest, single_run, tmp_path, capsys, figure, case):
    export = export_checkpoint(single_run, tmp_path / "export")
    config = export / layout.CONFIG_FILE
    doc = yaml.safe_load(config.read_text())
    assert doc["source"]["step"] == 2
    if case == "bad_yaml":
        config.write_text("model: [unclosed\n")
        expected = "is not valid YAML"
    elif case == "unknown_key":
        config.write_text(yaml.safe_dump(dict(doc, evil="x")))
        expected = "unknown key 'evil'"
    else:
        doc["model"]["n_embd"] = 4_000_000
        config.write_text(yaml.safe_dump(doc))
        expected = "model.n_embd=4000000 does not fit"
    sample = error_line(capsys, cli.sample_main(sample_args(export, tmp_path)))
    tune = error_line(capsys, cli.finetune_main([f"init={export}", f"data.manifest={manifest}",
                                                 f"output_dir={tmp_path / 'tuned'}"]))
    figure(sample)
    for line in (sample, tune):
        assert str(config) in line and expected in line
    assert not (tmp_path / "samples").exists() and not (tmp_path / "tuned").exists()


def test_an_export_follows_the_umask_and_names_its_step(single_run, tmp_path, capsys, figure):
    old = os.umask(0o002)
    try:
        code = cli.export_main([str(single_run), str(tmp_path / "export")])
    finally:
        os.umask(old)
    said = capsys.readouterr().out.strip()
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in [tmp_path / "export", *(tmp_path / "export").iterdir()]}
    figure(f"{said}; modes {modes}")
    assert code == 0 and said.startswith("exported step 2 (")
    assert set(modes.values()) == {"0o775", "0o664"} and modes["export"] == "0o775"


def test_a_refused_hf_pytorch_model_bin_is_one_line(single_run, tmp_path, capsys, figure):
    hf = tmp_path / "hf"
    export_hf_imagegpt(load_pretrained(single_run).model, hf)
    (hf / layout.MODEL_FILE).unlink()
    marker = tmp_path / "PWNED"
    torch.save({"state": Payload(marker)}, hf / layout.HF_LEGACY_FILE)
    line = error_line(capsys, cli.sample_main(sample_args(hf, tmp_path)))
    figure(f"{line}; payload executed: {marker.exists()}")
    assert str(hf / layout.HF_LEGACY_FILE) in line and "refused to load" in line
    assert not marker.exists()


def two_fsdp_ranks(manifest, run, *extra: str):
    """The real 2-rank launch (`launch/pretrain.py --nproc_per_node 2`) of a tiny fsdp run."""
    args = ["--nproc_per_node", "2", *tiny_overrides(manifest, run, "parallel.strategy=fsdp", "logging.tensorboard=false",
                                                     "train.steps=2", *extra)]
    return subprocess.run([PYTHON, LAUNCH, *args], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def fsdp_step(manifest, tmp_path_factory):
    run = tmp_path_factory.mktemp("fsdp") / "run"
    done = two_fsdp_ranks(manifest, run)
    assert done.returncode == 0, done.stderr[-2000:]
    return run / "checkpoints" / STEP


@needs_root
def test_disk_full_in_an_fsdp_save_is_one_line_from_two_ranks(manifest, fsdp_step, tmp_path, figure):
    """A disk with room for the run's small files but not for DCP's shards: every rank's save
    fails (DCP's CheckpointException carries each rank's OSError); one line, exit 2."""
    with tmpfs(tmp_path / "disk", size="128k") as disk:
        done = two_fsdp_ranks(manifest, disk / "run")
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    figure(f"exit {done.returncode}; {len(lines)} line: {lines[0] if lines else done.stderr[-500:]}")
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"cannot write checkpoint {disk / 'run' / 'checkpoints' / STEP}: No space left on device" in lines[0]
    assert "newest complete checkpoint: none" in lines[0]


def test_a_damaged_distcp_file_is_one_line(fsdp_step, tmp_path, capsys, figure):
    run = tmp_path / "run"
    shutil.copytree(fsdp_step.parent.parent, run)
    shard = sorted((run / "checkpoints" / STEP).glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:16])  # cut short: what a copy or a disk that failed leaves
    line = error_line(capsys, cli.export_main([str(run), str(tmp_path / "export")]))
    figure(line)
    assert str(shard) in line and not (tmp_path / "export").exists()

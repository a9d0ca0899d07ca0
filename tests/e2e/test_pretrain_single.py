"""Pretraining end to end in one process: checkpoints, exact resume, export, skips, refusals."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt_vision import checkpoint as ckpt
from gpt_vision.config_loader import load_config
from gpt_vision.distributed import DistEnv
from gpt_vision.errors import UserError
from gpt_vision.export import export_checkpoint, load_pretrained
from gpt_vision.run_configs import PretrainConfig
from gpt_vision.tasks.pretrain import run_pretraining
from gpt_vision.train import loop, preemption
from tests.helpers.toydata import tiny_overrides, write_toy_shards

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                 master_port=29500, launcher="python")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("shards"))


def pretrain(manifest, run_dir, *extra, fault_injector=None):
    cfg = load_config(PretrainConfig, None, tiny_overrides(manifest, run_dir, "deterministic=true", *extra))
    preemption.clear()
    return run_pretraining(cfg, SINGLE, fault_injector=fault_injector)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(run_dir).model.state_dict()


def stop_at(step_to_stop: int):
    def inject(step, strategy, loss):
        if step + 1 == step_to_stop:
            preemption.request_stop("test")
        return loss
    return inject


def test_resume_after_stop_is_bitwise_identical(manifest, tmp_path):
    whole = tmp_path / "whole"
    pretrain(manifest, whole)
    split = tmp_path / "split"
    first = pretrain(manifest, split, fault_injector=stop_at(3))
    assert first.stopped_early and first.state.step == 3
    assert ckpt.latest_complete(split / "checkpoints").name == "step-0000003"
    second = pretrain(manifest, split)
    assert not second.stopped_early and second.state.step == 8
    assert second.state.samples == 8 * 8
    assert losses(split) == losses(whole)  # bitwise: same floats, every step
    a, b = final_weights(whole), final_weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_loader_workers_sees_the_same_data(manifest, tmp_path):
    whole = tmp_path / "whole"
    pretrain(manifest, whole, "data.num_workers=2", "train.steps=6")
    split = tmp_path / "split"
    pretrain(manifest, split, "data.num_workers=2", "train.steps=6", fault_injector=stop_at(3))
    pretrain(manifest, split, "data.num_workers=2", "train.steps=6")
    assert losses(split) == losses(whole)


def test_checkpoints_rotate_and_export_equals_the_trained_model(manifest, tmp_path):
    run = tmp_path / "run"
    pretrain(manifest, run, "checkpoint.keep_last=2")
    steps = [p.name for p in ckpt.complete_steps(run / "checkpoints")]
    assert steps == ["step-0000006", "step-0000008"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000008"
    meta = ckpt.read_meta(run / "checkpoints" / "step-0000008")
    assert meta["step"] == 8 and meta["samples"] == 64 and meta["world_size"] == 1 and meta["strategy"] == "single"
    out = export_checkpoint(run, tmp_path / "export")
    exported = load_file(str(out / "model.safetensors"))
    trained = final_weights(run)
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in exported)
    assert (out / "palette.npy").is_file() and (out / "config.yaml").is_file()
    with pytest.raises(UserError, match="not empty"):
        export_checkpoint(run, out)


def test_incomplete_newer_step_is_ignored_on_resume(manifest, tmp_path):
    run = tmp_path / "run"
    pretrain(manifest, run, fault_injector=stop_at(4))
    partial = run / "checkpoints" / "step-0000006"
    partial.mkdir()
    (partial / "meta.json").write_text("{}")  # no COMMITTED marker: a save that died
    result = pretrain(manifest, run)
    assert result.state.step == 8
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]  # resumed at 4, not 6


def test_non_finite_loss_is_skipped_and_weights_unchanged(manifest, tmp_path):
    seen = {}

    def poison(step, strategy, loss):
        if step == 2:
            seen["before"] = {k: v.clone() for k, v in strategy.unwrapped.state_dict().items()}
            return loss * float("nan")
        if step == 3 and "after" not in seen:
            seen["after"] = {k: v.clone() for k, v in strategy.unwrapped.state_dict().items()}
        return loss

    run = tmp_path / "run"
    result = pretrain(manifest, run, fault_injector=poison)
    assert result.state.skipped_steps == 1 and result.state.step == 8
    assert all(torch.equal(seen["before"][k], seen["after"][k]) for k in seen["before"])


def test_consecutive_non_finite_steps_stop_with_a_good_checkpoint(manifest, tmp_path):
    good = {}

    def poison(step, strategy, loss):
        if step == 4:
            good.update({k: v.clone() for k, v in strategy.unwrapped.state_dict().items()})
        return loss * float("inf") if step >= 4 else loss

    run = tmp_path / "run"
    with pytest.raises(loop.NonFiniteLossError, match="3 consecutive steps"):
        pretrain(manifest, run, "train.max_consecutive_skips=3", fault_injector=poison)
    latest = ckpt.latest_complete(run / "checkpoints")
    state = load_pretrained(latest).model.state_dict()
    assert all(torch.equal(state[k], good[k]) for k in good)  # skipped steps never touched the weights


def test_existing_run_is_not_overwritten_without_resume(manifest, tmp_path):
    run = tmp_path / "run"
    pretrain(manifest, run, "train.steps=2", "schedule.warmup_steps=1")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(UserError, match="already holds a run"):
        pretrain(manifest, run, "train.steps=2", "schedule.warmup_steps=1", "checkpoint.resume=never")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_resume_refuses_a_different_model(manifest, tmp_path):
    run = tmp_path / "run"
    pretrain(manifest, run, fault_injector=stop_at(2))
    with pytest.raises(UserError, match="different model"):
        pretrain(manifest, run, "model.n_layer=3")


def test_global_batch_mismatch_is_one_clear_line(manifest, tmp_path):
    with pytest.raises(UserError, match="global_batch_size=24 but micro_batch_size"):
        pretrain(manifest, tmp_path / "run", "train.global_batch_size=24")


def test_resume_with_dropout_restores_the_global_rng(manifest, tmp_path):
    whole = tmp_path / "whole"
    pretrain(manifest, whole, "model.dropout=0.1")
    split = tmp_path / "split"
    pretrain(manifest, split, "model.dropout=0.1", fault_injector=stop_at(3))
    pretrain(manifest, split, "model.dropout=0.1")
    assert losses(split) == losses(whole)


def test_compiled_blocks_train_the_same_model(manifest, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    pretrain(manifest, eager, "train.steps=3", "schedule.warmup_steps=1", "deterministic=false")
    pretrain(manifest, compiled, "train.steps=3", "schedule.warmup_steps=1", "deterministic=false", "train.compile=true")
    a, b = losses(eager), losses(compiled)
    assert sorted(b) == [1, 2, 3]
    assert all(b[s] == pytest.approx(a[s], rel=1e-4) for s in a)
    # torch.compile leaves the state-dict keys alone: checkpoints are interchangeable.
    assert final_weights(eager).keys() == final_weights(compiled).keys()

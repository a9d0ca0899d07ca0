"""train.time_budget_min: steps planned from measured step times, recorded, and kept on resume."""
import json

import yaml

from gpt_vision import checkpoint as ckpt
from gpt_vision.config_loader import load_config
from gpt_vision.distributed import DistEnv
from gpt_vision.optim import ScheduleConfig, learning_rate
from gpt_vision.run_configs import PretrainConfig
from gpt_vision.tasks.pretrain import run_pretraining
from gpt_vision.train import preemption
from gpt_vision.train.budget import MEASURED_STEPS, WARMUP_STEPS
from tests.helpers.toydata import tiny_overrides, write_toy_shards

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                 master_port=29500, launcher="python")
PLANNED_AT = WARMUP_STEPS + MEASURED_STEPS


def pretrain(manifest, run_dir, stop_at_step, *extra):
    def inject(step, strategy, loss):
        if step + 1 == stop_at_step:
            preemption.request_stop("test")
        return loss

    cfg = load_config(PretrainConfig, None, tiny_overrides(manifest, run_dir, "checkpoint.every=1000", *extra))
    preemption.clear()
    return run_pretraining(cfg, SINGLE, fault_injector=inject)


def test_budget_plans_steps_once_and_resume_keeps_them(tmp_path):
    manifest = write_toy_shards(tmp_path / "shards")
    run = tmp_path / "run"
    first = pretrain(manifest, run, PLANNED_AT + 2, "train.time_budget_min=1")
    assert first.stopped_early and first.state.step == PLANNED_AT + 2
    planned = yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"]
    assert planned > PLANNED_AT + 4 and planned != 8  # not the configured train.steps
    meta = ckpt.read_meta(ckpt.latest_complete(run / "checkpoints"))
    assert meta["planned_steps"] == planned and meta["config"]["train"]["steps"] == planned

    # Another budget on resume changes nothing: the plan is the checkpoint's.
    second = pretrain(manifest, run, PLANNED_AT + 4, "train.time_budget_min=100")
    assert second.stopped_early and second.state.step == PLANNED_AT + 4
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == planned
    assert ckpt.read_meta(ckpt.latest_complete(run / "checkpoints"))["planned_steps"] == planned
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if r["split"] == "train"}
    schedule = ScheduleConfig(warmup_steps=2)
    for step in range(PLANNED_AT + 1, PLANNED_AT + 5):  # lr of 0-based step s is logged at s + 1
        assert lrs[step] == learning_rate(step - 1, planned, 3e-3, schedule)

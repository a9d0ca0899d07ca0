"""The Trainer in this process on the single strategy, with a tiny model and a fake loader: the
loss falls, checkpoints follow `checkpoint.every`, and grad_accum=2 equals one batch twice as big."""
import json

import pytest
import torch
from torch import nn

from gpt_vision.checkpoint import CheckpointConfig, CheckpointManager
from gpt_vision.optim import OptimConfig, ScheduleConfig
from gpt_vision.parallel import BatchLayout, ParallelConfig, build_strategy
from gpt_vision.train.config import LoggingConfig, TrainConfig
from gpt_vision.train.loop import Trainer
from gpt_vision.train.metrics import MetricsLogger

FEATURES = 6
TRUE_WEIGHTS = torch.linspace(-1, 1, FEATURES)


class FakeLoader:
    """Rows of a fixed linear regression problem, `rows` per batch, resumable by position."""

    def __init__(self, rows: int, merge: int = 1):
        self.rows, self.merge, self.position = rows, merge, 0

    def batch(self, index: int) -> dict:
        x = torch.randn(self.rows, FEATURES, generator=torch.Generator().manual_seed(index))
        return {"x": x, "y": x @ TRUE_WEIGHTS}

    def __iter__(self):
        while True:
            parts = [self.batch(self.position * self.merge + i) for i in range(self.merge)]
            self.position += 1
            yield {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def regression_loss(model, batch, generator):
    return (model(batch["x"]).squeeze(-1) - batch["y"]).square().mean()


def make_trainer(run_dir, *, steps=30, micro=8, grad_accum=1, merge=1, every=1000, bits=None, lr=0.05):
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    train_cfg = TrainConfig(steps=steps, micro_batch_size=micro, grad_accum=grad_accum, log_every=1,
                            eval_every=0, max_consecutive_skips=5)
    optim_cfg = OptimConfig(lr=lr, weight_decay=0.0, grad_clip=0.0, implementation="foreach")
    strategy = build_strategy(ParallelConfig(precision="fp32"), 0, 1, 0, BatchLayout(micro, grad_accum))
    strategy.setup(nn.Linear(FEATURES, 1), optim_cfg)
    logger = MetricsLogger(run_dir, LoggingConfig(tensorboard=False, jsonl=True, progress=False), True, steps, 0)
    return Trainer(
        strategy=strategy, objective=regression_loss, train_loader=FakeLoader(micro, merge), train_cfg=train_cfg,
        optim_cfg=optim_cfg, schedule_cfg=ScheduleConfig(kind="constant", warmup_steps=0),
        checkpoints=CheckpointManager(run_dir, CheckpointConfig(every=every, keep_last=10), strategy),
        logger=logger, seed=0, flops_per_sample=1.0, tokens_per_sample=1,
        bits_per_dim=bits or (lambda loss: None), peak_flops=0.0, meta={"config": {}},
    )


def test_the_loss_falls_and_each_logged_window_reports_it(tmp_path):
    result = make_trainer(tmp_path, steps=30, bits=lambda loss: loss / 2).run()
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 30 and result.state.step == 30 and result.state.samples == 30 * 8
    assert sum(losses[-5:]) / 5 < 0.05 * sum(losses[:5]) / 5
    assert result.history[-1]["bits_per_dim"] == pytest.approx(losses[-1] / 2)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in logged if row["split"] == "train"]
    assert [row["step"] for row in train_rows] == list(range(1, 31))
    assert train_rows[-1]["loss"] == pytest.approx(losses[-1])


def test_checkpoints_follow_checkpoint_every_and_the_last_step(tmp_path):
    result = make_trainer(tmp_path, steps=10, every=4).run()
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert saved == ["step-0000004", "step-0000008", "step-0000010"]
    assert result.last_checkpoint.name == "step-0000010"
    meta = json.loads((result.last_checkpoint / "meta.json").read_text())
    assert meta["loop"]["step"] == 10 and meta["samples"] == 80


def test_grad_accum_two_matches_one_micro_batch_twice_as_big(tmp_path):
    accumulated = make_trainer(tmp_path / "a", steps=6, micro=4, grad_accum=2)
    whole = make_trainer(tmp_path / "b", steps=6, micro=8, grad_accum=1, merge=2)
    whole.loader.rows = 4  # two 4-row batches concatenated: the same rows as the two micro batches
    accumulated.run(), whole.run()
    for a, b in zip(accumulated.strategy.unwrapped.parameters(), whole.strategy.unwrapped.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(accumulated.strategy.unwrapped.weight, make_trainer(tmp_path / "c").strategy.unwrapped.weight)

"""The learning-rate schedule (gpt_vision.optim.learning_rate) at exact steps: warmup, decay, floor."""
import math

import pytest

from gpt_vision.optim import ScheduleConfig, learning_rate

LR = 1e-3


def test_warmup_rises_linearly_to_the_base_lr_on_its_last_step():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [learning_rate(s, 100, LR, cfg) for s in range(4)] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR])


def test_cosine_falls_from_the_base_lr_to_min_lr_ratio_at_the_last_step():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    assert learning_rate(10, total, LR, cfg) == pytest.approx(LR)  # first step after warmup
    assert learning_rate(60, total, LR, cfg) == pytest.approx(0.1 * LR + 0.9 * LR * 0.5)  # halfway: the mean
    assert learning_rate(35, total, LR, cfg) == pytest.approx(0.1 * LR + 0.9 * LR * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(total, total, LR, cfg) == pytest.approx(0.1 * LR)
    assert learning_rate(total + 50, total, LR, cfg) == pytest.approx(0.1 * LR)  # never below the floor


def test_linear_decay_and_constant():
    linear = ScheduleConfig(kind="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert [learning_rate(s, 4, LR, linear) for s in range(5)] == pytest.approx([LR, 0.75 * LR, 0.5 * LR, 0.25 * LR, 0.0])
    constant = ScheduleConfig(kind="constant", warmup_steps=2, min_lr_ratio=0.5)
    assert [learning_rate(s, 10, LR, constant) for s in (0, 1, 2, 9)] == pytest.approx([LR / 2, LR, LR, LR])


def test_the_schedule_is_monotone_after_warmup():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=5, min_lr_ratio=0.2)
    values = [learning_rate(s, 50, LR, cfg) for s in range(5, 51)]
    assert all(a >= b for a, b in zip(values, values[1:]))

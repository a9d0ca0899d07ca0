"""train.time_budget_min: the plan from measured step times, and when the measurement is complete."""
import pytest

from gpt_vision.train.budget import MARGIN, MEASURED_STEPS, WARMUP_STEPS, StepBudget, plan_steps


@pytest.mark.parametrize("budget, elapsed, done, step_s, expected", [
    (600.0, 60.0, 10, 1.0, 10 + int(600 * (1 - MARGIN) - 60)),  # 480 more steps of 1 s
    (60.0, 10.0, 10, 0.5, 10 + 88),  # (54 - 10) / 0.5
    (60.0, 58.0, 10, 0.5, 10),  # budget (after the margin) already spent: stop now
    (3600.0, 0.0, 0, 7.0, 462),  # floor(3240 / 7)
])
def test_plan_fits_the_budget_after_the_margin(budget, elapsed, done, step_s, expected):
    steps = plan_steps(budget, elapsed, done, step_s)
    assert steps == expected
    assert elapsed + (steps - done) * step_s <= budget * (1 - MARGIN) or steps == done


def test_measurement_skips_the_warmup_and_reports_once():
    budget = StepBudget(1.0, started=0.0)
    times = [9.0] * WARMUP_STEPS + [1.0, 3.0] * (MEASURED_STEPS // 2) + [100.0]
    ready = [budget.record(t) for t in times]
    assert ready.index(True) == WARMUP_STEPS + MEASURED_STEPS - 1 and ready.count(True) == 1
    assert budget.step_seconds() == pytest.approx(2.0)
    assert budget.budget_s == 60.0

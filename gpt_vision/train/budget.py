"""`train.time_budget_min`: plan `train.steps` to fit a wall-clock budget, measured on the run.

The learning-rate schedule depends on the total number of steps, so the plan is made once, early
(after a few warm-up steps, from the slowest rank's mean step time), and then recorded in the
run's config.yaml and in every checkpoint: a resumed run keeps the planned steps and never
plans again.
"""
from __future__ import annotations

import time

WARMUP_STEPS = 2  # not timed: the first steps pay for allocation, data-loader start and compilation
MEASURED_STEPS = 8
MARGIN = 0.1  # of the budget, kept for evaluation, checkpoints and the final save


def plan_steps(budget_s: float, elapsed_s: float, done_steps: int, step_s: float, margin: float = MARGIN) -> int:
    """Total steps for the run: those done, plus as many more of `step_s` seconds as fit into
    what the budget leaves after `elapsed_s` and the margin (never fewer than those done)."""
    left = budget_s * (1.0 - margin) - elapsed_s
    return done_steps + max(0, int(left // step_s))


class StepBudget:
    """Times the steps after the warm-up; `record` says when enough were measured to plan."""

    def __init__(self, budget_min: float, started: float | None = None):
        self.budget_s = budget_min * 60.0
        self.started = time.perf_counter() if started is None else started
        self.seen = 0
        self.measured: list[float] = []

    @property
    def steps_to_plan(self) -> int:
        return WARMUP_STEPS + MEASURED_STEPS

    def record(self, step_seconds: float) -> bool:
        """Add one step's time; True exactly once, when the measurement is complete."""
        self.seen += 1
        if self.seen > WARMUP_STEPS and len(self.measured) < MEASURED_STEPS:
            self.measured.append(step_seconds)
            return len(self.measured) == MEASURED_STEPS
        return False

    def step_seconds(self) -> float:
        return sum(self.measured) / len(self.measured)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

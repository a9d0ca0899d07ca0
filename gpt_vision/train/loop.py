"""The training loop, written once: it sees a Strategy, an objective and a loader, never a backend."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from gpt_vision.checkpoint import CheckpointManager, rng_state, set_rng_state
from gpt_vision.errors import RankLocalError, UserError
from gpt_vision.optim import OptimConfig, ScheduleConfig, learning_rate
from gpt_vision.parallel.base import Strategy
from gpt_vision.train import preemption
from gpt_vision.train.budget import StepBudget, plan_steps
from gpt_vision.train.config import TrainConfig
from gpt_vision.train.metrics import MetricsLogger, memory_bytes


class NonFiniteLossError(UserError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class NonFiniteStateError(UserError):
    """Parameters or optimizer state are not finite: such a state is never saved or resumed."""


class CollectiveTimeoutError(RankLocalError):
    """Another rank stopped taking part in a step (hung, stalled or gone) for parallel.timeout_s."""


@dataclass
class LoopState:
    """Counters that define where training is; saved in every checkpoint."""

    step: int = 0
    samples: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0


@dataclass
class LoopResult:
    state: LoopState
    stopped_early: bool
    stop_reason: str = ""
    last_checkpoint: Path | None = None
    history: list[dict] = field(default_factory=list)


def step_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """Masks and prefix lengths depend on (seed, step, rank, micro batch) only: resumable exactly."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step * 10_007 + rank * 101 + micro) % (2**63 - 1))
    return gen


def record_batch_keys(step: int, micro: int, rank: int, batch: dict) -> None:
    """Debug hook (reliability drills): with `GPTV_DEBUG_BATCH_KEYS=<dir>` each rank appends the
    sample keys it consumes to `<dir>/keys-rank<r>.jsonl`, to prove resume neither repeats nor
    skips a sample."""
    directory = os.environ.get("GPTV_DEBUG_BATCH_KEYS")
    if directory:
        with open(Path(directory) / f"keys-rank{rank}.jsonl", "a") as handle:
            handle.write(json.dumps({"step": step, "micro": micro, "keys": batch.get("key", [])}) + "\n")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def micro_batch(strategy: Strategy, is_boundary: bool, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One micro batch under the Strategy contract: `forward()` under autocast, then backward,
    both inside `accumulate` (engines decide during backward whether to reduce gradients)."""
    with strategy.accumulate(is_boundary):
        with strategy.autocast():
            loss = forward()
        strategy.backward(loss)
    return loss.detach()


class Trainer:
    """Runs optimizer steps until `train.steps`, saving, evaluating and logging on the way."""

    def __init__(
        self,
        *,
        strategy: Strategy,
        objective: Callable,
        train_loader,
        train_cfg: TrainConfig,
        optim_cfg: OptimConfig,
        schedule_cfg: ScheduleConfig,
        checkpoints: CheckpointManager,
        logger: MetricsLogger,
        seed: int,
        flops_per_sample: float,
        tokens_per_sample: int,
        bits_per_dim: Callable[[float], float | None],
        peak_flops: float,
        meta: dict[str, Any],
        checkpoint_files: dict[str, bytes] | None = None,
        evaluate: Callable[[], dict[str, float]] | None = None,
        probe: Callable[[], dict[str, float]] | None = None,
        sample_images: Callable[[int], None] | None = None,
        fault_injector: Callable[[int, Strategy], None] | None = None,
        budget: StepBudget | None = None,
        on_plan: Callable[[int], None] | None = None,
    ):
        self.strategy = strategy
        self.objective = objective
        self.loader = train_loader
        self.cfg = train_cfg
        self.optim_cfg = optim_cfg
        self.schedule_cfg = schedule_cfg
        self.checkpoints = checkpoints
        self.logger = logger
        self.seed = seed
        self.flops_per_sample = flops_per_sample
        self.tokens_per_sample = tokens_per_sample
        self.bits_per_dim = bits_per_dim
        self.peak_flops = peak_flops
        self.meta = meta
        self.checkpoint_files = checkpoint_files or {}
        self.evaluate = evaluate
        self.probe = probe
        self.sample_images = sample_images
        self.fault_injector = fault_injector
        self.budget = budget
        self.on_plan = on_plan
        # With a budget, train.steps is provisional until the plan: the measurement must finish.
        self.total_steps = max(train_cfg.steps, budget.steps_to_plan) if budget else train_cfg.steps
        self.state = LoopState()
        self.last_finite_checkpoint: Path | None = None  # saved or resumed by this run, checked finite
        self.global_batch = train_cfg.micro_batch_size * train_cfg.grad_accum * strategy.world_size

    # ---- checkpoints -------------------------------------------------------------------------

    def save(self) -> Path:
        """Write a checkpoint; a non-finite state is refused on every rank before anything is written."""
        if not self.strategy.state_is_finite():
            raise NonFiniteStateError(
                f"step {self.state.step}: parameters or optimizer state are not finite (lower optim.lr?); "
                f"no checkpoint written for it; {self._newest_finite()}"
            )
        started = time.perf_counter()
        rank_state = {"data": self.loader.state_dict(), "rng": rng_state(), "world_size": self.strategy.world_size}
        meta = dict(self.meta, samples=self.state.samples, loop=vars(self.state))
        path = self.checkpoints.save(self.state.step, meta, rank_state, self.checkpoint_files)
        self.last_finite_checkpoint = path
        self.logger.scalars(self.state.step, {"checkpoint_seconds": time.perf_counter() - started}, "checkpoint")
        return path

    def restore(self, step_dir: Path) -> None:
        """Load model/optimizer through the strategy, then counters, RNG and data position."""
        self.strategy.load(step_dir)
        if not self.strategy.state_is_finite():
            raise NonFiniteStateError(
                f"checkpoint {step_dir} holds non-finite parameters or optimizer state; "
                "resume from an earlier step directory (checkpoint.resume=PATH) into a new run directory"
            )
        self.last_finite_checkpoint = step_dir
        meta, rank_state = self.checkpoints.load_rank_state(step_dir)
        self.state = LoopState(**meta["loop"])
        if rank_state is not None:
            if not rank_state.get("foreign_world_size"):
                set_rng_state(rank_state["rng"])
            self.loader.load_state_dict(rank_state["data"])
        self.logger.message(f"resumed from {step_dir} at step {self.state.step} ({self.state.samples} samples)")

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> LoopResult:
        """The loop; a collective timed out by a stalled rank becomes one line naming the step."""
        try:
            return self._run()
        except RuntimeError as error:
            if self.strategy.world_size == 1 or "timed out" not in str(error).lower():
                raise
            first = str(error).strip().splitlines()[0]
            raise CollectiveTimeoutError(
                f"step {self.state.step + 1}: rank {self.strategy.rank} waited parallel.timeout_s="
                f"{self.strategy.cfg.timeout_s}s for another rank that stopped participating ({first})"
            ) from None

    def _run(self) -> LoopResult:
        cfg, strategy = self.cfg, self.strategy
        batches = iter(self.loader)
        result = LoopResult(self.state, stopped_early=False)
        window_start, window_steps = time.perf_counter(), 0
        window_loss = torch.zeros((), device=strategy.device)
        window_skips = torch.zeros((), device=strategy.device)
        window_max_consecutive = torch.zeros((), device=strategy.device)
        consecutive = torch.full((), float(self.state.consecutive_skips), device=strategy.device)
        last_norm = torch.zeros(())
        while self.state.step < self.total_steps:
            step = self.state.step
            step_started = time.perf_counter()
            lr = learning_rate(step, self.total_steps, self.optim_cfg.lr, self.schedule_cfg)
            loss_sum = torch.zeros((), device=strategy.device)
            for micro in range(cfg.grad_accum):
                batch = to_device(next(batches), strategy.device)
                record_batch_keys(step, micro, strategy.rank, batch)
                generator = step_generator(self.seed, step, strategy.rank, micro, torch.device("cpu"))
                loss = micro_batch(strategy, micro == cfg.grad_accum - 1,
                                   lambda: self._micro_loss(step, batch, generator))
                loss_sum += loss.float()
            outcome = strategy.step(lr)
            skipped = outcome.skipped.to(strategy.device).float()
            consecutive = (consecutive + 1) * skipped
            window_max_consecutive = torch.maximum(window_max_consecutive, consecutive)
            window_skips += skipped
            window_loss += torch.where(skipped.bool(), torch.zeros_like(loss_sum), loss_sum / cfg.grad_accum)
            last_norm = outcome.grad_norm
            self.state.step += 1
            self.state.samples += self.global_batch
            window_steps += 1
            if self.budget is not None and self.budget.record(time.perf_counter() - step_started):
                self._plan_steps()
            done = self.state.step >= self.total_steps
            stop_now = strategy.any_rank(preemption.stop_requested())

            if window_steps >= cfg.log_every or done or stop_now:
                skips = int(window_skips.item())
                self.state.skipped_steps += skips
                self.state.consecutive_skips = int(consecutive.item())
                good_steps = window_steps - skips
                elapsed = time.perf_counter() - window_start
                mean_loss = (window_loss.item() / good_steps) if good_steps else float("nan")
                scalars = self._window_scalars(mean_loss, lr, float(last_norm), window_steps, elapsed, skips)
                result.history.append({"step": self.state.step, **scalars})
                self.logger.scalars(self.state.step, scalars)
                self.logger.advance(window_steps, {"loss": mean_loss, "lr": lr})
                if window_max_consecutive.item() >= cfg.max_consecutive_skips:
                    raise NonFiniteLossError(
                        f"{int(window_max_consecutive.item())} consecutive steps had a non-finite loss or gradient "
                        f"norm (limit train.max_consecutive_skips={cfg.max_consecutive_skips}) before step "
                        f"{self.state.step}; {self._newest_finite()}"
                    )
                window_start, window_steps = time.perf_counter(), 0
                window_loss.zero_(), window_skips.zero_(), window_max_consecutive.zero_()

            if self.evaluate is not None and cfg.eval_every and (self.state.step % cfg.eval_every == 0 or done):
                self.logger.scalars(self.state.step, self.evaluate(), "val")
            if self.probe is not None and cfg.probe_every and (self.state.step % cfg.probe_every == 0 or done):
                self.logger.scalars(self.state.step, self.probe(), "probe")
            if self.sample_images is not None and cfg.sample_every and self.state.step % cfg.sample_every == 0:
                self.sample_images(self.state.step)
            if stop_now:
                result.stopped_early = True
                result.stop_reason = preemption.stop_reason() or "another rank was signalled"
                result.last_checkpoint = self.save()
                self.logger.message(f"stopped at step {self.state.step} ({result.stop_reason}); checkpoint {result.last_checkpoint}")
                break
            if self.checkpoints.due(self.state.step) or done:
                result.last_checkpoint = self.save()
        result.state = self.state
        return result

    def _plan_steps(self) -> None:
        """Fix train.steps for the time budget from the slowest rank's step time; the plan
        travels in every checkpoint's meta (and config.yaml via `on_plan`), so resume keeps it."""
        world, rank = self.strategy.world_size, self.strategy.rank
        mine = torch.zeros(2, world, dtype=torch.float64)
        mine[:, rank] = torch.tensor([self.budget.step_seconds(), self.budget.elapsed()], dtype=torch.float64)
        step_s, elapsed = self.strategy.all_reduce_sum(mine).max(dim=1).values.tolist()
        self.total_steps = plan_steps(self.budget.budget_s, elapsed, self.state.step, step_s)
        self.meta["config"]["train"]["steps"] = self.total_steps
        self.meta["planned_steps"] = self.total_steps
        self.logger.message(
            f"time budget {self.budget.budget_s / 60:g} min: {step_s:.3f} s per step (slowest rank), "
            f"{elapsed:.0f} s spent, planned train.steps={self.total_steps}")
        if self.on_plan is not None:
            self.on_plan(self.total_steps)

    def _newest_finite(self) -> str:
        if self.last_finite_checkpoint is None:
            return "no finite checkpoint was saved yet"
        return f"the newest finite checkpoint is {self.last_finite_checkpoint}"

    def _micro_loss(self, step: int, batch: dict, generator: torch.Generator) -> torch.Tensor:
        loss = self.objective(self.strategy.module, batch, generator)
        return loss if self.fault_injector is None else self.fault_injector(step, self.strategy, loss)

    def _window_scalars(self, loss: float, lr: float, grad_norm: float, steps: int, seconds: float, skips: int) -> dict:
        samples_per_s = steps * self.global_batch / max(seconds, 1e-9)
        flops = samples_per_s * self.flops_per_sample
        scalars = {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": samples_per_s,
            "tokens_per_s": samples_per_s * self.tokens_per_sample,
            "model_flops_per_s": flops,
            "mfu": flops / (self.peak_flops * self.strategy.world_size) if self.peak_flops else 0.0,
            "memory_gb": memory_bytes(self.strategy.device) / 2**30,
            "skipped_steps": float(skips),
            "samples": float(self.state.samples),
        }
        if (bits := self.bits_per_dim(loss)) is not None:
            scalars["bits_per_dim"] = bits
        for kind, count in getattr(self.loader, "bad_samples", {}).items():
            scalars[f"bad_samples/{kind}"] = float(count)
        return scalars

"""Pretraining: builds the run's pieces from their config sections and hands them to the Trainer."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from gpt_vision import checkpoint as ckpt
from gpt_vision.config_loader import dump_config, to_dict
from gpt_vision.data.manifest import load_manifest
from gpt_vision.data.palette import Palette, load_or_fit_palette
from gpt_vision.data.stream import ShardLoader
from gpt_vision.distributed import DistEnv, exit_with_launcher, init_process_group
from gpt_vision.errors import UserError
from gpt_vision.layout import CHECKPOINTS_DIR, CONFIG_FILE, PALETTE_FILE, resolve_step_dir
from gpt_vision.model import ModelConfig, bits_per_dim, build_model, build_objective, flops_per_token
from gpt_vision.parallel import BatchLayout, build_strategy
from gpt_vision.parallel.base import Strategy
from gpt_vision.run_configs import PretrainConfig
from gpt_vision.tasks.online_probe import OnlineProbe
from gpt_vision.train.budget import StepBudget
from gpt_vision.runlock import DirectoryLock, describe, lock_directory
from gpt_vision.train.loop import LoopResult, Trainer, to_device
from gpt_vision.train.metrics import MetricsLogger, image_grid, measure_matmul_flops


def resolve_model_config(cfg: PretrainConfig, manifest) -> ModelConfig:
    """The model's geometry from the shard manifest and vocabulary from the tokenizer, checked
    before any expensive work: channels and image size left at 0 are filled from the data, given
    ones must agree with it, and the splits the run reads must exist."""
    manifest.shards(cfg.data.train_split)
    if cfg.train.eval_every:
        manifest.shards(cfg.data.val_split)
    height, width = manifest.image_size
    if height != width:
        raise UserError(f"{manifest.location}: images are {height}x{width}; the model needs square images (use --resize)")
    fills = {"vocab_size": cfg.tokenizer.clusters, "image_size": height, "channels": manifest.channels}
    for key, actual in fills.items():
        given = getattr(cfg.model, key)
        if given and given != actual:
            raise UserError(f"config key 'model.{key}' is {given} but the data/palette give {actual}"
                            + (" (leave it 0 to follow the data)" if key != "vocab_size" else ""))
    model = dataclasses.replace(cfg.model.resolved(), **fills)
    model.check()
    return model


def check_palette_fits(palette: Palette, model: ModelConfig) -> None:
    if (palette.size, palette.channels) != (model.vocab_size, model.channels):
        raise UserError(f"the palette has {palette.size} colors x {palette.channels} channels, the model expects "
                        f"{model.vocab_size} x {model.channels}")


def prepare_run_dir(cfg: PretrainConfig, strategy: Strategy) -> tuple[Path, Path | None, DirectoryLock | None]:
    """Create or reopen the run folder; returns it, the step to resume from (if any) and, on
    rank 0, the lock that makes this run its only writer (release it when the run ends).

    A run folder that already holds a run is reused only when resuming, so two runs never
    mix their checkpoints; a run folder another live run holds is refused before any write.
    """
    run_dir = cfg.resolved_run_dir
    resume_from, lock, error = None, None, None
    if strategy.rank == 0:
        try:
            _choose_resume(cfg, run_dir)  # refuse a bad request before creating anything
            lock = lock_directory(run_dir, "run directory")
            if lock.stale:
                print(f"run directory {run_dir}: taking over the lock left by {describe(lock.stale)}, "
                      "which ended without releasing it", file=sys.stderr, flush=True)
            resume_from = _choose_resume(cfg, run_dir)  # again under the lock: a holder may just have saved
            lock.record()
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except UserError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"run directory {run_dir} is not writable: {exc.strerror}"
        if error and lock is not None:
            lock.release()
            lock = None
    error, resume_from = strategy.broadcast_object((error, str(resume_from) if resume_from else None))
    if error:
        raise UserError(error)
    return run_dir, Path(resume_from) if resume_from else None, lock


def _choose_resume(cfg: PretrainConfig, run_dir: Path) -> Path | None:
    mode = cfg.checkpoint.resume
    existing = ckpt.latest_complete(run_dir / CHECKPOINTS_DIR)
    if mode == "never":
        if (run_dir / CONFIG_FILE).exists() or (run_dir / CHECKPOINTS_DIR).exists():
            raise UserError(
                f"run directory {run_dir} already holds a run; choose another name, or set checkpoint.resume=auto to continue it"
            )
        return None
    if mode == "auto":
        return existing
    target = resolve_step_dir(mode)
    if existing is not None and existing.resolve() != target.resolve():
        raise UserError(
            f"run directory {run_dir} already has checkpoints (newest {existing.name}); resume from {target} into a new run directory"
        )
    return target


def _check_same_model(step_dir: Path, model_cfg: ModelConfig) -> None:
    saved = ckpt.read_meta(step_dir).get("model")
    if saved and saved != dataclasses.asdict(model_cfg):
        diff = sorted(k for k in saved if saved[k] != dataclasses.asdict(model_cfg).get(k))
        raise UserError(f"checkpoint {step_dir} was trained with a different model (model.{', model.'.join(diff)} differ)")


def load_palette(cfg: PretrainConfig, strategy: Strategy, run_dir: Path) -> Palette:
    """Rank 0 fits (or reuses) the palette; the others read the copy it leaves in the run folder."""
    error = None
    if strategy.rank == 0:
        try:
            palette = load_or_fit_palette(cfg.data, cfg.tokenizer)
            palette.save(run_dir / PALETTE_FILE)
        except UserError as exc:
            error = str(exc)
    error = strategy.broadcast_object(error)
    if error:
        raise UserError(error)
    return Palette.load(run_dir / PALETTE_FILE)


def configure_determinism(cfg: PretrainConfig) -> None:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def run_pretraining(cfg: PretrainConfig, env: DistEnv, fault_injector=None) -> LoopResult:
    """The whole run on this rank; every rank calls it (a plain `python` run is world size 1)."""
    started = time.perf_counter()
    exit_with_launcher(env)
    init_process_group(env, backend=None if cfg.parallel.backend == "auto" else cfg.parallel.backend,
                       timeout_s=cfg.parallel.timeout_s)
    configure_determinism(cfg)
    train = cfg.train
    strategy = build_strategy(cfg.parallel, env.rank, env.world_size, env.local_rank,
                              BatchLayout(train.micro_batch_size, train.grad_accum))
    actual_global = train.micro_batch_size * train.grad_accum * env.world_size
    if train.global_batch_size and train.global_batch_size != actual_global:
        raise UserError(
            f"train.global_batch_size={train.global_batch_size} but micro_batch_size*grad_accum*world_size = "
            f"{train.micro_batch_size}*{train.grad_accum}*{env.world_size} = {actual_global}; "
            f"set train.grad_accum={train.global_batch_size // (train.micro_batch_size * env.world_size) or 1} "
            "or change the number of processes"
            if train.global_batch_size % (train.micro_batch_size * env.world_size) == 0
            else f"train.global_batch_size={train.global_batch_size} is not divisible by micro_batch_size*world_size "
            f"= {train.micro_batch_size}*{env.world_size}"
        )
    model_cfg = resolve_model_config(cfg, load_manifest(cfg.data.manifest, cfg.data.allow_pipe))
    run_dir, resume_from, lock = prepare_run_dir(cfg, strategy)
    try:
        return _train(cfg, env, strategy, model_cfg, run_dir, resume_from, fault_injector, started)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: PretrainConfig, env: DistEnv, strategy: Strategy, model_cfg: ModelConfig, run_dir: Path,
           resume_from: Path | None, fault_injector, started: float) -> LoopResult:
    """Everything after the run directory is ours: palette, model, strategy, loop."""
    train = cfg.train
    palette = load_palette(cfg, strategy, run_dir)
    check_palette_fits(palette, model_cfg)
    planned = ckpt.read_meta(resume_from).get("planned_steps") if resume_from is not None else None
    if planned:
        train = dataclasses.replace(train, steps=planned)
    resolved = dataclasses.replace(cfg, model=model_cfg, train=train)
    if resume_from is not None:
        _check_same_model(resume_from, model_cfg)
    if strategy.rank == 0:
        dump_config(resolved, run_dir / CONFIG_FILE)

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    if train.compile:
        compile_blocks(model)
    strategy.setup(model, cfg.optim)
    objective = build_objective(model_cfg)
    loader = ShardLoader(cfg.data, cfg.data.train_split, palette, train.micro_batch_size,
                         rank=env.rank, world_size=env.world_size, seed=cfg.seed, train=True)
    start_step = ckpt.read_meta(resume_from)["step"] if resume_from is not None else 0
    logger = MetricsLogger(run_dir, cfg.logging, enabled=env.rank == 0, total_steps=train.steps,
                           start_step=start_step)
    peak = train.peak_flops or measure_matmul_flops(strategy.device, strategy.compute_dtype)
    if train.compile:
        objective = FirstCallTimer(objective, logger)
    tokens = model_cfg.seq_len
    trainer = Trainer(
        strategy=strategy,
        objective=objective,
        train_loader=loader,
        train_cfg=train,
        optim_cfg=cfg.optim,
        schedule_cfg=cfg.schedule,
        checkpoints=ckpt.CheckpointManager(run_dir, cfg.checkpoint, strategy),
        logger=logger,
        seed=cfg.seed,
        flops_per_sample=flops_per_token(model_cfg, tokens) * tokens,
        tokens_per_sample=tokens,
        bits_per_dim=lambda loss: bits_per_dim(loss, model_cfg),
        peak_flops=peak,
        meta={"model": dataclasses.asdict(model_cfg), "config": to_dict(resolved),
              **({"planned_steps": planned} if planned else {})},
        checkpoint_files={PALETTE_FILE: (run_dir / PALETTE_FILE).read_bytes()},
        evaluate=_evaluator(cfg, model_cfg, strategy, objective, palette) if train.eval_every else None,
        probe=OnlineProbe(cfg.online_probe, cfg.data, palette, model_cfg, strategy, train.micro_batch_size,
                          cfg.seed, logger.message) if train.probe_every else None,
        sample_images=_sampler(strategy, model_cfg, palette, logger) if model_cfg.objective == "next_pixel" else None,
        fault_injector=fault_injector,
        budget=StepBudget(train.time_budget_min, started) if train.time_budget_min and not planned else None,
        on_plan=_config_writer(resolved, run_dir) if strategy.rank == 0 else None,
    )
    if resume_from is not None:
        trainer.restore(resume_from)
    try:
        result = trainer.run()
    finally:
        logger.close()
    if result.stopped_early:  # every rank has saved: they exit together (see gpt_vision.cli.run)
        strategy.barrier()
    return result


def _config_writer(resolved: PretrainConfig, run_dir: Path):
    """Rewrites config.yaml with the steps the time budget planned."""

    def write(steps: int) -> None:
        train = dataclasses.replace(resolved.train, steps=steps)
        dump_config(dataclasses.replace(resolved, train=train), run_dir / CONFIG_FILE)

    return write


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each transformer block in place, before the strategy wraps the model.

    Per block rather than the whole model: FSDP shards per block and DeepSpeed/DDP hooks stay
    outside the compiled graphs, and `Module.compile` keeps the state-dict keys unchanged, so
    checkpoints are interchangeable with uncompiled runs. All blocks share one compiled graph.
    """
    for block in model.blocks:
        block.compile(dynamic=False)


class FirstCallTimer:
    """Wraps the objective: logs how long the first micro batch took (forward, backward and,
    with train.compile, the compilation), when the second one starts."""

    def __init__(self, objective, logger: MetricsLogger):
        self.objective = objective
        self.logger = logger
        self.started: float | None = None
        self.reported = False

    def __call__(self, *args, **kwargs):
        if self.started is None:
            self.started = time.perf_counter()
        elif not self.reported:
            self.reported = True
            self.logger.message(
                f"torch.compile: the first micro batch took {time.perf_counter() - self.started:.1f} s "
                "including compilation (later steps: see tokens_per_s)"
            )
        return self.objective(*args, **kwargs)


def _evaluator(cfg: PretrainConfig, model_cfg: ModelConfig, strategy: Strategy, objective, palette: Palette):
    """Mean validation loss over the held-out split, each sample read once across ranks."""

    def evaluate() -> dict[str, float]:
        loader = ShardLoader(cfg.data, cfg.data.val_split, palette, cfg.train.micro_batch_size,
                             rank=strategy.rank, world_size=strategy.world_size, seed=cfg.seed, train=False)
        totals = torch.zeros(2, dtype=torch.float64)
        module = strategy.module
        was_training = module.training
        module.eval()
        with torch.no_grad():
            for index, batch in enumerate(loader):
                if cfg.train.eval_batches and index >= cfg.train.eval_batches:
                    break
                batch = to_device(batch, strategy.device)
                generator = torch.Generator().manual_seed(cfg.seed + index)
                with strategy.autocast():
                    loss = objective(module, batch, generator)
                count = batch["tokens"].shape[0]
                totals += torch.tensor([loss.double().item() * count, count], dtype=torch.float64)
        module.train(was_training)
        totals = strategy.all_reduce_sum(totals)
        loss = float(totals[0] / max(totals[1], 1))
        bits = bits_per_dim(loss, model_cfg)
        return {"loss": loss, **({"bits_per_dim": bits} if bits is not None else {}), "samples": float(totals[1])}

    return evaluate


def _sampler(strategy: Strategy, model_cfg: ModelConfig, palette: Palette, logger: MetricsLogger):
    """Unconditional samples as a TensorBoard image grid, drawn on rank 0 from the full weights."""

    def sample(step: int) -> None:
        state = strategy.full_state_dict()
        if strategy.rank != 0:
            return
        model = build_model(model_cfg)
        model.load_state_dict(state)
        model.eval()
        generator = torch.Generator().manual_seed(step)
        tokens = model.generate(8, generator=generator)
        size = model_cfg.image_size
        pixels = palette.decode(tokens).reshape(8, size, size, palette.channels).numpy()
        logger.image_grid(step, "samples/unconditional", image_grid(pixels, columns=4))

    return sample

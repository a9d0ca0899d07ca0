"""DeepSpeed ZeRO stages 0-3 behind the `Strategy` interface.

deepspeed is imported lazily, inside the functions that need it, so `import gpt_vision` (and
every other strategy) works where it is absent.

Choices that are not obvious from the interface:

* The optimizer is our torch AdamW built from `param_groups`/`adamw_kwargs`, passed as the
  client optimizer; ZeRO 1-3 shard it over flat fp32 partitions, which keeps the update
  element-wise identical to plain torch AdamW (the equivalence tests rely on this).
* Accumulation: `accumulate(is_boundary)` sets DeepSpeed's boundary flag, so the engine reduces
  gradients only at the last micro batch and `step()` calls `engine.step()` once per update.
  `engine.backward` divides by `gradient_accumulation_steps`, which is exactly the interface's
  "scaling by accumulation is ours".
* Non-finite gradients: ZeRO 1-3 compute the global norm over the partitioned gradients
  (all-reduced over the data-parallel group) and, when it is not finite, take the engine's own
  overflow path: gradients cleared, no update, `skipped_steps` counted, on every rank. bf16
  needs `bf16.check_grad_overflow` for that, which we set. Stage 0 has no ZeRO optimizer and
  DeepSpeed would step on NaN, so there the norm of the (already all-reduced, hence identical)
  gradients is computed here and `_GuardedAdamW` declines the update and reports `overflow`,
  which the engine reads to keep its counters coherent.
* Checkpoints live in `<directory>/deepspeed/<TAG>/` and never touch DeepSpeed's `latest`
  (our checkpoint manager owns `latest`). Resuming on another world size converts once to
  DeepSpeed's universal format in `<directory>/deepspeed/universal/` and loads that.
* DeepSpeed's loaders (engine, universal conversion, zero_to_fp32) unpickle with
  `weights_only=False`, and offer no hook to change that for all of them. So before any of them
  sees a directory, `_check_files` opens every `*.pt` in it weights-only with only DeepSpeed's
  few data classes allowed (`_deepspeed_globals`): a file naming anything else is refused with
  a `UserError` and nothing is built from it. The check reads pickles, not storages (mmap).
  It does not guard against a file swapped between the check and DeepSpeed's read; whoever
  can write into the directory during a run can change the run's code anyway.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch
from torch import nn

from gpt_vision.errors import ConfigError, UserError
from gpt_vision.layout import atomic_dir, write_atomic
from gpt_vision.optim import OptimConfig, adamw_kwargs, param_groups, set_lr
from gpt_vision.parallel import safe_load
from gpt_vision.parallel.base import StepResult, Strategy, optimizer_state_tensors

log = logging.getLogger(__name__)

TAG = "state"
SUBDIR = "deepspeed"
UNIVERSAL = "universal"
LAYOUT_FILE = "layout.json"
# Keys whose value our config owns outright: a user file may not set them at all.
_FORBIDDEN_KEYS = {
    "optimizer": "the optimizer is built from the optim section (AdamW with decay groups)",
    "scheduler": "the learning rate comes from the schedule section",
}


def build_deepspeed_config(
    stage: int,
    dtype: torch.dtype,
    offload_optimizer: bool,
    offload_params: bool,
    optim_cfg: OptimConfig,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    user_config_path: str = "",
) -> dict[str, Any]:
    """The DeepSpeed JSON our config implies, merged with the user's file (conflicts raise)."""
    zero: dict[str, Any] = {"stage": stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_params:
        zero["offload_param"] = {"device": "cpu"}
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": float(optim_cfg.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": True},
        "fp16": {"enabled": dtype == torch.float16},
        # Our torch AdamW is the client optimizer, also when ZeRO offloads it to the CPU.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # The training loop logs; DeepSpeed's own progress prints would only duplicate it.
        "steps_per_print": 2**31 - 1,
    }
    if not user_config_path:
        return generated
    user = _read_user_config(user_config_path)
    for key, why in _FORBIDDEN_KEYS.items():
        if key in user:
            raise ConfigError("deepspeed_config", f"{user_config_path}: key {key} is not allowed: {why}")
    return _merge(generated, user, user_config_path, prefix="")


def _read_user_config(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError("deepspeed_config", f"cannot read {path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("deepspeed_config", f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("deepspeed_config", f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _merge(ours: dict[str, Any], theirs: dict[str, Any], path: str, prefix: str) -> dict[str, Any]:
    """Union of two nested dicts; a leaf both set to different values is a ConfigError."""
    merged = dict(ours)
    for key, value in theirs.items():
        dotted = f"{prefix}{key}"
        if key not in ours:
            merged[key] = value
        elif isinstance(ours[key], dict) and isinstance(value, dict):
            merged[key] = _merge(ours[key], value, path, prefix=f"{dotted}.")
        elif ours[key] != value or isinstance(ours[key], dict) != isinstance(value, dict):
            raise ConfigError(
                "deepspeed_config",
                f"{path}: key {dotted}: file says {json.dumps(value)}, config says {json.dumps(ours[key])}",
            )
    return merged


class _GuardedAdamW(torch.optim.AdamW):
    """AdamW that declines one update when told the gradients are not finite (ZeRO stage 0).

    DeepSpeed's engine reads `overflow` after the step to count the skip and leave its
    schedule alone, as it does for its own fp16 optimizer.
    """

    overflow = False
    skip_next = False

    @torch.no_grad()
    def step(self, closure=None):
        self.overflow, self.skip_next = self.skip_next, False
        if self.overflow:
            return None
        return super().step(closure)


class DeepSpeedStrategy(Strategy):
    def setup(self, model: nn.Module, optim_cfg: OptimConfig) -> None:
        self._ensure_process_group()
        import deepspeed

        self.stage = self.cfg.zero_stage
        self.ds_config = build_deepspeed_config(
            stage=self.stage,
            dtype=self.compute_dtype,
            offload_optimizer=self.cfg.offload_optimizer,
            offload_params=self.cfg.offload_params,
            optim_cfg=optim_cfg,
            micro_batch_size=self.batch.micro_batch_size,
            grad_accum=self.batch.grad_accum,
            world_size=self.world_size,
            user_config_path=self.cfg.deepspeed_config,
        )
        optimizer_cls = _GuardedAdamW if self.stage == 0 else torch.optim.AdamW
        optimizer = optimizer_cls(param_groups(model, optim_cfg), **adamw_kwargs(optim_cfg, self.device))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.engine.set_gradient_accumulation_boundary(True)
        self._state_linked = False

    def _ensure_process_group(self) -> None:
        """DeepSpeed needs a process group; a single process gets an in-memory group of one.

        DeepSpeed also reads RANK/WORLD_SIZE/LOCAL_RANK from the environment, which launchers
        (and `gpt_vision.distributed`) export; a plain `python` run has none, so we fill them in.
        """
        for name, value in (("RANK", self.rank), ("WORLD_SIZE", self.world_size), ("LOCAL_RANK", self.local_rank)):
            os.environ.setdefault(name, str(value))
        if torch.distributed.is_initialized():
            return
        if self.world_size > 1:
            raise UserError(
                f"strategy deepspeed with world size {self.world_size} needs an initialized process group"
            )
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)

    @property
    def module(self) -> nn.Module:
        return self.engine

    @property
    def unwrapped(self) -> nn.Module:
        return self.engine.module

    def accumulate(self, is_boundary: bool) -> ContextManager:
        self.engine.set_gradient_accumulation_boundary(is_boundary)
        return super().accumulate(is_boundary)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, lr: float) -> StepResult:
        set_lr(self.engine.optimizer, lr)
        stage0_norm = self._stage0_grad_norm() if self.stage == 0 else None
        self.engine.step()
        skipped = any(getattr(opt, "overflow", False) for opt in (self.engine.optimizer, self._torch_optimizer))
        if not skipped:
            self._link_optimizer_state()
        if stage0_norm is not None:
            norm = stage0_norm
        else:
            reported = self.engine.get_global_grad_norm()
            norm = float("inf") if reported is None else float(reported)
        return StepResult(grad_norm=torch.tensor(norm), skipped=torch.tensor(skipped))

    @property
    def _torch_optimizer(self) -> torch.optim.Optimizer:
        """Our AdamW, inside whatever DeepSpeed wrapped it in (ZeRO or its bf16 optimizer)."""
        return getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)

    def _link_optimizer_state(self) -> None:
        """Point each parameter's ZeRO 1/2 fragment at the optimizer's current moments.

        DeepSpeed links them once, right after the first group's first step, so with a lazily
        initialized optimizer (torch AdamW) and several groups the later groups stay unlinked,
        and after `load` the links point at replaced tensors. `safe_get_full_optimizer_state`
        and universal-checkpoint loading read these links; relinking is cheap (views only).
        """
        opt = self.engine.optimizer
        if self._state_linked or not hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            return
        if all(flat in opt.optimizer.state for flat in opt.single_partition_of_fp32_groups):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
            self._state_linked = True

    def _stage0_grad_norm(self) -> float:
        """Stage 0 gradients are already all-reduced (identical on all ranks): norm them here."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self._torch_optimizer.skip_next = not math.isfinite(norm)
        return norm

    def local_state_tensors(self) -> Iterator[torch.Tensor]:
        """This rank's fp32 master partitions (ZeRO 1-2: `single_partition_of_fp32_groups`,
        ZeRO-3: `fp32_partitioned_groups_flat`), its compute-dtype parameters (ZeRO-3: its
        `ds_tensor` partition) and the AdamW state of its partition."""
        engine_opt = self.engine.optimizer
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            yield from getattr(engine_opt, name, None) or []
        for param in self.unwrapped.parameters():
            yield getattr(param, "ds_tensor", param)
        yield from optimizer_state_tensors(self._torch_optimizer)

    def save(self, directory: Path) -> None:
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        root = Path(directory) / SUBDIR
        # The version marker lets `ds_to_universal` convert these files for another world size.
        client_state = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        # save_latest=False: our checkpoint manager owns `latest`, DeepSpeed's would mislead it.
        self.engine.save_checkpoint(str(root), tag=TAG, client_state=client_state, save_latest=False)
        if self.rank == 0:
            layout = {"world_size": self.world_size, "zero_stage": self.stage}
            write_atomic(root / LAYOUT_FILE, json.dumps(layout))
        self.barrier()

    def load(self, directory: Path) -> None:
        root = Path(directory) / SUBDIR
        layout = _read_layout(root)
        _check_files(root)  # every rank, before any collective: all refuse together
        if layout["world_size"] == self.world_size and layout["zero_stage"] == self.stage:
            self._load_native(root, TAG, universal=False)
            return
        if self.rank == 0 and not (root / UNIVERSAL / TAG).is_dir():
            _convert_to_universal(root)
        self.barrier()
        self._load_native(root / UNIVERSAL, TAG, universal=True)

    def _load_native(self, root: Path, tag: str, universal: bool) -> None:
        # ZeRO-3's universal loader copies the first group's hyperparameters onto every group
        # (the no-decay group would get weight decay), and gives every partition the *same*
        # `step` tensor, which foreach AdamW then increments once per group. Our groups'
        # settings come from config and each partition gets its own step counter.
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        self.engine._config.load_universal_checkpoint = universal
        path, _ = self.engine.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise UserError(f"DeepSpeed found no checkpoint in {root / tag}")
        if universal:
            for group, settings in zip(self.engine.optimizer.param_groups, groups, strict=True):
                group.update(settings)
            for state in self._torch_optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        self.engine.set_gradient_accumulation_boundary(True)
        self._state_linked = False
        self._link_optimizer_state()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """fp32 master values, gathered from the ZeRO partitions (a collective for stage 3)."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        out: dict[str, torch.Tensor] = {}
        for name, value in module.state_dict(keep_vars=True).items():
            if isinstance(value, nn.Parameter):
                full = safe_get_full_fp32_param(value)
                value = value.detach() if full is None else full
            out[name] = value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype, copy=True)
        return out if self.rank == 0 else None


def _read_layout(root: Path) -> dict[str, int]:
    path = root / LAYOUT_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: not a DeepSpeed checkpoint written by gpt_vision") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is corrupt: {e}") from None


def _deepspeed_globals() -> list[type]:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and plain data.

    Found by saving ZeRO 0-3 (fp32 and bf16) and their universal conversion; all are data
    holders (an enum, a dataclass, loss scalers) whose construction runs no code of the file's
    choosing. fp16 stores `DynamicLossScaler` where bf16/fp32 store `LossScaler`.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _check_files(root: Path) -> None:
    """Refuse (UserError) any torch file under `root` that names more than `_deepspeed_globals`."""
    if safe_load.check_torch_files(root, _deepspeed_globals()) == 0:
        raise UserError(f"{root} holds no DeepSpeed checkpoint files (*.pt)")


def _convert_to_universal(root: Path) -> None:
    """DeepSpeed's universal checkpoint from the native shards, built in a temp dir and renamed."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    final = root / UNIVERSAL
    shutil.rmtree(final, ignore_errors=True)
    with atomic_dir(final) as staging:
        ds_to_universal(argparse.Namespace(
            input_folder=str(root / TAG),
            output_folder=str(staging / TAG),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        ))


def consolidate_deepspeed(directory: Path) -> dict[str, torch.Tensor]:
    """fp32 model state from `save`'s files, offline: one process, no process group, any stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = Path(directory) / SUBDIR
    layout = _read_layout(root)
    _check_files(root / TAG)
    if layout["zero_stage"] == 0:
        # Stage 0 writes no ZeRO optimizer shards; the full fp32 module is in the model file.
        states = safe_load.load_torch_file(root / TAG / "mp_rank_00_model_states.pt", _deepspeed_globals())
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=TAG)

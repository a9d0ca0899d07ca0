"""Shared pieces of the strategy benchmarks (scaling.py, gpu_bench.py): time training steps of a
real GPT through a real `Strategy`, count the memory a rank holds, and run that in N fresh
processes joined by a process group.

Steps use random tokens (no loader), so the figures are the model + strategy alone.
Live tensor bytes are counted by walking the Python heap for tensors and summing their distinct
storages after an optimizer step, when activations are gone: parameters (or their shards),
optimizer state and whatever buffers the strategy keeps. It works the same on CPU and CUDA, and
is exact where RSS is not (the allocator keeps freed pages).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import pickle
import socket
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._subclasses.fake_tensor import FakeTensor

from gpt_vision.model import ModelConfig, build_model, build_objective, flops_per_token
from gpt_vision.optim import OptimConfig
from gpt_vision.parallel import BatchLayout, ParallelConfig, build_strategy

# strategy label -> (ParallelConfig.strategy, zero_stage)
STRATEGIES = {
    "single": ("single", 0),
    "ddp": ("ddp", 0),
    "fsdp": ("fsdp", 0),
    "zero1": ("deepspeed", 1),
    "zero2": ("deepspeed", 2),
    "zero3": ("deepspeed", 3),
    "fairscale": ("fairscale", 0),
}


@dataclass
class Job:
    """One measurement: a model shape, a strategy and how long to run it."""

    strategy: str
    model: dict  # ModelConfig keyword arguments
    batch: int
    steps: int
    warmup: int = 1
    precision: str = "fp32"
    compile: bool = False
    threads: int = 1
    # Force SDPA's flash kernel (CUDA): a run fails rather than silently falling back.
    flash: bool = False
    # DeepSpeed communication buckets in elements (0: DeepSpeed's defaults, sized for large GPUs).
    deepspeed_bucket: int = 0


def live_tensor_bytes() -> int:
    """Bytes of all distinct tensor storages reachable from Python objects right now."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch objects warns
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and not isinstance(obj, FakeTensor)]
    for tensor in objects:
        try:
            storage = tensor.untyped_storage()
            key = (storage.device, storage.data_ptr())
            size = storage.nbytes()
        except (RuntimeError, ReferenceError, NotImplementedError):  # meta, freed FSDP storages, subclasses
            continue
        if key[1] and key not in seen:
            seen.add(key)
            total += size
    return total


def _bucket_config(elements: int) -> str:
    """A DeepSpeed JSON file that sizes its buckets to `elements` (empty path: defaults)."""
    if not elements:
        return ""
    zero = {key: elements for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")}
    handle = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump({"zero_optimization": zero}, handle)
    handle.close()
    return handle.name


def _attention_kernel(flash: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_job(job: Job, rank: int = 0, world_size: int = 1) -> dict:
    """Build the model, set up the strategy, time `job.steps` steps; per-rank figures."""
    torch.set_num_threads(job.threads)
    name, stage = STRATEGIES[job.strategy]
    cfg = ParallelConfig(strategy=name, zero_stage=stage, precision=job.precision,
                         deepspeed_config=_bucket_config(job.deepspeed_bucket) if name == "deepspeed" else "")
    strategy = build_strategy(cfg, rank, world_size, rank, BatchLayout(job.batch, 1))
    torch.manual_seed(0)
    model_cfg = ModelConfig(**job.model)
    model = build_model(model_cfg)
    if job.compile:
        for block in model.blocks:
            block.compile(dynamic=False)
    strategy.setup(model, OptimConfig(lr=1e-4))
    objective = build_objective(model_cfg.resolved())
    device = strategy.device
    tokens = torch.randint(0, model_cfg.vocab_size, (job.batch, model_cfg.resolved().seq_len), device=device)
    batch = {"tokens": tokens}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with strategy.accumulate(True), strategy.autocast(), _attention_kernel(job.flash):
            loss = objective(strategy.module, batch, None)
        strategy.backward(loss)
        strategy.step(1e-4)

    start = time.perf_counter()
    step()
    _sync(device)
    first_step_s = time.perf_counter() - start
    for _ in range(job.warmup - 1):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(job.steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    seq_len = model_cfg.resolved().seq_len
    tokens_per_s = job.steps * job.batch * seq_len / seconds
    result = {
        "strategy": job.strategy,
        "rank": rank,
        "world_size": world_size,
        "tokens_per_s": tokens_per_s,
        "step_s": seconds / job.steps,
        "first_step_s": first_step_s,
        "model_flops_per_s": tokens_per_s * flops_per_token(model_cfg, seq_len),
        "live_bytes": live_tensor_bytes(),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


# ---- N processes ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, job: Job, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    try:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=600))
        queue.put((rank, True, pickle.dumps(run_job(job, rank, world_size))))
    except BaseException:  # noqa: BLE001 - the parent reports the rank's traceback
        queue.put((rank, False, pickle.dumps(traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_in_processes(job: Job, world_size: int, timeout: float = 1800.0) -> list[dict]:
    """`run_job` on `world_size` fresh spawned ranks (a group of one for world size 1)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, job, queue), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes, deadline = {}, time.monotonic() + timeout
    try:
        while len(outcomes) < world_size and time.monotonic() < deadline:
            if not queue.empty():
                rank, ok, payload = queue.get()
                outcomes[rank] = (ok, pickle.loads(payload))
            elif any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                break
            else:
                time.sleep(0.05)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failures = [f"rank {r}: {text}" for r, (ok, text) in sorted(outcomes.items()) if not ok]
    if failures or len(outcomes) < world_size:
        raise RuntimeError(f"{job.strategy} at world size {world_size} failed:\n" + ("\n".join(failures) or "a rank died"))
    return [outcomes[r][1] for r in range(world_size)]

"""Run a function in N real processes joined by a gloo group, and collect what each returns.

`run_ranks(fn, world_size, *args)` spawns `world_size` processes, initializes a gloo process
group in each (free TCP port on 127.0.0.1), calls `fn(rank, world_size, *args)` and returns the
per-rank results in rank order. A rank that raises fails the call with that rank's traceback;
a rank that hangs (a collective nobody else joined) fails it after `timeout` seconds.
`fn` and its arguments must be picklable (a module-level function, plain data).
"""
from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt_vision.distributed import DistEnv


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(RuntimeError):
    """A rank raised (message holds its traceback) or did not answer in time."""


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, port, timeout, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = _collect(procs, results, world_size, timeout)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    failures = [f"rank {r}:\n{text}" for r, (ok, text) in sorted(outcomes.items()) if not ok]
    if failures:
        raise RankFailed("\n".join(failures))
    return [outcomes[r][1] for r in range(world_size)]


def _collect(procs, results, world_size: int, timeout: float) -> dict[int, tuple[bool, Any]]:
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < world_size:
        while not results.empty():
            rank, ok, payload = results.get()
            outcomes[rank] = (ok, pickle.loads(payload))
        if len(outcomes) == world_size:
            break
        dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcomes]
        if dead and results.empty():
            time.sleep(0.2)  # the rank's last message may still be in flight
            if results.empty():
                for r in dead:
                    outcomes[r] = (False, f"exited with code {procs[r].exitcode} without a result")
                if any(not ok for ok, _ in outcomes.values()):
                    # A crashed rank leaves the others blocked in a collective; do not wait them out.
                    for r, p in enumerate(procs):
                        outcomes.setdefault(r, (False, "stopped after another rank failed"))
                    break
        if time.monotonic() > deadline:
            for r in range(world_size):
                outcomes.setdefault(r, (False, f"no result within {timeout:.0f}s (hung in a collective?)"))
            break
        time.sleep(0.05)
    return outcomes


def _worker(fn, rank, world_size, port, timeout, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # ranks share a few cores; oversubscription only slows them
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        # Plain pickle copies tensors by value; torch's queue would pass file descriptors
        # that vanish when this process exits.
        payload = pickle.dumps(fn(rank, world_size, *args))
        results.put((rank, True, payload))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent as text
        results.put((rank, False, pickle.dumps(traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_env(rank: int, world_size: int) -> DistEnv:
    """The DistEnv a launcher would give `rank` inside `run_ranks` (its MASTER_PORT included)."""
    return DistEnv(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size,
                   master_addr="127.0.0.1", master_port=int(os.environ["MASTER_PORT"]), launcher="torchrun")

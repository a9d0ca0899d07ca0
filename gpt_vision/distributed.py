"""Which process am I? One answer whichever launcher started us.

Supported launchers and what they leave behind:

* ``deepspeed``: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT in the
  environment, plus a ``--local_rank=N`` argument (unless ``--no_local_rank``).
* ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
  TORCHELASTIC_RUN_ID.
* ``env``: any other launcher that sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* by hand.
* ``srun``: a Slurm job-step task (SLURM_STEP_ID + SLURM_PROCID); the rendezvous is the first
  host of the step's node list, the port is derived from the job id so that concurrent jobs
  sharing a node do not collide. An ``sbatch`` batch script is *not* an srun task: it runs in
  the batch step, which is a single process whatever the allocation size.
* ``python``: nothing of the above; a single process.

RANK/WORLD_SIZE win over SLURM_*, so ``srun torchrun ...`` and ``srun deepspeed ...`` use the
inner launcher's view.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Sequence

from gpt_vision.errors import RankLocalError, UserError

SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000
DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500

EXIT_ORPHANED = 3  # a rank whose launcher died
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_launcher_watch: list[threading.Thread] = []

_LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")
# Slurm's special step ids (SLURM_STEP_ID) for the batch script and the `salloc`/extern steps;
# recent Slurm exports the names, older versions the numbers.
_NON_TASK_STEPS = {"batch", "extern", "interactive", "4294967294", "4294967295", "4294967291"}


@dataclass
class DistEnv:
    """This process's place in the job, and where the group meets."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def detect_env(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's environment (default: this process's argv and os.environ)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    environ = os.environ if environ is None else environ
    arg_local_rank = _local_rank_from_argv(argv)
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _from_rank_env(environ, arg_local_rank)
    if arg_local_rank is not None:
        raise UserError(
            f"--local_rank={arg_local_rank} was passed but RANK and WORLD_SIZE are not set; "
            "start the job with deepspeed, torchrun or srun, or drop --local_rank"
        )
    if _is_srun_task(environ):
        return _from_slurm_env(environ)
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
        master_addr=environ.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
        master_port=_port(environ, "MASTER_PORT", DEFAULT_MASTER_PORT),
        launcher="python",
    )


def exit_with_launcher(env: DistEnv, poll_s: float = 1.0) -> None:
    """Make a rank started by torchrun or deepspeed end when its launcher dies (kill -9 included).

    An orphaned rank would otherwise keep training, saving and pruning checkpoints in a run
    directory that a rerun is already using. Two guards: on Linux the kernel's parent-death
    signal (SIGKILL: immediate even when the rank is blocked in a collective, and a checkpoint
    cut short is never committed), and a daemon thread that notices the parent changing, for
    where that signal does not come. srun/submitit tasks are Slurm's to stop; a plain or
    hand-launched (`env`) process has no launcher to outlive. Idempotent.
    """
    if env.launcher not in ("torchrun", "deepspeed") or _launcher_watch:
        return
    launcher_pid = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    watch = threading.Thread(target=_watch_launcher, args=(launcher_pid, env.rank, poll_s),
                             name="launcher-watch", daemon=True)
    _launcher_watch.append(watch)
    watch.start()


def _watch_launcher(launcher_pid: int, rank: int, poll_s: float) -> None:
    while os.getppid() == launcher_pid:
        time.sleep(poll_s)
    print(f"rank {rank}: the launcher (pid {launcher_pid}) is gone; exiting so that no orphan keeps writing",
          file=sys.stderr, flush=True)
    os._exit(EXIT_ORPHANED)


def strip_launcher_args(argv: Sequence[str]) -> list[str]:
    """argv without ``--local_rank=N`` / ``--local_rank N``, so the rest parse as key=value."""
    out: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in _LOCAL_RANK_FLAGS:
            skip_next = True
        elif not arg.startswith(tuple(f + "=" for f in _LOCAL_RANK_FLAGS)):
            out.append(arg)
    return out


def init_process_group(
    env: DistEnv, backend: str | None = None, timeout_s: float = 1800.0, force: bool = False
) -> bool:
    """Join the process group described by `env`; True when a group was created.

    Also exports MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE, because
    DeepSpeed and other libraries read them rather than asking torch, and binds this process
    to GPU `local_rank` when CUDA is present. A single process creates no group unless `force`
    (code that calls collectives unconditionally wants a group of one).
    """
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
    )
    cuda = torch.cuda.is_available()
    if cuda:
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise RankLocalError(
                f"local rank {env.local_rank} has no GPU: this node shows {count} CUDA device(s); "
                "start at most one process per GPU"
            )
        torch.cuda.set_device(env.local_rank)
    if env.world_size == 1 and not force:
        return False
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise UserError(
                f"a process group (rank {dist.get_rank()} of {dist.get_world_size()}) already exists; "
                f"cannot join as rank {env.rank} of {env.world_size}"
            )
        return False
    dist.init_process_group(
        backend=backend or ("nccl" if cuda else "gloo"),
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return True


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand Slurm hostlist syntax: ``node[01-03,07],gpu5`` -> node01 node02 node03 node07 gpu5.

    Zero padding follows the range's lower bound, several bracket groups in one name expand as
    their product (``r[1-2]n[1-2]``), as Slurm does. Raises ValueError on malformed input.
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist):
        parts = re.split(r"(\[[^\[\]]*\])", item)
        choices = [_expand_brackets(p) if p.startswith("[") else [p] for p in parts]
        if any("[" in p or "]" in p for p in parts if not p.startswith("[")):
            raise ValueError(f"unbalanced brackets in {item!r}")
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise ValueError("empty host list")
    return hosts


def first_host(hostlist: str) -> str:
    """First host of a Slurm hostlist; `scontrol show hostnames` only for syntax we cannot read."""
    try:
        return expand_hostlist(hostlist)[0]
    except ValueError as parse_error:
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", hostlist],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            out = []
        if not out:
            raise UserError(f"cannot read Slurm node list {hostlist!r}: {parse_error}") from None
        return out[0]


def _split_top_level(hostlist: str) -> list[str]:
    items, depth, current = [], 0, []
    for ch in hostlist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in {hostlist!r}")
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in {hostlist!r}")
    items.append("".join(current))
    if any(not item for item in items):
        raise ValueError(f"empty host name in {hostlist!r}")
    return items


def _expand_brackets(group: str) -> list[str]:
    values = []
    for spec in group[1:-1].split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", spec.strip())
        if not m:
            raise ValueError(f"bad range {spec!r} in {group!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {spec!r} in {group!r}")
        values.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return values


def _local_rank_from_argv(argv: Sequence[str]) -> int | None:
    for i, arg in enumerate(argv):
        for flag in _LOCAL_RANK_FLAGS:
            if arg.startswith(flag + "="):
                return _int(arg.split("=", 1)[1], flag)
            if arg == flag:
                if i + 1 >= len(argv):
                    raise UserError(f"{flag} needs a value")
                return _int(argv[i + 1], flag)
    return None


def _from_rank_env(environ: Mapping[str, str], arg_local_rank: int | None) -> DistEnv:
    for a, b in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        if a in environ and b not in environ:
            raise UserError(f"{a} is set but {b} is not; the launcher must set both")
    rank = _int_env(environ, "RANK")
    world_size = _int_env(environ, "WORLD_SIZE")
    if "LOCAL_RANK" in environ:
        local_rank = _int_env(environ, "LOCAL_RANK")
        if arg_local_rank is not None and arg_local_rank != local_rank:
            raise UserError(f"--local_rank={arg_local_rank} disagrees with LOCAL_RANK={local_rank}")
    elif arg_local_rank is not None:
        local_rank = arg_local_rank
    elif world_size == 1:
        local_rank = 0
    else:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world_size} are set but LOCAL_RANK is not")
    if "LOCAL_WORLD_SIZE" in environ:
        local_world_size = _int_env(environ, "LOCAL_WORLD_SIZE")
    elif "LOCAL_SIZE" in environ:
        local_world_size = _int_env(environ, "LOCAL_SIZE")
    else:
        local_world_size = world_size
    if world_size > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not environ.get(name):
                raise UserError(f"WORLD_SIZE={world_size} but {name} is not set; the launcher must set it")
    if "TORCHELASTIC_RUN_ID" in environ:  # torchrun, and torch.distributed.launch (which passes --local-rank)
        launcher = "torchrun"
    elif arg_local_rank is not None or "LOCAL_SIZE" in environ:
        launcher = "deepspeed"
    else:
        launcher = "env"
    env = DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=environ.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
        master_port=_port(environ, "MASTER_PORT", DEFAULT_MASTER_PORT),
        launcher=launcher,
    )
    _check(env, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    return env


def _is_srun_task(environ: Mapping[str, str]) -> bool:
    """A task of an srun step, not the batch script or an salloc shell (which have SLURM_JOB_ID)."""
    step = environ.get("SLURM_STEP_ID")
    return step is not None and step not in _NON_TASK_STEPS and "SLURM_PROCID" in environ


def _from_slurm_env(environ: Mapping[str, str]) -> DistEnv:
    rank = _int_env(environ, "SLURM_PROCID")
    world_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    world_size = _int_env(environ, world_key)
    local_rank = _int_env(environ, "SLURM_LOCALID")
    local_world_size, local_world_key = _slurm_local_world_size(environ)
    # Rank 0 runs on the first node of the step, which may be a subset of the job's nodes.
    nodes_key = "SLURM_STEP_NODELIST" if environ.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    if not environ.get(nodes_key):
        raise UserError("srun task without SLURM_JOB_NODELIST; cannot find the rendezvous host")
    master_addr = environ.get("MASTER_ADDR") or first_host(environ[nodes_key])
    job_id = _int_env(environ, "SLURM_JOB_ID")
    master_port = _port(environ, "MASTER_PORT", SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN)
    env = DistEnv(rank, world_size, local_rank, local_world_size, master_addr, master_port, "srun")
    _check(env, ("SLURM_PROCID", world_key, "SLURM_LOCALID", local_world_key))
    return env


def _slurm_local_world_size(environ: Mapping[str, str]) -> tuple[int, str]:
    """Tasks on this node (and the variable it came from), e.g. from
    SLURM_STEP_TASKS_PER_NODE='2(x3),1' and SLURM_NODEID."""
    key = "SLURM_STEP_TASKS_PER_NODE" if "SLURM_STEP_TASKS_PER_NODE" in environ else "SLURM_TASKS_PER_NODE"
    if key not in environ:
        return _int_env(environ, "SLURM_NTASKS"), "SLURM_NTASKS"
    counts: list[int] = []
    for part in environ[key].split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise UserError(f"{key}={environ[key]!r} is not of the form '2(x3),1'")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    node_id = _int_env(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
    if node_id >= len(counts):
        raise UserError(f"SLURM_NODEID={node_id} but {key}={environ[key]!r} lists {len(counts)} node(s)")
    return counts[node_id], key


def _check(env: DistEnv, names: tuple[str, str, str, str]) -> None:
    rank_name, world_name, local_name, local_world_name = names
    if env.world_size < 1:
        raise UserError(f"{world_name}={env.world_size} must be at least 1")
    if not 0 <= env.rank < env.world_size:
        raise UserError(f"{rank_name}={env.rank} is outside 0..{env.world_size - 1} ({world_name}={env.world_size})")
    if not 1 <= env.local_world_size <= env.world_size:
        raise UserError(
            f"{local_world_name}={env.local_world_size} must be between 1 and {world_name}={env.world_size}"
        )
    if not 0 <= env.local_rank < env.local_world_size:
        raise UserError(
            f"{local_name}={env.local_rank} is outside 0..{env.local_world_size - 1} "
            f"(tasks on this node: {env.local_world_size})"
        )


def _int(value: str, name: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer") from None


def _int_env(environ: Mapping[str, str], name: str) -> int:
    if name not in environ:
        raise UserError(f"{name} is not set")
    return _int(environ[name], name)


def _port(environ: Mapping[str, str], name: str, default: int) -> int:
    if not environ.get(name):
        return default
    port = _int(environ[name], name)
    if not 1 <= port <= 65535:
        raise UserError(f"{name}={port} is not a TCP port (1..65535)")
    return port

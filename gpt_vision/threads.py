"""CPU thread count for a process that was not told one (OMP_NUM_THREADS unset).

torch's own default is every logical CPU of the machine, which oversubscribes a CPU shared by
several ranks (or hyper-threads) and makes training much slower, not faster. We use the physical
cores this process may run on (its CPU affinity, so a Slurm or taskset limit counts), shared out
among the ranks on this node, at least one each.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)
_TOPOLOGY = Path("/sys/devices/system/cpu")


def choose_threads(physical_cores: int, local_ranks: int) -> int:
    """Threads per rank: the cores divided among the node's ranks, at least one."""
    return max(1, physical_cores // max(1, local_ranks))


def physical_cores(cpus: Iterable[int], topology: Path = _TOPOLOGY) -> int:
    """Distinct (package, core) pairs among `cpus`; hyper-thread siblings count once.
    Without readable topology, every CPU counts as a core."""
    cpus = list(cpus)
    cores = set()
    for cpu in cpus:
        base = topology / f"cpu{cpu}" / "topology"
        try:
            cores.add(((base / "physical_package_id").read_text().strip(), (base / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def configure_threads(local_ranks: int) -> int | None:
    """Set torch's thread count unless OMP_NUM_THREADS chose one; returns what was set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = physical_cores(cpus)
    threads = choose_threads(cores, local_ranks)
    torch.set_num_threads(threads)
    log.info("using %d CPU thread(s) per process (%d physical core(s) available, %d process(es) on this node; "
             "set OMP_NUM_THREADS to choose)", threads, cores, local_ranks)
    return threads

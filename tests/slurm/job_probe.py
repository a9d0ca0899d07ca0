"""Runs as an srun task in the smoke-test jobs and records what it saw into OUT_DIR.

    job_probe.py allreduce OUT_DIR   detect_env + init_process_group + all_reduce(rank)
    job_probe.py requeue OUT_DIR     record SLURM_RESTART_COUNT; the first run waits to be requeued
    job_probe.py signal OUT_DIR      wait for SIGUSR1 (sbatch --signal) and record its arrival
"""

import json
import os
import signal
import sys
import time
from pathlib import Path


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def allreduce(out: Path) -> None:
    import torch
    import torch.distributed as dist

    from gpt_vision.distributed import detect_env, init_process_group

    env = detect_env()
    init_process_group(env, backend="gloo", timeout_s=120)
    total = torch.tensor([float(env.rank)])
    dist.all_reduce(total)
    dist.destroy_process_group()
    write_json(out / f"rank{env.rank}.json", {
        **vars(env), "sum": total.item(), "node": os.environ.get("SLURMD_NODENAME"),
    })


def requeue(out: Path) -> None:
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    write_json(out / f"run{restarts}.json", {"restart_count": restarts, "started": time.time()})
    if restarts == 0:
        time.sleep(600)


def wait_for_signal(out: Path) -> None:
    started = time.time()

    def record(signum, frame):
        write_json(out / "signal.json", {"signal": signal.Signals(signum).name, "after_s": time.time() - started})
        sys.exit(0)

    signal.signal(signal.SIGUSR1, record)
    write_json(out / "waiting.json", {"started": started})
    time.sleep(600)


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    {"allreduce": allreduce, "requeue": requeue, "signal": wait_for_signal}[mode](out_dir)

"""Every benchmark, one after the other, each in its own process (`make bench`).

Each script runs its reference and ours in the same process and prints ratios; this file only
sequences them and says which failed. On a CUDA machine the GPU benchmark runs for real,
elsewhere its --dry-run.

    python benchmarks/run_all.py            # full figures (hours on a loaded 2-core CPU)
    python benchmarks/run_all.py --quick    # smoke run of every script
    python benchmarks/run_all.py --only train_step memory
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plan(quick: bool, cuda: bool) -> dict[str, list[str]]:
    """name -> command line (after the interpreter)."""
    threads = [] if cuda else ["--threads", "1"]  # a shared CPU: one thread per process was fastest
    q = ["--quick"] if quick else []
    return {
        "train_step": ["benchmarks/train_step.py", *q, *threads],
        "profile": ["benchmarks/profile_step.py", *q, *threads],
        "sampling": ["benchmarks/sampling.py", "--quick", *threads] if quick or not cuda else ["benchmarks/sampling.py"],
        "loader": ["benchmarks/loader.py", *(["--samples", "1000", "--repeats", "1"] if quick else [])],
        "memory": ["benchmarks/memory.py", *q, *threads],
        "scaling": ["benchmarks/scaling.py", *q],
        "gpu": ["benchmarks/gpu_bench.py"] if cuda and not quick else ["benchmarks/gpu_bench.py", "--dry-run"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of every benchmark")
    parser.add_argument("--only", nargs="+", help="run only these benchmarks")
    args = parser.parse_args()
    import torch

    steps = plan(args.quick, torch.cuda.is_available())
    unknown = set(args.only or []) - set(steps)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(steps)}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
    failed = []
    for name, command in steps.items():
        if args.only and name not in args.only:
            continue
        print(f"\n=== {name}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, *command], cwd=HERE.parent, env=env)
        print(f"=== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

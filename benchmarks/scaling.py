"""Throughput and memory per rank of every parallel strategy at world sizes 1 and 2, in one run.

Each (strategy, world size) runs in fresh spawned processes joined by a gloo (CPU) or NCCL group,
trains the same seeded GPT on random tokens, and reports tokens/s (all ranks together), seconds
per step, and the live tensor bytes a rank holds after a step (parameters or their shards,
optimizer state, strategy buffers; see harness.live_tensor_bytes), also as a fraction of
`single`. ZeRO-3 / FSDP at world size 2 should hold a little over half of `single`.

    python benchmarks/scaling.py                 # width 256, 8 layers, 16x16 images, batch 4 per rank
    python benchmarks/scaling.py --quick         # 2 layers, 2 steps
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import STRATEGIES, Job, run_in_processes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 2 timed steps")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--side", type=int, default=16, help="image side; sequence length is side^2")
    parser.add_argument("--batch", type=int, default=4, help="micro batch per rank")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--deepspeed-bucket", type=int, default=2_000_000,
                        help="DeepSpeed bucket sizes in elements (0: its GPU-sized defaults)")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.steps = 2, 2
    model = dict(n_layer=args.layers, n_embd=args.width, n_head=8, vocab_size=512, image_size=args.side)
    print(f"model {args.layers}x{args.width}, {args.side * args.side} tokens, batch {args.batch}/rank, "
          f"{args.steps} steps, {args.threads} thread(s)/rank")
    print(f"{'strategy':<10} {'world':>5} {'tok/s':>9} {'s/step':>8} {'MiB/rank':>9} {'of single':>9} {'of world 1':>10}")
    baseline, own_baseline = None, {}
    for strategy in args.strategies:
        for world_size in args.world_sizes:
            job = Job(strategy=strategy, model=model, batch=args.batch, steps=args.steps, threads=args.threads,
                      deepspeed_bucket=args.deepspeed_bucket)
            try:
                ranks = run_in_processes(job, world_size)
            except RuntimeError as error:
                print(f"{strategy:<10} {world_size:>5}  FAILED: {str(error).strip().splitlines()[-1]}")
                continue
            tokens_per_s = world_size * min(r["tokens_per_s"] for r in ranks)
            step_s = max(r["step_s"] for r in ranks)
            live = max(r["live_bytes"] for r in ranks)
            if world_size == 1:
                own_baseline[strategy] = live
                baseline = live if strategy == "single" else baseline
            fraction = f"{live / baseline:9.2f}" if baseline else f"{'-':>9}"
            own = f"{live / own_baseline[strategy]:10.2f}" if strategy in own_baseline else f"{'-':>10}"
            print(f"{strategy:<10} {world_size:>5} {tokens_per_s:9.0f} {step_s:8.3f} {live / 2**20:9.1f} {fraction} {own}",
                  flush=True)


if __name__ == "__main__":
    main()

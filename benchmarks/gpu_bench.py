"""GPU throughput, MFU and memory of every strategy on one GPU: the figures a CUDA machine owes us.

For each preset (igpt-s, igpt-m; 32x32 = 1024 tokens, 512 colours) and each strategy at world
size 1, in bf16 with SDPA's flash kernel forced, with torch.compile off (and on, for the
strategies in --compile-strategies): tokens/s, model FLOP/s, MFU against the device's dense
bf16 peak (--peak-tflops, or the table below) and against a large bf16 matmul measured here,
peak memory; then the largest batch that fits (single strategy, doubling until out of memory).
Installs and downloads nothing.

    bash benchmarks/gpu.sh                            # the prepared run (calls this file)
    python benchmarks/gpu_bench.py --dry-run          # the same logic on CPU, tiny shapes, 2 steps

MFU = tokens/s * flops_per_token / peak, flops_per_token = 6 N + 12 n_layer n_embd T
(gpt_vision/model/flops.py: N non-embedding parameters, T = 1024; full attention square).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import STRATEGIES, Job, run_in_processes  # noqa: E402

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of the device name.
DENSE_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_peak(override_tflops: float) -> tuple[str, float]:
    if override_tflops:
        return "given", override_tflops * 1e12
    if not torch.cuda.is_available():
        return "cpu (none)", 0.0
    name = torch.cuda.get_device_name()
    for key, peak in DENSE_BF16_PEAK.items():
        if key in name:
            return name, peak
    return name, 0.0


def matmul_flops(n: int, repeats: int) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def shape(preset: str, side: int) -> dict:
    return dict(preset=preset, vocab_size=512, image_size=side)


def tiny_shape(_preset: str, side: int) -> dict:
    return dict(n_layer=2, n_embd=64, n_head=4, vocab_size=16, image_size=side)


def report(record: dict, out: list, peak: float, matmul: float) -> None:
    flops = record["model_flops_per_s"]
    record["mfu"] = flops / peak if peak else None
    record["of_matmul"] = flops / matmul
    out.append(record)
    mfu = f"{record['mfu']:.3f}" if record["mfu"] is not None else "  -  "
    peak_mem = record.get("peak_bytes", record["live_bytes"]) / 2**30
    print(f"{record['preset']:<8} {record['strategy']:<10} {'on' if record['compile'] else 'off':<7} "
          f"{record['batch']:>5} {record['tokens_per_s']:>10.0f} {flops / 1e12:>8.2f} {mfu:>6} "
          f"{record['of_matmul']:>9.3f} {peak_mem:>8.2f} {record['first_step_s']:>8.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps: checks the logic only")
    parser.add_argument("--presets", nargs="+", default=["igpt-s", "igpt-m"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--compile-strategies", nargs="*", default=["single", "fsdp"], choices=list(STRATEGIES),
                        help="strategies also run with torch.compile (each pays a compile)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=512, help="stop the largest-batch search here (0: skip it)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak; default: table by device name")
    parser.add_argument("--json", default=os.environ.get("OUT", "") and os.path.join(os.environ["OUT"], "gpu_bench.json"),
                        help="also write every record here")
    args = parser.parse_args()
    make_shape = shape
    precision = "bf16"
    if args.dry_run:
        make_shape, precision = tiny_shape, "fp32"
        args.presets, args.batch, args.side, args.steps, args.warmup = args.presets[:1], 2, 4, 2, 1
        args.compile_strategies, args.max_batch = [], 4
    elif not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA device (use --dry-run to check the logic on CPU)")

    name, peak = device_peak(args.peak_tflops)
    matmul = matmul_flops(256 if args.dry_run else 8192, 2 if args.dry_run else 50)
    print(f"device {name}; dense bf16 peak {peak / 1e12:.0f} TFLOP/s; measured bf16 matmul {matmul / 1e12:.1f} TFLOP/s"
          f"{'' if not peak else f' ({matmul / peak:.2f} of peak)'}")
    print(f"{'preset':<8} {'strategy':<10} {'compile':<7} {'batch':>5} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'of matmul':>9} {'peak GiB':>8} {'1st step':>8}")
    records: list[dict] = []
    for preset in args.presets:
        model = make_shape(preset, args.side)
        runs = [(s, False) for s in args.strategies] + [(s, True) for s in args.compile_strategies]
        for strategy, compiled in runs:
            job = Job(strategy=strategy, model=model, batch=args.batch, steps=args.steps, warmup=args.warmup,
                      precision=precision, compile=compiled, flash=not args.dry_run,
                      threads=1 if args.dry_run else 8)
            try:
                (result,) = run_in_processes(job, 1)
            except RuntimeError as error:
                print(f"{preset:<8} {strategy:<10} FAILED: {str(error).strip().splitlines()[-1]}", flush=True)
                continue
            report(dict(result, preset=preset, compile=compiled, batch=args.batch), records, peak, matmul)
        batch = args.batch
        while args.max_batch and batch * 2 <= args.max_batch:
            job = Job(strategy="single", model=model, batch=batch * 2, steps=2, warmup=1, precision=precision,
                      flash=not args.dry_run, threads=1 if args.dry_run else 8)
            try:
                (result,) = run_in_processes(job, 1)
            except RuntimeError as error:
                if "out of memory" not in str(error).lower():
                    raise
                break
            batch *= 2
            report(dict(result, preset=preset, compile=False, batch=batch), records, peak, matmul)
        print(f"{preset}: largest batch that fits (single, bf16, no checkpointing): {batch}"
              f"{' (search capped)' if batch * 2 > args.max_batch else ''}", flush=True)
        records.append({"preset": preset, "largest_batch": batch})
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
        print(f"records: {args.json}")


if __name__ == "__main__":
    main()

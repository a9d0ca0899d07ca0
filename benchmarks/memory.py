"""Activation checkpointing: does a 4x larger batch fit in the memory of the plain batch, and at
what extra time per sample? One run, configurations alternating.

Peak step memory is what a training step adds on top of the resident model and optimizer: on
CUDA torch.cuda.max_memory_allocated, on CPU the process's RSS high-water mark (VmHWM, reset via
/proc/self/clear_refs before each step). On CPU the script re-executes itself with glibc's
mmap threshold fixed at 64 KiB, so every large tensor is its own mapping and freeing it lowers RSS.

    python benchmarks/memory.py            # width 256, 8 layers, 8 heads, 16x16 = 256 tokens, batch 8 vs 32
    python benchmarks/memory.py --quick    # 1 round
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from gpt_vision.model import ModelConfig, build_model


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(model, opt, tokens, device) -> tuple[float, int]:
    """(seconds, peak bytes above the resident state) of one training step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        base = rss_bytes("VmRSS")
    start = time.perf_counter()
    loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = rss_bytes("VmHWM") - base
    return time.perf_counter() - start, peak


def main() -> None:
    if not torch.cuda.is_available() and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--side", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = {
        f"batch {args.batch}": (args.batch, False),
        f"batch {4 * args.batch} + checkpointing": (4 * args.batch, True),
        f"batch {4 * args.batch}": (4 * args.batch, False),
    }
    setups = {}
    for name, (batch, checkpointing) in configs.items():
        torch.manual_seed(0)
        cfg = ModelConfig(n_layer=8, n_embd=256, n_head=8, vocab_size=512, image_size=args.side,
                          activation_checkpointing=checkpointing)
        model = build_model(cfg).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        tokens = torch.randint(0, 512, (batch, args.side**2), device=device)
        measure(model, opt, tokens, device)  # warm-up: optimizer state allocated
        setups[name] = (model, opt, tokens, batch)
    results = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (model, opt, tokens, batch) in setups.items():
            seconds, peak = measure(model, opt, tokens, device)
            results[name].append((seconds / batch, peak))
    print(f"device={device} threads={torch.get_num_threads()} tokens={args.side**2} rounds={args.rounds}")
    base_name = f"batch {args.batch}"
    base_time = min(r[0] for r in results[base_name])
    base_peak = min(r[1] for r in results[base_name])
    print(f"{'configuration':<30} {'ms/sample':>10} {'vs plain':>9} {'step peak MiB':>14} {'vs plain':>9}")
    for name, rows in results.items():
        per_sample = min(r[0] for r in rows)
        peak = min(r[1] for r in rows)
        print(f"{name:<30} {per_sample * 1e3:10.1f} {per_sample / base_time:9.2f} {peak / 2**20:14.1f} "
              f"{peak / base_peak:9.2f}")


if __name__ == "__main__":
    main()

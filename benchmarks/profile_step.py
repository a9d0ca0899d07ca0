"""Where one training step's time goes: a torch.profiler table of our GPT's step (forward,
cross-entropy, backward, AdamW) at the issue's shape, saved as text beside this file.

    python benchmarks/profile_step.py --threads 1            # 784 tokens, batch 8, fp32 and bf16
    python benchmarks/profile_step.py --quick                # batch 2

Writes benchmarks/profile_step_<dtype>.txt (sorted by self CPU/CUDA time, 30 rows).
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from gpt_vision.model import ModelConfig, build_model

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", type=int, default=28)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    if args.quick:
        args.batch = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=8, n_embd=256, n_head=8, vocab_size=512, image_size=args.side, activation="quick_gelu")
    model = build_model(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, 512, (args.batch, args.side**2), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for dtype in args.dtypes:
        def step():
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
            with ctx:
                loss = F.cross_entropy(model(tokens).flatten(0, 1).float(), tokens.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up: optimizer state, kernel selection
        with profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
        header = (f"# one training step of GPT 8x256x8, {args.side**2} tokens, batch {args.batch}, {dtype}, "
                  f"device {device}, threads {torch.get_num_threads()}\n"
                  f"# python benchmarks/profile_step.py{' --quick' if args.quick else ''} --threads {args.threads}\n")
        path = HERE / f"profile_step_{dtype}.txt"
        path.write_text(header + table + "\n")
        print(header + "\n".join(table.splitlines()[:16]))
        print(f"full table: {path}")


if __name__ == "__main__":
    main()

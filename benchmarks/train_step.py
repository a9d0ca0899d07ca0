"""Training throughput: our GPT vs HuggingFace ImageGPT at the same shape, in one run.

One step = forward + next-pixel cross-entropy + backward + AdamW. Both models use the same shape,
activation (quick_gelu, HF's default), no dropout and no KV cache; measurements alternate between
the two so machine load hits both alike. Also reports model FLOP/s (gpt_vision.model.flops) as a
fraction of a plain fp32 and bf16 matmul measured in the same run.

    python benchmarks/train_step.py            # full: 784 and 1024 tokens, fp32 and bf16
    python benchmarks/train_step.py --quick    # smoke: one round of 2 steps each
    python benchmarks/train_step.py --compile  # also ours under torch.compile (per block)
"""

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

from gpt_vision.model import ModelConfig, build_model, flops_per_token

WIDTH, LAYERS, HEADS, PALETTE = 256, 8, 8, 512


def ours(side: int, compiled: bool = False) -> tuple[torch.nn.Module, callable]:
    """Our GPT; `compiled` applies torch.compile per block, as train.compile does."""
    cfg = ModelConfig(n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, vocab_size=PALETTE, image_size=side, activation="quick_gelu")
    model = build_model(cfg)
    if compiled:
        for block in model.blocks:
            block.compile(dynamic=False)
    return model, lambda tokens: model(tokens)


def theirs(side: int) -> tuple[torch.nn.Module, callable]:
    cfg = ImageGPTConfig(
        vocab_size=PALETTE + 1, n_positions=side * side, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )
    model = ImageGPTForCausalImageModeling(cfg)

    def logits(tokens):
        sos = torch.full_like(tokens[:, :1], PALETTE)
        return model(torch.cat([sos, tokens[:, :-1]], dim=1), use_cache=False).logits

    return model, logits


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rate(model, logits, tokens, autocast, steps: int) -> float:
    """Tokens per second over `steps` timed steps after one warm-up step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast():
            loss = F.cross_entropy(logits(tokens).flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    sync(tokens.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(tokens.device)
    return steps * tokens.numel() / (time.perf_counter() - start)


def matmul_flops(device, dtype, n: int, repeats: int) -> float:
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 timed steps (smoke test)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sides", type=int, nargs="+", default=[28, 32], help="image sides (784, 1024 tokens)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile (train.compile)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} rounds={args.rounds} steps={args.steps}")

    n = 4096 if device.type == "cuda" else 1024
    peak = {name: matmul_flops(device, dtype, n, 20 if device.type == "cuda" else 3)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"matmul {n}^3: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s")

    for side in args.sides:
        torch.manual_seed(0)
        models = {"ours": ours(side), "hf": theirs(side)}
        if args.compile:
            models["ours compiled"] = ours(side, compiled=True)
        for model, _ in models.values():
            model.to(device).train()
        tokens = torch.randint(0, PALETTE, (args.batch, side * side), device=device)
        fpt = flops_per_token(models["ours"][0].config, side * side)
        for dtype in args.dtypes:
            def autocast():
                if dtype == "fp32":
                    return contextlib.nullcontext()
                return torch.autocast(device.type, dtype=torch.bfloat16)

            rates = {name: [] for name in models}
            if args.compile:  # compile (and recompile for this dtype) outside the timed rounds
                start = time.perf_counter()
                step_rate(*models["ours compiled"], tokens, autocast, 1)
                print(f"tokens={side * side} {dtype}: torch.compile warm-up {time.perf_counter() - start:.0f} s")
            for _ in range(args.rounds):
                for name, (model, logits) in models.items():
                    rates[name].append(step_rate(model, logits, tokens, autocast, args.steps))
            best = {name: max(r) for name, r in rates.items()}
            mfu = best["ours"] * fpt / peak[dtype]
            print(
                f"tokens={side * side} {dtype}: ours {best['ours']:.0f} tok/s, hf {best['hf']:.0f} tok/s, "
                f"ratio {best['ours'] / best['hf']:.2f}x; ours {best['ours'] * fpt / 1e9:.1f} GFLOP/s "
                f"= {mfu:.2f} of the {dtype} matmul"
            )
            if args.compile:
                rate = max(rates["ours compiled"])
                print(f"tokens={side * side} {dtype}: ours compiled {rate:.0f} tok/s, {rate / best['hf']:.2f}x hf, "
                      f"{rate / best['ours']:.2f}x eager; {rate * fpt / peak[dtype]:.2f} of the {dtype} matmul")


if __name__ == "__main__":
    main()

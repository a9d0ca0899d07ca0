"""Sampling throughput for a whole image: our KV-cached sampler vs HF ImageGPT generate without a
cache (how iGPT sampling is commonly run) and vs our own uncached path, in one run.

    python benchmarks/sampling.py            # width 256, 8 layers, 8 heads, 28x28 = 784 tokens, 4 images
    python benchmarks/sampling.py --quick    # width 128, 4 layers: same token count, less compute
"""

import argparse
import time

import torch
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

from gpt_vision.model import ModelConfig, build_model

PALETTE = 512


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 4-layer, 128-wide model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--side", type=int, default=28)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers, width, heads = (4, 128, 4) if args.quick else (8, 256, 8)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    length = args.side * args.side

    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layer=layers, n_embd=width, n_head=heads, vocab_size=PALETTE, image_size=args.side, activation="quick_gelu"
    )
    ours = build_model(cfg).to(device).eval()
    hf = ImageGPTForCausalImageModeling(
        ImageGPTConfig(vocab_size=PALETTE + 1, n_positions=length, n_embd=width, n_layer=layers, n_head=heads)
    ).to(device).eval()
    print(f"device={device} threads={torch.get_num_threads()} model={layers}/{width}/{heads} "
          f"batch={args.batch} tokens/image={length}")

    results = {}
    for name, use_cache in (("ours cached", True), ("ours uncached", False)):
        seconds, out = timed(
            lambda: ours.generate(args.batch, top_k=40, generator=torch.Generator(device).manual_seed(0), use_cache=use_cache)
        )
        assert out.shape == (args.batch, length)
        results[name] = (seconds, out)
    sos = torch.full((args.batch, 1), PALETTE, device=device)
    with torch.no_grad():
        seconds, out = timed(
            lambda: hf.generate(
                input_ids=sos, max_length=length + 1, do_sample=True, top_k=40, use_cache=False, pad_token_id=PALETTE
            )
        )
    assert out.shape == (args.batch, length + 1)
    results["hf generate, no cache"] = (seconds, out)

    assert torch.equal(results["ours cached"][1], results["ours uncached"][1]), "cached and uncached samples differ"
    base = results["ours cached"][0]
    for name, (seconds, _) in results.items():
        rate = args.batch * length / seconds
        print(f"{name:<22} {seconds:8.2f} s  {rate:8.0f} tok/s  ours cached is {seconds / base:6.1f}x faster")


if __name__ == "__main__":
    main()

"""Loader throughput: ShardLoader (decode + batch + tokenize) with 0, 1 and 2 workers against a
plain `webdataset.WebDataset(...).decode("pil")` read of the same shards, in one run; and the cost
of shard verification (`data.verify` off / size / hash) with one worker, whose process is new on
every pass, so every pass checks every shard once as a run's first epoch does.

    python benchmarks/loader.py                      # temporary shards: 5000 28x28 grayscale images
    python benchmarks/loader.py --manifest shards/cifar10 --split train --clusters 512
"""

import argparse
import tempfile
import time

import numpy as np
import webdataset

from gpt_vision.data import DataConfig, ShardLoader, fit_palette, load_manifest
from gpt_vision.data.integrity import ShardAccess


def write_temporary_shards(directory: str, count: int) -> str:
    from data_shards.writer import write_shards

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count)
    write_shards(images, labels, directory, "bench", split="train", shard_size=500, mode="L")
    return directory


def best_rate(read_pass, repeats: int) -> float:
    """Samples per second of the fastest of `repeats` full passes (a shared machine adds noise)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        samples = read_pass()
        rates.append(samples / (time.perf_counter() - start))
    return max(rates)


def reference_pass(urls: list[str]) -> int:
    samples = 0
    for sample in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
        image = sample.get("png", sample.get("jpg"))
        np.asarray(image)
        samples += 1
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", help="an existing shard set (default: write temporary shards)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--samples", type=int, default=5000, help="temporary set size")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        location = args.manifest or write_temporary_shards(scratch, args.samples)
        manifest = load_manifest(location)
        urls = [shard.url for shard in manifest.shards(args.split)]
        # Unverified here, so no verdict is cached in this process before the loader's workers fork.
        palette = fit_palette(manifest, args.split, args.clusters, 20000, 5, 0, ShardAccess(location, verify="off"))
        print(f"{manifest.location}: {manifest.split_sizes[args.split]} {manifest.mode} "
              f"{manifest.image_size[0]}x{manifest.image_size[1]} images in {len(urls)} shards, K={args.clusters}")

        reference = best_rate(lambda: reference_pass(urls), args.repeats)
        print(f"{'webdataset .decode(pil)':<38} {reference:9.0f} samples/s   1.00x")
        rates = {}
        for workers, verify in ((0, "off"), (1, "off"), (2, "off"), (1, "size"), (1, "hash")):
            cfg = DataConfig(manifest=location, num_workers=workers, verify=verify)
            loader = ShardLoader(cfg, args.split, palette, args.batch_size, train=False)
            rate = rates[workers, verify] = best_rate(lambda: sum(len(batch["key"]) for batch in loader), args.repeats)
            label = f"ShardLoader workers={workers} verify={verify}"
            print(f"{label:<38} {rate:9.0f} samples/s   {rate / reference:.2f}x", end="")
            print(f"   ({rate / rates[1, 'off']:.2f}x of verify=off)" if verify != "off" else "")


if __name__ == "__main__":
    main()

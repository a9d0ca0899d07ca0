"""Test helper: writes real tar shards + manifest.json (format gpt_vision-shards/1) with small
seeded random images, plus hooks to plant bad members."""

import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import webdataset
from PIL import Image


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(rng: np.random.Generator, size=(8, 8), mode="L", colors: np.ndarray | None = None) -> np.ndarray:
    channels = 1 if mode == "L" else 3
    if colors is not None:
        return colors[rng.integers(0, len(colors), size=size)].astype(np.uint8)
    return rng.integers(0, 256, size=(*size, channels), dtype=np.uint8)


def write_shard(path: Path, samples: list[dict]) -> None:
    with webdataset.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def make_samples(prefix: str, count: int, rng, size=(8, 8), mode="L", num_classes: int | None = 10,
                 colors=None) -> list[dict]:
    samples = []
    for index in range(count):
        sample = {"__key__": f"{prefix}-{index:05d}", "png": png_bytes(random_image(rng, size, mode, colors))}
        if num_classes is not None:
            sample["cls"] = str(index % num_classes).encode()
        samples.append(sample)
    return samples


def write_dataset(root: Path, splits: dict[str, list[int]], size=(8, 8), mode="L", num_classes: int | None = 10,
                  seed: int = 0, colors=None, edit=None) -> Path:
    """`splits` maps split name -> samples per shard. `edit(split, shard_index, samples)` may
    change a shard's sample dicts before writing. Returns the manifest path."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = {
        "format": "gpt_vision-shards/1", "name": root.name, "mode": mode, "image_size": list(size),
        "classes": [f"c{i}" for i in range(num_classes)] if num_classes else None, "splits": {},
    }
    for split, counts in splits.items():
        shards = []
        for shard_index, count in enumerate(counts):
            samples = make_samples(f"{split}{shard_index:03d}", count, rng, size, mode, num_classes, colors)
            if edit is not None:
                samples = edit(split, shard_index, samples)
            name = f"{split}-{shard_index:06d}.tar"
            write_shard(root / name, samples)
            data = (root / name).read_bytes()
            shards.append({"file": name, "num_samples": count, "sha256": hashlib.sha256(data).hexdigest(),
                           "bytes": len(data)})
        manifest["splits"][split] = {"num_samples": sum(counts), "shards": shards}
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def relabel_to_zero(shard: Path) -> None:
    """Rewrite a shard with every label set to 0: same size, other bytes (the manifest is left as it was)."""
    with tarfile.open(shard) as tar:
        members = [(info.name, tar.extractfile(info).read()) for info in tar.getmembers()]
    samples: dict[str, dict] = {}
    for name, data in members:
        key, extension = name.split(".", 1)
        samples.setdefault(key, {"__key__": key})[extension] = b"0" if extension == "cls" else data
    write_shard(shard, list(samples.values()))


def append_raw_members(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    """Rewrite a shard with extra members (symlinks, unsafe names) appended at the end; the manifest
    beside it records the new hash (an attacker who plants members also writes the manifest)."""
    with tarfile.open(path) as source:
        existing = [(info, source.extractfile(info).read() if info.isreg() else None) for info in source.getmembers()]
    with tarfile.open(path, "w") as target:
        for info, data in existing + members:
            target.addfile(info, io.BytesIO(data) if data is not None else None)
    rehash(path.parent / "manifest.json")


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (data offset, size), to truncate a shard at a known point."""
    with tarfile.open(path) as tar:
        return {info.name: (info.offset_data, info.size) for info in tar.getmembers()}


def rehash(manifest: Path) -> None:
    """Record the current sha256 and size of every shard, for shards damaged on purpose after writing
    (the damage is then the data's own, not a mismatch with the manifest)."""
    doc = json.loads(manifest.read_text())
    for entry in doc["splits"].values():
        for shard in entry["shards"]:
            data = (manifest.parent / shard["file"]).read_bytes()
            shard["sha256"] = hashlib.sha256(data).hexdigest()
            shard["bytes"] = len(data)
    manifest.write_text(json.dumps(doc))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve_http(root: Path) -> Iterator[str]:
    """Serve a folder over http on localhost for the duration; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

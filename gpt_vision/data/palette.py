"""The k-means color palette tokenizer: pixels <-> nearest-centroid token ids (iGPT's scheme).

The palette is fitted once on a pixel sample of the training shards and saved as a plain `.npy`
array (no pickle) next to the shards or the run, so every process tokenizes identically.
"""

import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gpt_vision.data.config import DataConfig, TokenizerConfig
from gpt_vision.data.decode import BadSample, decode_sample
from gpt_vision.data.integrity import ShardAccess
from gpt_vision.data.manifest import Manifest, load_manifest
from gpt_vision.data.tarstream import iter_raw_samples
from gpt_vision.errors import UserError
from gpt_vision.layout import atomic_file

log = logging.getLogger(__name__)

DISTANCE_ELEMENTS_PER_CHUNK = 1 << 22


class Palette:
    """K color centroids (float32, 0..255, shape [K, C] with C = 1 for grayscale or 3 for RGB)."""

    def __init__(self, centroids: np.ndarray):
        centroids = np.asarray(centroids)
        if centroids.ndim != 2 or centroids.shape[1] not in (1, 3) or centroids.shape[0] < 1:
            raise ValueError(f"palette centroids must have shape [K, 1|3], got {list(centroids.shape)}")
        if not np.issubdtype(centroids.dtype, np.number) or not np.all(np.isfinite(centroids)):
            raise ValueError("palette centroids must be finite numbers")
        if centroids.min() < 0 or centroids.max() > 255:
            raise ValueError("palette centroids must lie in [0, 255]")
        self.centroids = centroids.astype(np.float32)
        self._centroids = torch.from_numpy(self.centroids)
        self._colors = torch.from_numpy(np.clip(np.rint(self.centroids), 0, 255).astype(np.uint8))
        if self.channels == 1:  # 256 possible gray levels: a lookup table is exact and much faster
            self._gray_lookup = _nearest(torch.arange(256, dtype=torch.float32)[:, None], self._centroids).numpy()

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    @property
    def channels(self) -> int:
        return self.centroids.shape[1]

    def encode(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """int64 tokens of shape `pixels.shape[:-1]`; for grayscale palettes a trailing channel
        dimension of size 1 is optional (a [..., H, W] array is read as one value per pixel)."""
        pixels = torch.as_tensor(pixels)
        if self.channels == 1 and (pixels.ndim == 0 or pixels.shape[-1] != 1):
            pixels = pixels.unsqueeze(-1)
        if pixels.shape[-1] != self.channels:
            raise ValueError(f"pixels have {pixels.shape[-1]} channels, the palette has {self.channels}")
        if self.channels == 1 and pixels.dtype == torch.uint8:
            return torch.from_numpy(np.take(self._gray_lookup, pixels[..., 0].numpy()))
        flat = pixels.reshape(-1, self.channels)
        tokens = torch.empty(flat.shape[0], dtype=torch.int64)
        chunk = max(1, DISTANCE_ELEMENTS_PER_CHUNK // self.size)
        for start in range(0, flat.shape[0], chunk):
            tokens[start:start + chunk] = _nearest(flat[start:start + chunk].float(), self._centroids)
        return tokens.reshape(pixels.shape[:-1])

    def decode(self, tokens: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 pixels of shape `tokens.shape + (C,)` (the centroids rounded to integers)."""
        tokens = torch.as_tensor(tokens, dtype=torch.int64)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.size):
            raise ValueError(f"token ids must lie in [0, {self.size}), got [{tokens.min()}, {tokens.max()}]")
        return self._colors[tokens]

    def save(self, path: str | Path) -> None:
        """Write atomically so a crash never leaves a half-written palette."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as handle:
            np.save(handle, self.centroids, allow_pickle=False)

    @classmethod
    def load(cls, path: str | Path) -> "Palette":
        try:
            centroids = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise UserError(f"palette file {path} does not exist") from None
        except (OSError, ValueError, EOFError) as error:
            raise UserError(f"palette file {path} is not a valid .npy array: {error}") from None
        try:
            return cls(centroids)
        except ValueError as error:
            raise UserError(f"palette file {path}: {error}") from None


def _nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    distances = (centroids * centroids).sum(1) - 2.0 * points @ centroids.T
    return distances.argmin(1)


def collect_pixels(manifest: Manifest, split: str, count: int, seed: int, access: ShardAccess) -> np.ndarray:
    """About `count` pixels (uint8 [N, C]) taken evenly from images read in a seeded shard order."""
    shards = manifest.shards(split)
    height, width = manifest.image_size
    per_image = min(height * width, max(64, math.ceil(count / max(1, manifest.split_sizes[split]))))
    rng = np.random.default_rng([seed, 0x9A1E])
    num_classes = len(manifest.classes) if manifest.classes is not None else None
    chunks, collected = [], 0
    for shard_index in rng.permutation(len(shards)):
        shard = shards[shard_index]
        for raw in iter_raw_samples(shard, access):
            try:
                pixels, _ = decode_sample(raw, manifest.mode, manifest.image_size, num_classes)
            except BadSample:
                continue
            flat = pixels.reshape(-1, pixels.shape[-1])
            chunks.append(flat[rng.choice(flat.shape[0], per_image, replace=False)])
            collected += per_image
            if collected >= count:
                return np.concatenate(chunks)[:count]
    if not chunks:
        raise UserError(f"{manifest.location}: split '{split}' has no readable images to fit a palette on")
    return np.concatenate(chunks)


def kmeans(points: np.ndarray, clusters: int, iterations: int, seed: int) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; deterministic for a seed. Returns [K, C] float32."""
    data = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    generator = torch.Generator().manual_seed(seed)
    centroids = _kmeans_plus_plus(data, clusters, generator)
    chunk = max(1, DISTANCE_ELEMENTS_PER_CHUNK // clusters)
    for _ in tqdm(range(iterations), desc=f"k-means (K={clusters})", disable=None, leave=False):
        sums = torch.zeros_like(centroids, dtype=torch.float64)
        counts = torch.zeros(clusters, dtype=torch.float64)
        for start in range(0, data.shape[0], chunk):
            block = data[start:start + chunk]
            assignment = _nearest(block, centroids)
            sums.index_add_(0, assignment, block.double())
            counts.index_add_(0, assignment, torch.ones(block.shape[0], dtype=torch.float64))
        filled = counts > 0
        updated = centroids.clone()
        updated[filled] = (sums[filled] / counts[filled, None]).float()
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids.clamp(0, 255).numpy()


def _kmeans_plus_plus(data: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(data.shape[0], (1,), generator=generator).item()
    centroids = [data[first]]
    closest = ((data - data[first]) ** 2).sum(1).double()
    for _ in range(1, clusters):
        total = closest.sum()
        if total > 0:
            choice = torch.multinomial(closest / total, 1, generator=generator).item()
        else:  # fewer distinct colors than clusters: duplicates are harmless
            choice = torch.randint(data.shape[0], (1,), generator=generator).item()
        centroids.append(data[choice])
        closest = torch.minimum(closest, ((data - data[choice]) ** 2).sum(1).double())
    return torch.stack(centroids)


def fit_palette(manifest: str | Manifest, split: str, clusters: int, sample_pixels: int,
                iterations: int, seed: int, access: ShardAccess | None = None) -> Palette:
    """Fit a K-color palette on pixels sampled from the split's shards (opened as `access` says;
    by default hash-verified, no `pipe:`)."""
    if isinstance(manifest, str):
        manifest = load_manifest(manifest)
    points = collect_pixels(manifest, split, sample_pixels, seed, access or ShardAccess(manifest.location))
    if points.shape[0] < clusters:
        raise UserError(
            f"{manifest.location}: split '{split}' gave only {points.shape[0]} pixels for {clusters} clusters"
        )
    log.info("fitting a %d-color palette on %d pixels of %s [split %s]", clusters, points.shape[0], manifest.location,
             split)
    return Palette(kmeans(points, clusters, iterations, seed))


def palette_path(tok_cfg: TokenizerConfig, manifest: Manifest) -> Path:
    """Where the palette lives: `tokenizer.path`, else beside local shards (one file per cluster count)."""
    if tok_cfg.path:
        return Path(tok_cfg.path)
    if manifest.local_dir is None:
        raise UserError(
            f"tokenizer.path must be set: the shards at {manifest.location} are remote, so the palette "
            "cannot be stored next to them"
        )
    return manifest.local_dir / f"palette-{tok_cfg.clusters}.npy"


def load_or_fit_palette(data_cfg: DataConfig, tok_cfg: TokenizerConfig) -> Palette:
    """Reuse the saved palette when it exists (it must have K clusters and the data's channels);
    otherwise fit one on the training split and save it."""
    manifest = load_manifest(data_cfg.manifest, data_cfg.allow_pipe)
    path = palette_path(tok_cfg, manifest)
    if path.exists():
        palette = Palette.load(path)
        if palette.size != tok_cfg.clusters or palette.channels != manifest.channels:
            raise UserError(
                f"palette file {path} has {palette.size} colors x {palette.channels} channels, the config asks "
                f"for {tok_cfg.clusters} x {manifest.channels} ({manifest.mode}); delete it or set tokenizer.path"
            )
        return palette
    palette = fit_palette(manifest, data_cfg.train_split, tok_cfg.clusters, tok_cfg.sample_pixels,
                          tok_cfg.iterations, tok_cfg.seed,
                          ShardAccess(manifest.location, data_cfg.allow_pipe, data_cfg.verify))
    try:
        palette.save(path)
    except OSError as error:
        raise UserError(f"cannot write palette {path.name} into {path.parent} ({error.strerror or error}): "
                        "set tokenizer.path to a writable file") from None
    log.info("saved palette to %s", path)
    return palette

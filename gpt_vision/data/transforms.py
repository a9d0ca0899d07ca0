"""Image transforms on uint8 [H, W, C] arrays, each drawing its randomness from a per-sample
generator the stream derives from (seed, epoch, rank, worker, index), so augmented streams resume
exactly like plain ones."""

from collections.abc import Callable

import numpy as np
from PIL import Image

from gpt_vision.data.config import AugmentConfig

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def resize_shorter_side(pixels: np.ndarray, size: int) -> np.ndarray:
    """Scale so the shorter side is `size` (bicubic), keeping the aspect ratio."""
    height, width, channels = pixels.shape
    scale = size / min(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size == (width, height):
        return pixels
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    resized = np.asarray(image.resize(new_size, Image.Resampling.BICUBIC), dtype=np.uint8)
    return resized[:, :, None] if resized.ndim == 2 else resized


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    height, width, _ = pixels.shape
    if size > height or size > width:
        raise ValueError(f"center_crop {size} is larger than the {height}x{width} image")
    top, left = (height - size) // 2, (width - size) // 2
    return pixels[top:top + size, left:left + size]


def random_crop(pixels: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pad each side by `padding`, then crop back to the original size at a random offset."""
    height, width, _ = pixels.shape
    padded = np.pad(pixels, ((padding, padding), (padding, padding), (0, 0)))
    top, left = rng.integers(0, 2 * padding + 1, size=2)
    return padded[top:top + height, left:left + width]


def random_horizontal_flip(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return pixels[:, ::-1] if rng.random() < 0.5 else pixels


class Augment:
    """resize -> center crop (both modes), then random crop and flip (training only). A class
    rather than a closure so it pickles into spawned DataLoader workers."""

    def __init__(self, cfg: AugmentConfig, train: bool):
        self.cfg = cfg
        self.train = train

    def __call__(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cfg = self.cfg
        if cfg.resize:
            pixels = resize_shorter_side(pixels, cfg.resize)
        if cfg.center_crop:
            pixels = center_crop(pixels, cfg.center_crop)
        if self.train and cfg.random_crop_padding:
            pixels = random_crop(pixels, cfg.random_crop_padding, rng)
        if self.train and cfg.flip:
            pixels = random_horizontal_flip(pixels, rng)
        return np.ascontiguousarray(pixels)


def build_transform(cfg: AugmentConfig, train: bool) -> Transform | None:
    """The configured augmentation, or None when nothing is configured."""
    active = cfg.resize or cfg.center_crop or (train and (cfg.random_crop_padding or cfg.flip))
    return Augment(cfg, train) if active else None

"""Indexable views over a source's samples: what the writer iterates, whatever the source format."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gpt_vision.errors import UserError


class BadImage(Exception):
    """One input image that cannot be used; counted against --max-bad-fraction, never fatal alone."""

    def __init__(self, origin: str, reason: str):
        super().__init__(f"{origin}: {reason}")
        self.origin = origin
        self.reason = reason


class ArraySplit:
    """Images held in a (N, H, W[, C]) uint8 array, with optional (N,) integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, origin: str):
        self.images = images
        self.labels = labels
        self.origin = origin

    def __len__(self) -> int:
        return len(self.images)

    def label(self, i: int) -> int | None:
        return None if self.labels is None else int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"{self.origin}[{i}]"

    def image(self, i: int) -> Image.Image:
        pixels = self.images[i]
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        return Image.fromarray(pixels)


class FileSplit:
    """Image files decoded lazily, so one unreadable file is one bad sample, not a failed run."""

    def __init__(self, paths: list[Path], labels: list[int]):
        self.paths = paths
        self.labels = labels

    def __len__(self) -> int:
        return len(self.paths)

    def label(self, i: int) -> int | None:
        return self.labels[i]

    def describe(self, i: int) -> str:
        return str(self.paths[i])

    def image(self, i: int) -> Image.Image:
        try:
            with Image.open(self.paths[i]) as img:
                img.load()
                return img
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
            raise BadImage(str(self.paths[i]), f"{type(e).__name__}: {e}") from None


@dataclass
class Subset:
    """A fixed selection of another split's samples (a carved validation split, a shuffled order)."""

    base: "ArraySplit | FileSplit | Subset"
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def label(self, i: int) -> int | None:
        return self.base.label(int(self.indices[i]))

    def describe(self, i: int) -> str:
        return self.base.describe(int(self.indices[i]))

    def image(self, i: int) -> Image.Image:
        return self.base.image(int(self.indices[i]))


Split = ArraySplit | FileSplit | Subset


def carve_validation(splits: dict[str, Split], fraction: float, seed: int) -> dict[str, Split]:
    """Move a seeded random `fraction` of `train` into a new `val` split; both keep source order."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"bad split spec: --val-fraction must be between 0 and 1 (exclusive), got {fraction}")
    if "train" not in splits:
        raise UserError(f"bad split spec: --val-fraction needs a 'train' split to carve from (have: {', '.join(splits)})")
    if "val" in splits:
        raise UserError("bad split spec: --val-fraction: the input already has a 'val' split")
    train = splits["train"]
    n_val = round(len(train) * fraction)
    if n_val == 0 or n_val == len(train):
        raise UserError(f"bad split spec: --val-fraction {fraction} of {len(train)} training samples leaves an empty split")
    order = np.random.default_rng(seed).permutation(len(train))
    carved = dict(splits)
    carved["train"] = Subset(train, np.sort(order[n_val:]))
    carved["val"] = Subset(train, np.sort(order[:n_val]))
    return carved

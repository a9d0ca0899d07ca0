"""Our own sample decoder: PNG/JPEG images through PIL from bytes and ASCII-integer `cls` labels.

Nothing else is ever decoded (no pickle, no torch.load). Every way a sample can be wrong becomes a
`BadSample` with a short kind used as the metric name.
"""

import io
import warnings

import numpy as np
from PIL import Image

from gpt_vision.data.tarstream import RawSample

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
IMAGE_FORMATS = frozenset({"PNG", "JPEG"})


class BadSample(Exception):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def decode_image(data: bytes, mode: str, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C]; the size is checked before the pixels are decoded (no decompression bombs)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=sorted(IMAGE_FORMATS))
            if (image.height, image.width) != size:
                raise BadSample("wrong_size", f"{image.height}x{image.width}, manifest says {size[0]}x{size[1]}")
            if image.mode != mode:
                raise BadSample("wrong_mode", f"{image.mode}, manifest says {mode}")
            image.load()
    except BadSample:
        raise
    except Exception as error:  # PIL signals corrupt data with many exception types
        raise BadSample("corrupt_image", f"{type(error).__name__}: {error}") from None
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def decode_label(members: dict[str, bytes], num_classes: int | None) -> int:
    """The class index, or -1 for an unlabeled set; a labeled set requires a valid one."""
    data = members.get("cls")
    if data is None:
        if num_classes is None:
            return -1
        raise BadSample("missing_label")
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        if num_classes is None:
            return -1
        raise BadSample("bad_label", repr(data[:20])) from None
    if num_classes is not None and not 0 <= label < num_classes:
        raise BadSample("bad_label", f"{label} not in [0, {num_classes})")
    return label


def decode_sample(raw: RawSample, mode: str, size: tuple[int, int], num_classes: int | None):
    """(pixels uint8 [H, W, C], label) or `BadSample`."""
    if raw.problem:
        raise BadSample(raw.problem)
    extension = next((e for e in IMAGE_EXTENSIONS if e in raw.members), None)
    if extension is None:
        raise BadSample("missing_image")
    return decode_image(raw.members[extension], mode, size), decode_label(raw.members, num_classes)

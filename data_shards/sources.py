"""Readers for the input formats: each turns a path into named splits of (image, label) samples.

Every reader checks the structure of what it reads (headers, shapes, counts) and fails with one
line naming the file, because a silently misread dataset only shows up days later as a bad model.
"""

import gzip
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gpt_vision.errors import UserError

from .splits import ArraySplit, FileSplit, Split

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]
SPLIT_DIR_NAMES = ("train", "val", "test")


@dataclass
class SourceData:
    splits: dict[str, Split]
    classes: list[str] | None  # None: the source has no labels


def load_source(kind: str, inputs: list[str]) -> SourceData:
    """Read the `--input` values: one path, or for npz several paths and `split=path` pairs."""
    readers = {"idx": read_idx_dir, "cifar": read_cifar_dir, "folder": read_image_folder}
    if kind != "npz" and kind not in readers:
        raise UserError(f"unknown source '{kind}' (choose from: {', '.join([*readers, 'npz'])})")
    named = [_split_and_path(spec) for spec in inputs]
    for _, path in named:
        if not path.exists():
            raise UserError(f"input {path} does not exist")
    if kind == "npz":
        return read_npz_files(named)
    if len(named) != 1 or named[0][0] is not None:
        raise UserError(f"source '{kind}' takes one --input directory; several inputs and split=path are for npz")
    return readers[kind](named[0][1])


def _split_and_path(spec: str) -> tuple[str | None, Path]:
    """`split=path` when the part before '=' is a word (a path with '=' can be written ./a=b.npz)."""
    split, sep, path = spec.partition("=")
    if sep and re.fullmatch(r"\w+", split):
        if split not in SPLIT_DIR_NAMES:
            raise UserError(f"--input {spec}: unknown split '{split}' (use {', '.join(SPLIT_DIR_NAMES)})")
        return split, Path(path)
    return None, Path(spec)


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------

IDX_SPLITS = {"train": "train", "test": "t10k"}


def read_idx_dir(root: Path) -> SourceData:
    """`train-*` and `t10k-*` IDX file pairs (raw or .gz) -> splits train and test."""
    _require_dir(root, "idx")
    splits = {}
    for split, prefix in IDX_SPLITS.items():
        images_file = _find_idx(root, f"{prefix}-images-idx3-ubyte")
        labels_file = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        if images_file is None and labels_file is None:
            continue
        if images_file is None or labels_file is None:
            missing = f"{prefix}-images-idx3-ubyte" if images_file is None else f"{prefix}-labels-idx1-ubyte"
            raise UserError(f"{root}: found one {split} IDX file but not {missing}[.gz]")
        images = read_idx(images_file, ndim=3)
        labels = read_idx(labels_file, ndim=1)
        if len(images) != len(labels):
            raise UserError(f"{images_file} holds {len(images)} images but {labels_file} holds {len(labels)} labels")
        splits[split] = ArraySplit(images, labels, str(images_file))
    if not splits:
        raise UserError(f"{root} holds no IDX files (expected train-images-idx3-ubyte[.gz] and friends)")
    looks_fashion = "fashion" in str(root.resolve()).lower()
    classes = FASHION_MNIST_CLASSES if looks_fashion else DIGIT_CLASSES
    _check_labels(splits, classes, root)
    return SourceData(splits, list(classes))


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (root / name).is_file():
            return root / name
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file: 2 zero bytes, dtype code (0x08 = ubyte), ndim, big-endian uint32 dims."""
    try:
        raw = _read_maybe_gzip(path)
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0:2] != b"\x00\x00":
        raise UserError(f"{path} is not an IDX file (bad magic {raw[:4].hex() or 'empty'})")
    if raw[2] != 0x08:
        raise UserError(f"{path}: IDX element type 0x{raw[2]:02x} is not supported (only 0x08, unsigned byte)")
    if raw[3] != ndim:
        raise UserError(f"{path}: IDX file has {raw[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: IDX header is truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise UserError(f"{path}: header says dims {list(dims)} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


# --- CIFAR-10 / CIFAR-100 python pickles ----------------------------------------------------

CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR100_FILES = {"train": ["train"], "test": ["test"]}

# Exactly what CIFAR pickles reference to rebuild numpy arrays; `_codecs.encode` is how protocol-2
# pickles written by Python 3 store bytes (a text->bytes codec call, as torch's weights_only allows).
_CIFAR_PICKLE_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global except numpy array reconstruction: a user file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def load_cifar_pickle(path: Path) -> dict:
    """One CIFAR batch/meta file as a dict with str keys, via the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{path} is not a CIFAR python pickle: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR python pickle: top level is {type(obj).__name__}, not dict")
    return {k.decode("ascii") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_dir(root: Path) -> SourceData:
    """`cifar-10-batches-py` or `cifar-100-python` directory -> splits train and test."""
    _require_dir(root, "cifar")
    if (root / "batches.meta").is_file():
        files, meta_name, labels_key, names_key = CIFAR10_FILES, "batches.meta", "labels", "label_names"
    elif (root / "meta").is_file():
        files, meta_name, labels_key, names_key = CIFAR100_FILES, "meta", "fine_labels", "fine_label_names"
    else:
        raise UserError(f"{root} is not a CIFAR directory (no batches.meta or meta file)")
    meta = load_cifar_pickle(root / meta_name)
    names = meta.get(names_key)
    if not isinstance(names, list) or not names:
        raise UserError(f"{root / meta_name}: missing '{names_key}'")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    splits = {}
    for split, batch_names in files.items():
        present = [root / b for b in batch_names if (root / b).is_file()]
        if not present:
            continue
        if len(present) != len(batch_names):
            missing = sorted(set(batch_names) - {p.name for p in present})
            raise UserError(f"{root}: {split} batches incomplete, missing {', '.join(missing)}")
        parts = [_cifar_batch(p, labels_key) for p in present]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        splits[split] = ArraySplit(images, labels, str(root))
    if not splits:
        raise UserError(f"{root} holds no CIFAR batches")
    _check_labels(splits, classes, root)
    return SourceData(splits, classes)


def _cifar_batch(path: Path, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = load_cifar_pickle(path)
    data, labels = batch.get("data"), batch.get(labels_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(isinstance(v, int) for v in labels):
        raise UserError(f"{path}: '{labels_key}' must be a list of {len(data)} integers")
    # Rows are 1024 red, 1024 green, 1024 blue values of a row-major 32x32 image.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


# --- ImageFolder --------------------------------------------------------------------------

def read_image_folder(root: Path) -> SourceData:
    """root/<class>/<image> or root/{train,val,test}/<class>/<image>; class names sorted."""
    _require_dir(root, "folder")
    top = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if "train" in top and set(top) <= set(SPLIT_DIR_NAMES):
        split_roots = {name: root / name for name in SPLIT_DIR_NAMES if name in top}
    else:
        split_roots = {"train": root}
    class_names = sorted({
        d.name for r in split_roots.values() for d in r.iterdir() if d.is_dir() and not d.name.startswith(".")
    })
    if not class_names:
        raise UserError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    index = {name: i for i, name in enumerate(class_names)}
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    splits = {}
    for split, split_root in split_roots.items():
        paths, labels = [], []
        for class_dir in sorted(d for d in split_root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for file in sorted(class_dir.rglob("*")):
                if file.is_file() and not file.name.startswith(".") and file.suffix.lower() in extensions:
                    paths.append(file)
                    labels.append(index[class_dir.name])
        if not paths:
            raise UserError(f"{split_root} holds no image files")
        splits[split] = FileSplit(paths, labels)
    return SourceData(splits, class_names)


# --- npz ----------------------------------------------------------------------------------

NPZ_SPLIT_KEYS = (("images_", "labels_"), ("x_", "y_"))  # images_train/labels_train or Keras' x_train/y_train


def read_npz_files(inputs: list[tuple[str | None, Path]]) -> SourceData:
    """npz files -> splits. A `split=path` file, or a file holding `images` (and optional `labels`),
    gives one split (train without a name); a file of per-split arrays (`images_<split>` /
    `labels_<split>` or `x_<split>` / `y_<split>`, split one of train, val, test) gives those."""
    splits: dict[str, ArraySplit] = {}
    for split, path in inputs:
        for name, images, labels in _npz_splits(path, split):
            if name in splits:
                raise UserError(f"split '{name}' is given twice ({splits[name].origin} and {path})")
            check_arrays(images, labels, f"{path} [{name}]")
            splits[name] = ArraySplit(images, labels, str(path))
    labeled = {name for name, split in splits.items() if split.labels is not None}
    if labeled and labeled != set(splits):
        unlabeled = sorted(set(splits) - labeled)
        raise UserError(f"npz inputs label splits {', '.join(sorted(labeled))} but not {', '.join(unlabeled)}")
    if not labeled:
        return SourceData(splits, None)
    top = max(int(split.labels.max()) for split in splits.values() if len(split.labels))
    return SourceData(splits, [str(i) for i in range(top + 1)])


def _npz_splits(path: Path, split: str | None) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise UserError(f"cannot read npz file {path}: {e}") from None
    if "images" in arrays or split is not None:
        if "images" not in arrays:
            raise UserError(f"{path} has no 'images' array for split '{split}' (has: {', '.join(arrays) or 'nothing'})")
        return [(split or "train", arrays["images"], arrays.get("labels"))]
    found = []
    for image_prefix, label_prefix in NPZ_SPLIT_KEYS:
        for key in arrays:
            if key.startswith(image_prefix) or key.startswith(label_prefix):
                name = key.split("_", 1)[1]
                if name not in SPLIT_DIR_NAMES:
                    raise UserError(f"{path}: array '{key}' names unknown split '{name}' (use {', '.join(SPLIT_DIR_NAMES)})")
                if image_prefix + name not in arrays:
                    raise UserError(f"{path}: array '{key}' has no images '{image_prefix}{name}'")
                if key.startswith(image_prefix):
                    found.append((name, arrays[key], arrays.get(label_prefix + name)))
    if not found:
        raise UserError(f"{path} has no 'images' array nor per-split arrays images_<split> / x_<split> "
                        f"(has: {', '.join(arrays) or 'nothing'})")
    return found


def check_arrays(images: np.ndarray, labels: np.ndarray | None, where: str) -> None:
    """The array contract shared by npz files and the Python API."""
    if images.dtype != np.uint8:
        raise UserError(f"{where}: images must be uint8, got {images.dtype}")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise UserError(f"{where}: images must have shape (N, H, W) or (N, H, W, 1|3), got {images.shape}")
    if len(images) == 0:
        raise UserError(f"{where}: images array is empty")
    if labels is None:
        return
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{where}: labels must have shape ({len(images)},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{where}: labels must be integers, got {labels.dtype}")
    if labels.min() < 0:
        raise UserError(f"{where}: labels must be >= 0, found {labels.min()}")


# --- shared -------------------------------------------------------------------------------

def _require_dir(path: Path, kind: str) -> None:
    if not path.is_dir():
        raise UserError(f"input {path} must be a directory for source '{kind}'")


def _check_labels(splits: dict[str, Split], classes: list[str], where: Path) -> None:
    for name, split in splits.items():
        labels = split.labels
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise UserError(f"{where}: {name} labels span {labels.min()}..{labels.max()}, outside 0..{len(classes) - 1}")

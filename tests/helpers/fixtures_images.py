"""Writers of tiny source datasets in their real on-disk formats (IDX, CIFAR pickles, folders)."""

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def random_images(rng: np.random.Generator, n: int, height: int, width: int, channels: int | None = None) -> np.ndarray:
    shape = (n, height, width) if channels is None else (n, height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """IDX: 0x0000, type 0x08 (ubyte), ndim, big-endian uint32 dims, then the bytes."""
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_idx_dir(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], gz: bool) -> Path:
    """MNIST file names; `splits` maps 'train'/'test' to (images (N,H,W), labels (N,))."""
    root.mkdir(parents=True, exist_ok=True)
    prefix = {"train": "train", "test": "t10k"}
    for split, (images, labels) in splits.items():
        write_idx(root / f"{prefix[split]}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{prefix[split]}-labels-idx1-ubyte", labels.astype(np.uint8), gz)
    return root


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N,32,32,3) -> (N,3072): all red, then green, then blue, each row-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _dump(path: Path, obj: dict) -> None:
    """Protocol 2 like the official files, naming numpy's array module as numpy 1.x did."""
    data = pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(data)


def write_cifar10_dir(root: Path, rng: np.random.Generator, per_batch: int = 2, n_test: int = 3):
    """A cifar-10-batches-py lookalike; returns {split: (images (N,32,32,3), labels)}."""
    root.mkdir(parents=True, exist_ok=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(root / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    truth = {"train": ([], []), "test": ([], [])}
    batches = [(f"data_batch_{i}", "train", per_batch) for i in range(1, 6)] + [("test_batch", "test", n_test)]
    for file, split, n in batches:
        images = random_images(rng, n, 32, 32, 3)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        _dump(root / file, {
            b"batch_label": file.encode(), b"labels": labels, b"data": _cifar_rows(images),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        })
        truth[split][0].append(images)
        truth[split][1].extend(labels)
    return {split: (np.concatenate(imgs), np.array(labels)) for split, (imgs, labels) in truth.items()}


def write_cifar100_dir(root: Path, rng: np.random.Generator, n_train: int = 6, n_test: int = 3):
    """A cifar-100-python lookalike (fine + coarse labels); returns {split: (images, fine labels)}."""
    root.mkdir(parents=True, exist_ok=True)
    fine = [f"fine{i}".encode() for i in range(100)]
    coarse = [f"coarse{i}".encode() for i in range(20)]
    _dump(root / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse})
    truth = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = random_images(rng, n, 32, 32, 3)
        labels = [int(v) for v in rng.integers(0, 100, size=n)]
        _dump(root / split, {
            b"filenames": [b"x.png"] * n, b"batch_label": split.encode(), b"fine_labels": labels,
            b"coarse_labels": [v // 5 for v in labels], b"data": _cifar_rows(images),
        })
        truth[split] = (images, np.array(labels))
    return truth


def write_image_folder(root: Path, classes: dict[str, list[np.ndarray]], ext: str = "png") -> Path:
    """root/<class>/<i>.<ext> for each array; lossless formats only, so pixels can be compared."""
    for name, images in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, pixels in enumerate(images):
            Image.fromarray(pixels).save(root / name / f"{i:03d}.{ext}")
    return root


def read_split(out_dir: Path, split: str) -> tuple[list[str], np.ndarray, list[int] | None]:
    """Read one split back with webdataset itself: keys, decoded pixels, labels (None if absent)."""
    import webdataset as wds

    from gpt_vision.data.manifest import load_manifest

    urls = [shard.url for shard in load_manifest(out_dir).splits[split]]
    keys, images, labels = [], [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        keys.append(sample["__key__"])
        with Image.open(io.BytesIO(sample["png"])) as img:
            assert img.format == "PNG"
            images.append(np.array(img))
        labels.append(int(sample["cls"]) if "cls" in sample else None)
    has_labels = any(v is not None for v in labels)
    assert not has_labels or all(v is not None for v in labels), "some samples lack a label"
    return keys, np.stack(images), labels if has_labels else None

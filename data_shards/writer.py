"""Writes splits of samples as WebDataset tar shards plus manifest.json, crash-safely.

Every shard is written under a `.partial` name that no shard glob matches and is only renamed
into place once the whole dataset is written and the bad-sample budget holds; the manifest is
written after that. So an interrupted or failed run leaves no finished-looking tar and never
touches a previous output, even with `force=True`.
"""

import hashlib
import io
import math
import os
import re
import secrets
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from gpt_vision.data.manifest import FORMAT, MANIFEST_NAME, MODES, write_manifest
from gpt_vision.errors import UserError

from .sources import check_arrays
from .splits import ArraySplit, BadImage, Split

DEFAULT_SHARD_SIZE = 10_000
SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
MAX_LISTED_BAD = 50  # printed to stderr; the manifest keeps up to MAX_RECORDED_BAD
MAX_RECORDED_BAD = 1000
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def write_dataset(
    splits: dict[str, Split],
    out_dir: str | os.PathLike,
    name: str,
    *,
    classes: list[str] | None,
    mode: str | None = None,
    resize: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    max_bad_fraction: float = 0.0,
    progress: bool | None = None,
) -> dict:
    """Write every split and return the manifest. `mode`/size default to the first image's."""
    out = Path(out_dir)
    _check_args(splits, out, name, mode, resize, shard_size, max_bad_fraction)
    out.mkdir(parents=True, exist_ok=True)
    previous = existing_outputs(out)
    if previous and not force:
        listed = ", ".join(p.name for p in previous[:3]) + (", ..." if len(previous) > 3 else "")
        raise UserError(f"{out} already holds shards or a manifest ({listed}); pass --force to replace them")

    total = sum(len(s) for s in splits.values())
    encoder = _Encoder(mode, (resize, resize) if resize else None)
    bad = _BadSamples(total, max_bad_fraction)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    shard_sets: dict[str, _SplitShards] = {}
    bar = tqdm(total=total, unit="img", desc=f"{name}", disable=(not progress) if progress is not None else None)
    try:
        for split_name, split in splits.items():
            shards = shard_sets[split_name] = _SplitShards(out, split_name, shard_size, token)
            for i in range(len(split)):
                try:
                    png = encoder.encode(split.image(i), split.describe(i))
                except BadImage as e:
                    bad.add(split_name, e, bar)
                else:
                    shards.add(png, split.label(i))
                bar.update(1)
            shards.finish()
            if shards.num_samples == 0:
                raise UserError(f"split '{split_name}' has no usable images")
    except BaseException:
        for shards in shard_sets.values():
            shards.discard()
        raise
    finally:
        bar.close()

    for shards in shard_sets.values():
        shards.publish()
    manifest = _manifest(name, encoder, classes, shard_sets, bad)
    write_manifest(out, manifest)
    written = {s["file"] for sh in shard_sets.values() for s in sh.entries}
    for stale in previous:
        if stale.name != MANIFEST_NAME and stale.name not in written:
            stale.unlink()
    return manifest


def write_shards(
    images: np.ndarray | dict[str, tuple[np.ndarray, np.ndarray | None]],
    labels: np.ndarray | None,
    out_dir: str | os.PathLike,
    name: str,
    split: str = "train",
    shard_size: int = DEFAULT_SHARD_SIZE,
    classes: list[str] | None = None,
    mode: str | None = None,
    *,
    resize: int | None = None,
    force: bool = False,
) -> dict:
    """Shards from in-memory uint8 arrays (N,H,W[,C]); pass {split: (images, labels)} for several.

    Labeled data without `classes` gets classes "0".."max label".
    """
    if isinstance(images, dict):
        if labels is not None:
            raise UserError("write_shards: with a dict of splits, pass labels inside it (labels must be None)")
        arrays = images
    else:
        arrays = {split: (images, labels)}
    if not arrays:
        raise UserError("write_shards: no splits given")
    splits = {}
    for split_name, (x, y) in arrays.items():
        x = np.asarray(x)
        y = None if y is None else np.asarray(y)
        check_arrays(x, y, f"write_shards split '{split_name}'")
        splits[split_name] = ArraySplit(x, y, f"split '{split_name}'")
    labeled = {y is not None for _, y in arrays.values()}
    if len(labeled) > 1:
        raise UserError("write_shards: either every split has labels or none has")
    if labeled == {True}:
        max_label = max(int(np.max(y)) for _, y in arrays.values())
        if classes is None:
            classes = [str(i) for i in range(max_label + 1)]
        elif max_label >= len(classes):
            raise UserError(f"write_shards: label {max_label} needs more than the {len(classes)} classes given")
    elif classes is not None:
        raise UserError("write_shards: classes given for unlabeled images")
    return write_dataset(
        splits, out_dir, name, classes=classes, mode=mode, resize=resize,
        shard_size=shard_size, force=force, progress=False,
    )


def existing_outputs(out: Path) -> list[Path]:
    """What a new run would replace: the manifest and shard tars of an earlier run."""
    return sorted(p for p in out.iterdir() if p.is_file() and (p.name == MANIFEST_NAME or SHARD_NAME.match(p.name)))


def _check_args(splits, out: Path, name: str, mode, resize, shard_size: int, max_bad_fraction: float) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if not name or "/" in name:
        raise UserError(f"dataset name {name!r} must be non-empty and contain no '/'")
    for split_name in splits:
        if not re.fullmatch(r"[A-Za-z0-9_]+", split_name):
            raise UserError(f"bad split spec: split name {split_name!r} may only use letters, digits and '_'")
    if mode is not None and mode not in MODES:
        raise UserError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if resize is not None and resize <= 0:
        raise UserError(f"--resize must be a positive size, got {resize}")
    if shard_size <= 0:
        raise UserError(f"--shard-size must be positive, got {shard_size}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise UserError(f"--max-bad-fraction must be between 0 and 1, got {max_bad_fraction}")


class _Encoder:
    """Converts images to one mode and size and encodes lossless PNG; first image fixes defaults."""

    def __init__(self, mode: str | None, size: tuple[int, int] | None):
        self.mode = mode
        self.size = size  # (width, height), PIL order
        self.resize = size is not None

    def encode(self, img: Image.Image, origin: str) -> bytes:
        if self.mode is None:
            self.mode = "L" if img.mode in GRAY_MODES else "RGB"
        if img.mode != self.mode:
            img = img.convert(self.mode)
        if self.resize:
            img = _center_square(img).resize(self.size, Image.Resampling.LANCZOS) if img.size != self.size else img
        elif self.size is None:
            self.size = img.size
        elif img.size != self.size:
            raise BadImage(
                origin,
                f"size {img.size[0]}x{img.size[1]} differs from the dataset's {self.size[0]}x{self.size[1]} "
                "(use --resize to make them equal)",
            )
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()


def _center_square(img: Image.Image) -> Image.Image:
    """Crop the centered square so --resize keeps the aspect ratio instead of squashing."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side)) if w != h else img


class _BadSamples:
    """Counts unusable images and stops the run as soon as the budget is exceeded."""

    def __init__(self, total: int, max_fraction: float):
        self.total = total
        self.max_fraction = max_fraction
        self.allowed = math.floor(max_fraction * total)
        self.by_split: dict[str, int] = {}
        self.records: list[dict] = []

    @property
    def count(self) -> int:
        return sum(self.by_split.values())

    def add(self, split: str, err: BadImage, bar: tqdm) -> None:
        self.by_split[split] = self.by_split.get(split, 0) + 1
        if len(self.records) < MAX_RECORDED_BAD:
            self.records.append({"split": split, "path": err.origin, "reason": err.reason})
        if self.count <= MAX_LISTED_BAD:
            bar.write(f"data-shards: skipping bad image {err.origin}: {err.reason}", file=sys.stderr)
        if self.count > self.allowed:
            first = self.records[0]
            raise UserError(
                f"too many bad images: {self.count} of {self.total} unreadable so far "
                f"(max {self.max_fraction:.2%} = {self.allowed}); first: {first['path']}: {first['reason']}"
            )

    def summary(self) -> dict:
        return {"count": self.count, "by_split": dict(self.by_split), "samples": list(self.records)}


class _SplitShards:
    """The shards of one split: fills `.partial` files, renamed into place only by publish()."""

    def __init__(self, out: Path, split: str, shard_size: int, token: str):
        self.out = out
        self.split = split
        self.shard_size = shard_size
        self.token = token
        self.entries: list[dict] = []
        self.partials: list[Path] = []
        self.num_samples = 0
        self._file = None
        self._tar = None
        self._in_shard = 0

    def add(self, png: bytes, label: int | None) -> None:
        if self._tar is None:
            self._open()
        key = f"{self.split}-{self.num_samples:07d}"
        self._member(f"{key}.png", png)
        if label is not None:
            self._member(f"{key}.cls", str(label).encode("ascii"))
        self.num_samples += 1
        self._in_shard += 1
        if self._in_shard == self.shard_size:
            self._close()

    def finish(self) -> None:
        if self._tar is not None:
            self._close()

    def publish(self) -> None:
        for partial, entry in zip(self.partials, self.entries):
            os.replace(partial, self.out / entry["file"])

    def discard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
        for partial in self.partials:
            partial.unlink(missing_ok=True)

    def _open(self) -> None:
        final = f"{self.split}-{len(self.entries):06d}.tar"
        partial = self.out / f".{final}.{self.token}.partial"
        self.partials.append(partial)
        self._file = open(partial, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.entries.append({"file": final, "num_samples": 0, "sha256": ""})
        self._in_shard = 0

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        info.mtime = 0  # fixed, so identical inputs give byte-identical shards
        self._tar.addfile(info, io.BytesIO(data))

    def _close(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tar = self._file = None
        entry = self.entries[-1]
        entry["num_samples"] = self._in_shard
        entry["sha256"] = file_sha256(self.partials[-1])
        entry["bytes"] = self.partials[-1].stat().st_size


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(name: str, encoder: _Encoder, classes, shard_sets: dict[str, _SplitShards], bad: _BadSamples) -> dict:
    width, height = encoder.size
    splits = {
        split: {"num_samples": shards.num_samples, "shards": shards.entries} for split, shards in shard_sets.items()
    }
    return {
        "format": FORMAT,
        "name": name,
        "mode": encoder.mode,
        "image_size": [height, width],
        "classes": classes,
        "splits": splits,
        "totals": {
            "num_samples": sum(s.num_samples for s in shard_sets.values()),
            "num_shards": sum(len(s.entries) for s in shard_sets.values()),
        },
        "bad_samples": bad.summary(),
    }

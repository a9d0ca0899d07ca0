"""Reading and validating a shard set's `manifest.json` (format `gpt_vision-shards/1`).

Every problem becomes one `UserError` line naming the manifest and what is wrong, so a bad path or
a half-written shard set fails before any worker starts.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import webdataset

from gpt_vision.errors import UserError

MANIFEST_FORMAT = "gpt_vision-shards/1"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    url: str
    num_samples: int


@dataclass(frozen=True)
class Manifest:
    location: str
    name: str
    mode: str
    image_size: tuple[int, int]
    classes: list[str] | None
    splits: dict[str, list[ShardInfo]]
    split_sizes: dict[str, int]

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def local_dir(self) -> Path | None:
        """The manifest's directory when it is on a local filesystem (where a palette can live)."""
        return None if is_url(self.location) else Path(self.location).parent

    def shards(self, split: str) -> list[ShardInfo]:
        """The split's shards; an unknown or empty split is a `UserError`."""
        if split not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise UserError(f"{self.location}: no split '{split}' (splits: {known})")
        shards = self.splits[split]
        if not shards or self.split_sizes[split] == 0:
            raise UserError(f"{self.location}: split '{split}' is empty (no shards or no samples)")
        return shards


def is_url(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def load_manifest(location: str) -> Manifest:
    """Load a manifest from a path to `manifest.json`, its directory, or a URL webdataset can open."""
    path = _manifest_path(location)
    raw = _read(path)
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    return _parse(doc, path)


def _manifest_path(location: str) -> str:
    if is_url(location):
        return location if location.endswith(".json") else location.rstrip("/") + "/" + MANIFEST_NAME
    path = Path(location)
    return str(path / MANIFEST_NAME if path.is_dir() else path)


def _read(path: str) -> bytes:
    try:
        if is_url(path):
            with webdataset.gopen(path, "rb") as stream:
                return stream.read()
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"shard manifest {path} does not exist (give manifest.json or its directory)") from None
    except OSError as error:
        raise UserError(f"cannot read shard manifest {path}: {error}") from None


def _resolve(base: str, file: str) -> str:
    if is_url(file) or file.startswith("/"):
        return file
    return base.rsplit("/", 1)[0] + "/" + file if is_url(base) else str(Path(base).parent / file)


def _parse(doc: object, path: str) -> Manifest:
    def fail(what: str) -> UserError:
        return UserError(f"{path}: {what}")

    if not isinstance(doc, dict):
        raise fail("expected a JSON object")
    if doc.get("format") != MANIFEST_FORMAT:
        raise fail(f"format is {doc.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    mode = doc.get("mode")
    if mode not in ("L", "RGB"):
        raise fail(f"mode is {mode!r}, expected 'L' or 'RGB'")
    size = doc.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise fail(f"image_size is {size!r}, expected [H, W] with positive integers")
    classes = doc.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise fail("classes must be null or a list of strings")
    splits_doc = doc.get("splits")
    if not isinstance(splits_doc, dict) or not splits_doc:
        raise fail("splits is missing or empty")
    splits: dict[str, list[ShardInfo]] = {}
    sizes: dict[str, int] = {}
    for split, entry in splits_doc.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            raise fail(f"split '{split}' needs a 'shards' list")
        shards = []
        for index, shard in enumerate(entry["shards"]):
            if not (isinstance(shard, dict) and isinstance(shard.get("file"), str)
                    and isinstance(shard.get("num_samples"), int) and shard["num_samples"] >= 0):
                raise fail(f"split '{split}' shard {index} needs 'file' (string) and 'num_samples' (int >= 0)")
            shards.append(ShardInfo(_resolve(path, shard["file"]), shard["num_samples"]))
        total = entry.get("num_samples", sum(s.num_samples for s in shards))
        if not isinstance(total, int) or total < 0:
            raise fail(f"split '{split}' num_samples is {total!r}, expected an int >= 0")
        splits[split] = shards
        sizes[split] = total
    return Manifest(
        location=path,
        name=str(doc.get("name", "")),
        mode=mode,
        image_size=(size[0], size[1]),
        classes=classes,
        splits=splits,
        split_sizes=sizes,
    )

"""The shard manifest schema (`manifest.json`, format `gpt_vision-shards/1`): its fields, their
validation, reading and writing — one set of rules for the writer (data_shards) and the readers.

Every problem is one `UserError` line naming the manifest and the field, so a bad path or a
half-written shard set fails before any worker starts. A shard's `file` is a path relative to the
manifest that stays inside its folder, or an allow-listed URL (see `locations`); `pipe:` entries
need `allow_pipe`.
"""

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from gpt_vision.data.locations import is_local, local_path, open_location, refusal, scheme_of
from gpt_vision.errors import UserError
from gpt_vision.layout import write_atomic

FORMAT = "gpt_vision-shards/1"
MANIFEST_NAME = "manifest.json"
MODES = ("L", "RGB")


@dataclass(frozen=True)
class ShardInfo:
    url: str
    num_samples: int
    sha256: str
    size: int | None = None  # bytes; absent in manifests written before sizes were recorded


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
        return local_path(self.location).parent if is_local(self.location) else None

    def shards(self, split: str) -> list[ShardInfo]:
        """The split's shards; an unknown or empty split is a `UserError`."""
        if split not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise UserError(f"{self.location}: no split '{split}' (splits: {known})")
        shards = self.splits[split]
        if not shards or self.split_sizes[split] == 0:
            raise UserError(f"{self.location}: split '{split}' is empty (no shards or no samples)")
        return shards


def manifest_path(location: str | os.PathLike) -> str:
    """The manifest file for a manifest path or URL, or a shard directory (local or remote)."""
    location = str(location)
    if not is_local(location):
        return location if location.endswith(".json") else location.rstrip("/") + "/" + MANIFEST_NAME
    path = local_path(location)
    return str(path / MANIFEST_NAME) if path.is_dir() else location


def read_manifest(location: str | os.PathLike, allow_pipe: bool = False) -> dict:
    """The validated JSON document of a manifest (given as its file, its directory or a URL)."""
    path = manifest_path(location)
    why = refusal(path, allow_pipe)
    if why is not None:
        raise UserError(f"shard manifest {path}: {why}")
    raw = _read(path, allow_pipe)
    if not raw.strip():
        raise UserError(f"shard manifest {path} is empty")
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"shard manifest {path} is not valid JSON: {error}") from None
    _validate(doc, path, allow_pipe)
    return doc


def load_manifest(location: str | os.PathLike, allow_pipe: bool = False) -> Manifest:
    """The manifest with every shard's location resolved (relative to the manifest)."""
    path = manifest_path(location)
    doc = read_manifest(path, allow_pipe)
    splits = {
        split: [ShardInfo(_resolve(path, s["file"]), s["num_samples"], s["sha256"], s.get("bytes"))
                for s in entry["shards"]]
        for split, entry in doc["splits"].items()
    }
    return Manifest(
        location=path, name=doc["name"], mode=doc["mode"], image_size=tuple(doc["image_size"]),
        classes=doc["classes"], splits=splits,
        split_sizes={split: entry["num_samples"] for split, entry in doc["splits"].items()},
    )


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Write the manifest atomically so a crash never leaves half a manifest."""
    final = out_dir / MANIFEST_NAME
    write_atomic(final, json.dumps(manifest, indent=2) + "\n")
    return final


def _read(path: str, allow_pipe: bool) -> bytes:
    try:
        with open_location(path, allow_pipe, "shard manifest") as stream:
            return stream.read()
    except FileNotFoundError:
        raise UserError(f"shard manifest {path} does not exist (give manifest.json or its directory)") from None
    except OSError as error:
        raise UserError(f"cannot read shard manifest {path}: {error}") from None


def _resolve(manifest: str, file: str) -> str:
    if scheme_of(file) is not None:
        return file
    file = posixpath.normpath(file)
    return str(local_path(manifest).parent / file) if is_local(manifest) else manifest.rsplit("/", 1)[0] + "/" + file


def _file_problem(file: str, manifest: str, allow_pipe: bool) -> str | None:
    """Why a shard's `file` may not be used, or None when it may."""
    scheme = scheme_of(file)
    if scheme is None:
        if file.startswith("/"):
            return "an absolute path; name shards relative to the manifest's folder"
        if posixpath.normpath(file).split("/")[0] == "..":
            return "a path leaving the manifest's folder"
        return None
    if scheme == "file":
        if not is_local(manifest):
            return "a local file named by a remote manifest"
        folder = local_path(manifest).parent.resolve()
        if not local_path(file).resolve().is_relative_to(folder):
            return "a path leaving the manifest's folder"
        return None
    return refusal(file, allow_pipe)


def _validate(m: object, path: str, allow_pipe: bool) -> None:
    def bad(field: str, why: str) -> UserError:
        return UserError(f"shard manifest {path}: field '{field}' {why}")

    if not isinstance(m, dict):
        raise UserError(f"shard manifest {path} is not a JSON object")
    if m.get("format") != FORMAT:
        raise bad("format", f"is {m.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(m.get("name"), str) or not m["name"]:
        raise bad("name", "must be a non-empty string")
    if m.get("mode") not in MODES:
        raise bad("mode", f"is {m.get('mode')!r}, expected one of {', '.join(MODES)}")
    size = m.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        raise bad("image_size", f"is {size!r}, expected [height, width] of positive integers")
    classes = m.get("classes")
    if classes is not None and not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise bad("classes", "must be null or a non-empty list of strings")
    splits = m.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise bad("splits", "must be a non-empty object of split name -> shards")
    for split, entry in splits.items():
        where = f"splits.{split}"
        if not isinstance(entry, dict) or not _is_int(entry.get("num_samples")) or entry["num_samples"] < 0:
            raise bad(f"{where}.num_samples", "must be a non-negative integer")
        shards = entry.get("shards")
        if not isinstance(shards, list):
            raise bad(f"{where}.shards", "must be a list")
        for i, shard in enumerate(shards):
            _validate_shard(shard, f"{where}.shards[{i}]", bad, path, allow_pipe)


def _validate_shard(shard: object, where: str, bad, manifest: str, allow_pipe: bool) -> None:
    if not isinstance(shard, dict):
        raise bad(where, "must be an object")
    file = shard.get("file")
    if not isinstance(file, str) or not file:
        raise bad(f"{where}.file", f"is {file!r}, expected a path relative to the manifest's directory or a URL")
    problem = _file_problem(file, manifest, allow_pipe)
    if problem is not None:
        raise bad(f"{where}.file", f"is {file!r}: {problem}")
    if not _is_int(shard.get("num_samples")) or shard["num_samples"] < 0:
        raise bad(f"{where}.num_samples", "must be a non-negative integer")
    digest = shard.get("sha256")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise bad(f"{where}.sha256", "must be 64 lowercase hex digits")
    if "bytes" in shard and not (_is_int(shard["bytes"]) and shard["bytes"] >= 0):
        raise bad(f"{where}.bytes", "must be a non-negative integer")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

"""manifest.json: the one file that says what a shard directory holds.

Readers trust the manifest, not a directory listing, so it is written last and atomically, and
reading it validates every field a consumer relies on.
"""

import json
import os
from pathlib import Path

from gpt_vision.errors import UserError

FORMAT = "gpt_vision-shards/1"
MANIFEST_NAME = "manifest.json"
MODES = ("L", "RGB")


def manifest_path(path_or_dir: str | os.PathLike) -> Path:
    """The manifest file for a shard directory or a manifest path."""
    path = Path(path_or_dir)
    return path / MANIFEST_NAME if path.is_dir() else path


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Write the manifest through a temporary file so a crash never leaves half a manifest."""
    final = out_dir / MANIFEST_NAME
    tmp = out_dir / f".{MANIFEST_NAME}.{os.getpid()}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def read_manifest(path_or_dir: str | os.PathLike) -> dict:
    """Load and validate a manifest; any problem is a UserError naming the file and the field."""
    path = manifest_path(path_or_dir)
    if not path.exists():
        raise UserError(f"no shard manifest at {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"shard manifest {path} is empty")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"shard manifest {path} is not valid JSON: {e}") from None
    _validate(manifest, path)
    return manifest


def shard_files(manifest: dict, split: str, root: str | os.PathLike) -> list[Path]:
    """Absolute shard paths of one split; `root` is the manifest's directory."""
    if split not in manifest["splits"]:
        raise UserError(f"split '{split}' not in shards of '{manifest['name']}' (have: {', '.join(manifest['splits'])})")
    return [Path(root) / shard["file"] for shard in manifest["splits"][split]["shards"]]


def _validate(m: object, path: Path) -> None:
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
            _validate_shard(shard, f"{where}.shards[{i}]", bad)


def _validate_shard(shard: object, where: str, bad) -> None:
    if not isinstance(shard, dict):
        raise bad(where, "must be an object")
    file = shard.get("file")
    if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
        raise bad(f"{where}.file", f"is {file!r}, expected a path relative to the manifest's directory")
    if not _is_int(shard.get("num_samples")) or shard["num_samples"] < 0:
        raise bad(f"{where}.num_samples", "must be a non-negative integer")
    digest = shard.get("sha256")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise bad(f"{where}.sha256", "must be 64 lowercase hex digits")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

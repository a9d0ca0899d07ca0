"""Re-reads a shard directory end to end and lists every way it disagrees with its manifest."""

import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from gpt_vision.errors import UserError

from .manifest import manifest_path, read_manifest
from .writer import file_sha256

ALLOWED_EXTENSIONS = {"png", "cls"}
MEMBER_NAME = re.compile(r"((?:.*/)?[^./]+)\.([^/]+)")  # key = up to the first dot of the basename


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    samples: dict[str, int] = field(default_factory=dict)  # split -> samples read back
    shards: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dir(path_or_dir: str | os.PathLike) -> VerifyReport:
    """Check checksums, counts, keys, PNG size/mode and labels of every shard in the manifest."""
    report = VerifyReport()
    try:
        manifest = read_manifest(path_or_dir)
    except UserError as e:
        report.problems.append(str(e))
        return report
    root = manifest_path(path_or_dir).parent
    for split, entry in manifest["splits"].items():
        seen_keys: set[str] = set()
        total = 0
        for shard in entry["shards"]:
            total += _verify_shard(root / shard["file"], shard, split, manifest, seen_keys, report)
            report.shards += 1
        report.samples[split] = total
        if total != entry["num_samples"]:
            report.problems.append(f"split '{split}': manifest says {entry['num_samples']} samples, shards hold {total}")
        listed = sum(s["num_samples"] for s in entry["shards"])
        if listed != entry["num_samples"]:
            report.problems.append(
                f"split '{split}': manifest num_samples {entry['num_samples']} != sum over its shards {listed}"
            )
    return report


def _verify_shard(path: Path, shard: dict, split: str, manifest: dict, seen_keys: set[str], report: VerifyReport) -> int:
    if not path.is_file():
        report.problems.append(f"{path}: shard file is missing")
        return 0
    digest = file_sha256(path)
    if digest != shard["sha256"]:
        report.problems.append(f"{path}: sha256 {digest[:12]}... does not match manifest {shard['sha256'][:12]}...")
    try:
        samples = _read_samples(path)
    except (tarfile.TarError, OSError, ValueError) as e:
        report.problems.append(f"{path}: not a readable tar: {e}")
        return 0
    key_pattern = re.compile(rf"{re.escape(split)}-\d+")
    for key, members in samples:
        where = f"{path.name}:{key}"
        if not key_pattern.fullmatch(key):
            report.problems.append(f"{where}: key does not look like '{split}-<index>'")
        if key in seen_keys:
            report.problems.append(f"{where}: duplicate key in split '{split}'")
        seen_keys.add(key)
        _check_sample(where, members, manifest, report)
    if len(samples) != shard["num_samples"]:
        report.problems.append(f"{path}: manifest says {shard['num_samples']} samples, shard holds {len(samples)}")
    return len(samples)


def _read_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Group tar members into samples the way WebDataset does: consecutive members sharing a key."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                raise ValueError(f"member {member.name!r} is not a regular file")
            match = MEMBER_NAME.fullmatch(member.name)
            if match is None:
                raise ValueError(f"member {member.name!r} is not named <key>.<extension>")
            key, ext = match.groups()
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(member).read()
    return samples


def _check_sample(where: str, members: dict[str, bytes], manifest: dict, report: VerifyReport) -> None:
    unexpected = sorted(set(members) - ALLOWED_EXTENSIONS)
    if unexpected:
        report.problems.append(f"{where}: unexpected members {', '.join(unexpected)}")
    if "png" not in members:
        report.problems.append(f"{where}: no png image")
    else:
        try:
            with Image.open(io.BytesIO(members["png"])) as img:
                img.load()
                size, mode, fmt = img.size, img.mode, img.format
        except Exception as e:  # any decoder failure is a problem to report, not a crash
            report.problems.append(f"{where}: png does not decode: {type(e).__name__}: {e}")
        else:
            height, width = manifest["image_size"]
            if fmt != "PNG" or size != (width, height) or mode != manifest["mode"]:
                report.problems.append(
                    f"{where}: image is {fmt} {mode} {size[0]}x{size[1]}, "
                    f"manifest says PNG {manifest['mode']} {width}x{height}"
                )
    classes = manifest["classes"]
    if classes is None:
        if "cls" in members:
            report.problems.append(f"{where}: has a label but the manifest has no classes")
        return
    raw = members.get("cls")
    if raw is None:
        report.problems.append(f"{where}: no cls label")
    elif not re.fullmatch(rb"\d+", raw.strip()) or int(raw) >= len(classes):
        report.problems.append(f"{where}: label {raw[:20]!r} is not an integer in 0..{len(classes) - 1}")

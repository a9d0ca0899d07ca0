"""Re-reads a shard set end to end and lists every way it disagrees with its manifest.

Shards are opened the way training opens them (allow-listed names only, never `pipe:`), streamed
once while their sha256 is computed.
"""

import io
import os
import re
import tarfile
from dataclasses import dataclass, field

from PIL import Image

from gpt_vision.data.integrity import DigestReader
from gpt_vision.data.locations import open_location
from gpt_vision.data.manifest import Manifest, ShardInfo, load_manifest
from gpt_vision.errors import UserError

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
    """Check checksums, counts, keys, PNG size/mode and labels of every shard in the manifest.
    A manifest, or a split, without shards or samples is a problem too: there is nothing to verify."""
    report = VerifyReport()
    try:
        manifest = load_manifest(path_or_dir)
    except UserError as e:
        report.problems.append(str(e))
        return report
    for split, shards in manifest.splits.items():
        seen_keys: set[str] = set()
        total = 0
        for shard in shards:
            total += _verify_shard(shard, split, manifest, seen_keys, report)
            report.shards += 1
        report.samples[split] = total
        expected = manifest.split_sizes[split]
        if not shards or expected == 0:
            report.problems.append(f"{manifest.location}: split '{split}' is empty (no shards or no samples)")
        if total != expected:
            report.problems.append(f"split '{split}': manifest says {expected} samples, shards hold {total}")
        listed = sum(s.num_samples for s in shards)
        if listed != expected:
            report.problems.append(f"split '{split}': manifest num_samples {expected} != sum over its shards {listed}")
    return report


def _verify_shard(shard: ShardInfo, split: str, manifest: Manifest, seen_keys: set[str], report: VerifyReport) -> int:
    path = shard.url
    try:
        with open_location(path, False, f"shard manifest {manifest.location}: shard") as stream:
            reader = DigestReader(stream)
            samples = _read_samples(reader)
            reader.drain()
    except FileNotFoundError:
        report.problems.append(f"{path}: shard file is missing")
        return 0
    except (tarfile.TarError, OSError, ValueError) as e:
        report.problems.append(f"{path}: not a readable tar: {e}")
        return 0
    digest = reader.sha256.hexdigest()
    if digest != shard.sha256:
        report.problems.append(f"{path}: sha256 {digest[:12]}... does not match manifest {shard.sha256[:12]}...")
    key_pattern = re.compile(rf"{re.escape(split)}-\d+")
    name = path.rsplit("/", 1)[-1]
    for key, members in samples:
        where = f"{name}:{key}"
        if not key_pattern.fullmatch(key):
            report.problems.append(f"{where}: key does not look like '{split}-<index>'")
        if key in seen_keys:
            report.problems.append(f"{where}: duplicate key in split '{split}'")
        seen_keys.add(key)
        _check_sample(where, members, manifest, report)
    if len(samples) != shard.num_samples:
        report.problems.append(f"{path}: manifest says {shard.num_samples} samples, shard holds {len(samples)}")
    return len(samples)


def _read_samples(stream: DigestReader) -> list[tuple[str, dict[str, bytes]]]:
    """Group tar members into samples the way WebDataset does: consecutive members sharing a key."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
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


def _check_sample(where: str, members: dict[str, bytes], manifest: Manifest, report: VerifyReport) -> None:
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
            height, width = manifest.image_size
            if fmt != "PNG" or size != (width, height) or mode != manifest.mode:
                report.problems.append(
                    f"{where}: image is {fmt} {mode} {size[0]}x{size[1]}, "
                    f"manifest says PNG {manifest.mode} {width}x{height}"
                )
    classes = manifest.classes
    if classes is None:
        if "cls" in members:
            report.problems.append(f"{where}: has a label but the manifest has no classes")
        return
    raw = members.get("cls")
    if raw is None:
        report.problems.append(f"{where}: no cls label")
    elif not re.fullmatch(rb"\d+", raw.strip()) or int(raw) >= len(classes):
        report.problems.append(f"{where}: label {raw[:20]!r} is not an integer in 0..{len(classes) - 1}")

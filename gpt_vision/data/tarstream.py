"""Streaming raw samples out of a tar shard without extracting anything to disk.

Only regular members with safe relative names are read, and only the extensions we decode
(images and `cls` labels); everything else (pickles, `.pyd`, `.pth`, `.npy`, symlinks, `../` or
absolute names) is passed over unread. Problems a sample cannot be blamed on alone — a duplicate
key, a truncated archive — come out as `RawSample`s carrying a `problem`, so they travel through
shuffling and position counting exactly like samples and are counted deterministically.
"""

import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from gpt_vision.data.integrity import ShardAccess, open_shard
from gpt_vision.data.manifest import ShardInfo

DECODED_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "cls"})
MAX_MEMBER_BYTES = 64 << 20


@dataclass
class RawSample:
    shard: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


def _safe_name(member: tarfile.TarInfo) -> str | None:
    """The member's name if it is a regular file with a relative name that stays inside the shard."""
    if not member.isreg():
        return None
    name = member.name
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        return None
    return name


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def iter_raw_samples(shard: ShardInfo, access: ShardAccess) -> Iterator[RawSample]:
    """Raw samples of one shard in archive order; a truncated archive ends with one
    `truncated_tar` item (also when it simply holds fewer samples than the manifest says)."""
    url = shard.url
    seen: set[str] = set()
    emitted = 0
    key: str | None = None
    members: dict[str, bytes] = {}
    problem: str | None = None

    def finish() -> RawSample:
        nonlocal emitted
        emitted += 1
        seen.add(key)
        return RawSample(url, key, {} if problem else members, problem)

    with open_shard(shard, access) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    name = _safe_name(member)
                    if name is None:
                        continue
                    member_key, extension = _split_name(name)
                    if member_key != key:
                        if key is not None:
                            yield finish()
                        key, members = member_key, {}
                        problem = "duplicate_key" if member_key in seen else None
                    if problem or extension not in DECODED_EXTENSIONS:
                        continue
                    if member.size > MAX_MEMBER_BYTES:
                        problem = "oversized_member"
                        continue
                    members[extension] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError, zlib.error):
            yield RawSample(url, key or "<shard start>", problem="truncated_tar")
            return
    if key is not None:
        yield finish()
    if emitted < shard.num_samples:
        yield RawSample(url, key or "<shard start>", problem="truncated_tar")

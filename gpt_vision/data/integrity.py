"""Opening a shard with its integrity checked against the manifest (`data.verify`).

* `hash` (default): a local shard's sha256 is computed before its first read; a remote or
  `pipe:` shard is hashed while it streams and checked when its stream ends (samples read before
  a mismatch were seen, but the run stops there).
* `size`: the byte count only (local: the file's size; remote: the streamed bytes); needs the
  manifest's per-shard `bytes`.
* `off`: no check.

A verdict is kept per process, so each shard is checked once per process, not once per epoch.
A mismatch is a `UserError` naming the shard and the manifest.
"""

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from gpt_vision.data.locations import is_local, local_path, open_location
from gpt_vision.data.manifest import ShardInfo
from gpt_vision.errors import UserError

READ_BLOCK = 1 << 20

_verified: set[tuple[str, str, str]] = set()  # (url, sha256, mode) that matched in this process


@dataclass(frozen=True)
class ShardAccess:
    """How the shards of one manifest may be opened (picklable, travels to loader workers)."""

    manifest: str
    allow_pipe: bool = False
    verify: str = "hash"


class DigestReader:
    """A read-only stream that hashes and counts the bytes passing through it."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(READ_BLOCK):
            pass


@contextmanager
def open_shard(shard: ShardInfo, access: ShardAccess) -> Iterator[BinaryIO]:
    """The shard's bytes as a stream, checked as `access.verify` says (see the module docstring)."""
    key = (shard.url, shard.sha256, access.verify)
    checked = access.verify == "off" or key in _verified
    if not checked and access.verify == "size" and shard.size is None:
        raise UserError(f"shard manifest {access.manifest} records no shard sizes ('bytes'): rewrite it with "
                        "data_shards make, or set data.verify=hash")
    if not checked and is_local(shard.url):
        _check_local(shard, access)
        checked = True
    with _open(shard, access) as stream:
        if checked:
            yield stream
        else:
            reader = DigestReader(stream)
            yield reader
            _read_through(reader, shard)
            _compare(shard, access, reader.sha256.hexdigest(), reader.size)
    _verified.add(key)


def _check_local(shard: ShardInfo, access: ShardAccess) -> None:
    if access.verify == "size":
        try:
            size = local_path(shard.url).stat().st_size
        except OSError as error:
            raise UserError(f"cannot open shard {shard.url}: {error}") from None
        _compare(shard, access, None, size)
        return
    with _open(shard, access) as stream:
        reader = DigestReader(stream)
        _read_through(reader, shard)
    _compare(shard, access, reader.sha256.hexdigest(), reader.size)


@contextmanager
def _open(shard: ShardInfo, access: ShardAccess) -> Iterator[BinaryIO]:
    try:
        stream = open_location(shard.url, access.allow_pipe, f"shard manifest {access.manifest}: shard")
    except OSError as error:
        raise UserError(f"cannot open shard {shard.url}: {error}") from None
    with stream:
        yield stream


def _read_through(reader: DigestReader, shard: ShardInfo) -> None:
    try:
        reader.drain()
    except OSError as error:
        raise UserError(f"cannot read shard {shard.url}: {error}") from None


def _compare(shard: ShardInfo, access: ShardAccess, digest: str | None, size: int) -> None:
    advice = "the shard changed after the manifest was written; rewrite the shards (or set data.verify=off)"
    if access.verify == "size":
        if size != shard.size:
            raise UserError(f"shard {shard.url} holds {size} bytes, manifest {access.manifest} says "
                            f"{shard.size}: {advice}")
        return
    if digest != shard.sha256:
        raise UserError(f"shard {shard.url} has sha256 {digest[:12]}..., manifest {access.manifest} says "
                        f"{shard.sha256[:12]}...: {advice}")

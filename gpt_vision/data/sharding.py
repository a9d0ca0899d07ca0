"""Which shards a (rank, worker) reads in an epoch, and the seeded shuffle buffer.

Everything here is a pure function of (seed, epoch, rank, worker), which is what makes the stream
reproducible and resumable.
"""

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from gpt_vision.data.manifest import ShardInfo

T = TypeVar("T")

SHARD_ORDER, RESAMPLE, SHUFFLE, AUGMENT = 1, 2, 3, 4


def stream_rng(seed: int, epoch: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *parts])


@dataclass(frozen=True)
class EpochPlan:
    """The shards to read in order; when there are fewer shards than readers (`stride` > 1) every
    reader reads them all and keeps the samples whose running index % stride == offset."""

    shards: list[ShardInfo]
    stride: int = 1
    offset: int = 0


def plan_epoch(shards: list[ShardInfo], *, seed: int, epoch: int, rank: int, world_size: int,
               worker: int, num_workers: int, shuffle: bool, resampled: bool) -> EpochPlan:
    readers = world_size * num_workers
    if resampled:
        rng = stream_rng(seed, epoch, RESAMPLE, rank, worker)
        draws = rng.integers(0, len(shards), size=math.ceil(len(shards) / readers))
        return EpochPlan([shards[i] for i in draws])
    order = list(shards)
    if shuffle:
        order = [shards[i] for i in stream_rng(seed, epoch, SHARD_ORDER).permutation(len(shards))]
    if len(shards) >= readers:
        return EpochPlan(order[rank::world_size][worker::num_workers])
    return EpochPlan(order, stride=readers, offset=rank * num_workers + worker)


def buffer_shuffle(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Approximate shuffle through a buffer of `size` items (webdataset's scheme, seeded)."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]

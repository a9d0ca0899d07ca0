"""`ShardLoader`: tokenized batches streamed from tar shards, split by rank and DataLoader worker.

Each (rank, worker) reads a deterministic stream, a function of (seed, epoch, rank, worker):

* training is infinite; per epoch the shard order is shuffled with a seed derived from
  (seed, epoch), shards are dealt out by rank then by worker, and samples pass a seeded shuffle
  buffer. With fewer shards than `world_size * workers`, every reader reads all shards and keeps
  the samples whose running index modulo the number of readers is its own (same cover, more I/O).
* resampled mode draws each reader's shards with replacement, seeded by (seed, epoch, rank,
  worker), for runs whose world size changes.
* evaluation is one unshuffled pass in which every sample is read by exactly one reader.

Workers decode, augment, batch and tokenize, and attach their position (epoch, raw samples consumed
in it) and bad-sample counts to every batch; the main process keeps the position of the last batch
it yielded, so `state_dict()` / `load_state_dict()` resume exactly. A resume fast-forwards through
raw tar members without decoding images.
"""

import dataclasses
import itertools
import warnings
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gpt_vision.data.badsamples import BadSampleTracker
from gpt_vision.data.config import DataConfig
from gpt_vision.data.decode import BadSample, decode_sample
from gpt_vision.data.integrity import ShardAccess
from gpt_vision.data.manifest import Manifest, ShardInfo, load_manifest
from gpt_vision.data.palette import Palette
from gpt_vision.data.sharding import AUGMENT, SHUFFLE, buffer_shuffle, plan_epoch, stream_rng
from gpt_vision.data.tarstream import RawSample, iter_raw_samples
from gpt_vision.data.transforms import Transform, build_transform
from gpt_vision.errors import UserError

STATE_FORMAT = "gpt_vision-stream/1"


@dataclasses.dataclass(frozen=True)
class _StreamSpec:
    """Everything a worker process needs to produce its stream (picklable)."""

    manifest: Manifest
    access: ShardAccess
    split: str
    shards: list[ShardInfo]
    palette: Palette
    transform: Transform | None
    batch_size: int
    rank: int
    world_size: int
    num_workers: int
    seed: int
    train: bool
    resampled: bool
    shuffle_buffer: int
    bad_window: int
    max_bad_fraction: float


class _WorkerStream(IterableDataset):
    def __init__(self, spec: _StreamSpec, starts: list[tuple[int, int]], first_worker: int):
        self.spec = spec
        self.starts = starts
        self.first_worker = first_worker

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.first_worker) % self.spec.num_workers
        try:
            yield from self._batches(worker)
        except UserError as error:  # travels as data so the main process raises it as one line
            yield {"error": str(error)}

    def _items(self, epoch: int, worker: int) -> Iterator[RawSample]:
        spec = self.spec
        plan = plan_epoch(spec.shards, seed=spec.seed, epoch=epoch, rank=spec.rank,
                          world_size=spec.world_size, worker=worker, num_workers=spec.num_workers,
                          shuffle=spec.train, resampled=spec.resampled)
        items = itertools.chain.from_iterable(iter_raw_samples(s, spec.access) for s in plan.shards)
        if plan.stride > 1:
            items = (item for index, item in enumerate(items) if index % plan.stride == plan.offset)
        if spec.train:
            items = buffer_shuffle(items, spec.shuffle_buffer, stream_rng(spec.seed, epoch, SHUFFLE, spec.rank, worker))
        return items

    def _batches(self, worker: int) -> Iterator[dict]:
        spec = self.spec
        tracker = BadSampleTracker(spec.bad_window, spec.max_bad_fraction, spec.split)
        num_classes = len(spec.manifest.classes) if spec.manifest.classes is not None else None
        epoch, skip = self.starts[worker] if spec.train else (0, 0)
        batch: list[tuple[str, np.ndarray, int]] = []
        while True:
            consumed = 0
            for index, raw in enumerate(self._items(epoch, worker)):
                consumed = index + 1
                if index < skip:
                    continue
                try:
                    pixels, label = decode_sample(raw, spec.manifest.mode, spec.manifest.image_size, num_classes)
                except BadSample as bad:
                    tracker.bad(bad.kind, raw.shard, raw.key, str(bad))
                    continue
                tracker.good()
                if spec.transform is not None:
                    pixels = spec.transform(pixels, stream_rng(spec.seed, epoch, AUGMENT, spec.rank, worker, index))
                batch.append((raw.key, pixels, label))
                if len(batch) == spec.batch_size:
                    yield self._collate(batch, worker, epoch, consumed, tracker.counts)
                    batch = []
            if not spec.train:
                if batch:
                    yield self._collate(batch, worker, epoch, consumed, tracker.counts)
                yield {"_stream": self._position(worker, epoch, consumed, tracker.counts)}
                return
            if consumed == 0:
                raise UserError(
                    f"{spec.manifest.location}: split '{spec.split}' gives no samples to rank {spec.rank} "
                    f"worker {worker} (fewer samples than world_size x workers?)"
                )
            epoch, skip = epoch + 1, 0

    def _collate(self, batch, worker: int, epoch: int, consumed: int, bad: Counter) -> dict:
        keys, images, labels = zip(*batch)
        if len({image.shape for image in images}) > 1:
            raise UserError(
                f"{self.spec.manifest.location}: transformed images differ in size "
                f"({sorted({image.shape for image in images})}); set data.augment.center_crop"
            )
        pixels = torch.from_numpy(np.stack(images))
        return {
            "tokens": self.spec.palette.encode(pixels).reshape(len(batch), -1),
            "pixels": pixels,
            "label": torch.tensor(labels, dtype=torch.int64),
            "key": list(keys),
            "_stream": self._position(worker, epoch, consumed, bad),
        }

    @staticmethod
    def _position(worker: int, epoch: int, consumed: int, bad: Counter) -> dict:
        return {"worker": worker, "epoch": epoch, "consumed": consumed, "bad": dict(bad)}


class ShardLoader:
    """Iterable of batches `{"tokens": int64 [B, H*W] (raster order), "pixels": uint8 [B, H, W, C],
    "label": int64 [B] (-1 unlabeled), "key": list[str]}`; see the module docstring for the order.

    Iterating again continues from the current position (training) or repeats the pass (eval).
    `bad_samples` counts skipped samples by kind, summed over workers (and restored with state).
    """

    def __init__(self, cfg: DataConfig, split: str, palette: Palette, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, train: bool = True, transform: Transform | None = None):
        cfg.check()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cfg = cfg
        self.manifest = load_manifest(cfg.manifest, cfg.allow_pipe)
        if palette.channels != self.manifest.channels:
            raise UserError(
                f"the palette has {palette.channels} channel(s) but {self.manifest.location} holds "
                f"{self.manifest.mode} images"
            )
        self.split = split
        self.train = train
        self.num_workers = max(1, cfg.num_workers)
        self._spec = _StreamSpec(
            manifest=self.manifest, access=ShardAccess(self.manifest.location, cfg.allow_pipe, cfg.verify), split=split, shards=self.manifest.shards(split), palette=palette,
            transform=transform if transform is not None else build_transform(cfg.augment, train),
            batch_size=batch_size, rank=rank, world_size=world_size, num_workers=self.num_workers,
            seed=seed, train=train, resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer,
            bad_window=cfg.bad_window, max_bad_fraction=cfg.max_bad_fraction,
        )
        self._positions = [(0, 0)] * self.num_workers
        self._next_worker = 0
        self._bad_base: Counter[str] = Counter()
        self._bad_live: dict[int, Counter[str]] = {}

    @property
    def num_samples(self) -> int:
        """Samples in the split according to the manifest (all ranks together)."""
        return self.manifest.split_sizes[self.split]

    @property
    def bad_samples(self) -> dict[str, int]:
        return dict(sum(self._bad_live.values(), Counter(self._bad_base)))

    def __iter__(self) -> Iterator[dict]:
        self._bad_base = Counter(self.bad_samples)
        self._bad_live = {}
        first_worker = self._next_worker if self.train else 0
        dataset = _WorkerStream(self._spec, list(self._positions), first_worker)
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch_factor if self.cfg.num_workers else None,
            pin_memory=torch.cuda.is_available(),
            # Its own generator: starting a DataLoader must not draw from the global torch RNG,
            # or a resumed run's dropout would not continue where the saved RNG state left it.
            generator=torch.Generator().manual_seed(self._spec.seed),
        )
        for batch in loader:
            if "error" in batch:
                raise UserError(batch["error"])
            stream = batch.pop("_stream")
            worker = stream["worker"]
            self._bad_live[worker] = Counter(stream["bad"])
            if self.train:
                self._positions[worker] = (stream["epoch"], stream["consumed"])
                self._next_worker = (worker + 1) % self.num_workers
            if "tokens" in batch:  # an evaluation worker's last item carries only its final counts
                yield batch

    def state_dict(self) -> dict:
        """JSON-serializable position after the last batch yielded (this rank only)."""
        spec = self._spec
        return {
            "format": STATE_FORMAT,
            "split": self.split,
            "seed": spec.seed,
            "rank": spec.rank,
            "world_size": spec.world_size,
            "num_workers": self.num_workers,
            "resampled": spec.resampled,
            "next_worker": self._next_worker,
            "workers": [list(position) for position in self._positions],
            "bad_samples": self.bad_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. From a different layout (world size, workers,
        rank, seed, split) an exact continuation does not exist: the current epoch restarts in
        resampled mode, with a warning."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise UserError(f"data stream state has format {found!r}, expected {STATE_FORMAT!r}")
        spec = self._spec
        self._bad_base = Counter(state["bad_samples"])
        self._bad_live = {}
        saved = (state["split"], state["seed"], state["rank"], state["world_size"], state["num_workers"])
        current = (self.split, spec.seed, spec.rank, spec.world_size, self.num_workers)
        if saved == current and (state["resampled"] or not spec.resampled):
            self._spec = dataclasses.replace(spec, resampled=state["resampled"])
            self._positions = [(int(epoch), int(consumed)) for epoch, consumed in state["workers"]]
            self._next_worker = int(state["next_worker"])
            return
        epoch = min(int(epoch) for epoch, _ in state["workers"])
        warnings.warn(
            f"data stream state was saved with (split, seed, rank, world_size, workers) = {saved}, now "
            f"{current}: restarting epoch {epoch} in resampled mode",
            RuntimeWarning, stacklevel=2,
        )
        self._spec = dataclasses.replace(spec, resampled=True)
        self._positions = [(epoch, 0)] * self.num_workers
        self._next_worker = 0

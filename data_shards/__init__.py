"""Shard writer: image datasets -> WebDataset tar shards + manifest.json (counts, classes, sha256)."""

from gpt_vision.data.manifest import read_manifest

from .verify import verify_dir
from .writer import DEFAULT_SHARD_SIZE, write_dataset, write_shards

__all__ = ["DEFAULT_SHARD_SIZE", "read_manifest", "verify_dir", "write_dataset", "write_shards"]

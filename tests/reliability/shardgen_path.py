"""`tests/unit/shardgen.py` (real tar shards with planted faults) under one importable name."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("shardgen", Path(__file__).resolve().parents[1] / "unit" / "shardgen.py")
shardgen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shardgen)

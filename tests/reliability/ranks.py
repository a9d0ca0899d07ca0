"""`tests/dist/multiproc.run_ranks` (N real gloo processes) for the drills, and the DistEnv of a rank."""
import sys
from pathlib import Path

_DIST = str(Path(__file__).resolve().parents[1] / "dist")
if _DIST not in sys.path:
    sys.path.insert(0, _DIST)

from multiproc import RankFailed, run_ranks  # noqa: E402

from gpt_vision.distributed import DistEnv  # noqa: E402

__all__ = ["RankFailed", "run_ranks", "rank_env"]


def rank_env(rank: int, world_size: int) -> DistEnv:
    import os
    return DistEnv(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size,
                   master_addr="127.0.0.1", master_port=int(os.environ["MASTER_PORT"]), launcher="torchrun")

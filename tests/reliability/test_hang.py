"""Drill 12: one rank of two stops participating (sleeps inside a step); the other fails within
`parallel.timeout_s` with a message naming the step instead of hanging forever."""
import os
import time

import torch.distributed as dist

from tests.helpers.drills import _free_port
from tests.helpers.inproc import pretrain
from tests.helpers.multiproc import rank_env, run_ranks

TIMEOUT_S = 10


def sleeper(rank_to_stall: int, stall_step: int, seconds: float):
    def inject(step, strategy, loss):
        if step == stall_step and strategy.rank == rank_to_stall:
            time.sleep(seconds)
        return loss
    return inject


def stalled_rank(rank, world_size, manifest, run_dir, port):
    dist.destroy_process_group()  # rejoin with the run's own timeout, as the CLI does
    os.environ["MASTER_PORT"] = str(port)
    started = time.monotonic()
    try:
        pretrain(manifest, run_dir, "parallel.strategy=ddp", f"parallel.timeout_s={TIMEOUT_S}",
                 env=rank_env(rank, world_size), fault_injector=sleeper(1, 3, 4 * TIMEOUT_S))
        return rank, "finished", time.monotonic() - started
    except Exception as error:  # noqa: BLE001 - the message is what the drill checks
        return rank, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", time.monotonic() - started


def test_a_stalled_rank_fails_the_others_within_the_timeout(manifest, tmp_path, figure):
    results = run_ranks(stalled_rank, 2, manifest, tmp_path / "run", _free_port(), timeout=240)
    message, waited = results[0][1], results[0][2]
    figure(f"rank 0 failed after {waited:.0f}s (timeout_s={TIMEOUT_S}, includes startup): {message[:300]}")
    assert message != "finished"
    assert "step 4" in message and "timeout_s" in message  # the 4th step (index 3)

"""`launch/pretrain.py --nproc_per_node N ...`: start N local ranks through torch's elastic agent
(what `torchrun` runs) and exit with the ranks' own code.

`torchrun` itself exits 1 with a ChildFailedError traceback whenever a rank exits non-zero, so a
user error (2) and a save-and-stop (85, which Slurm scripts requeue on) look like crashes. Here
the agent runs in-process and its result is mapped back: 85 when every rank saved and stopped, 2
when a rank met a user error (which rank 0 has already printed as one line), otherwise the first
other failing rank's code (128 + N for a rank killed by signal N). SIGUSR1 to this process reaches every
rank (a save-and-stop, as when sent to the ranks); SIGTERM/SIGINT end the ranks through the agent.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Iterable

from gpt_vision.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError


def launcher_exit_code(codes: Iterable[int]) -> int:
    """One exit code for the ranks' codes (a negative code -N: killed by signal N)."""
    codes = list(codes)
    failed = [code for code in codes if code != 0]
    if not failed:
        return 0
    if all(code == EXIT_PREEMPTED for code in codes):
        return EXIT_PREEMPTED
    if EXIT_USER_ERROR in failed:
        return EXIT_USER_ERROR
    first = next(code for code in failed if code != EXIT_PREEMPTED)
    return 128 - first if first < 0 else first


def run_local_ranks(prog: str, nproc: int, script: str, script_args: list[str]) -> int:
    """Run `script script_args` as `nproc` ranks on this machine; the mapped exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise UserError(f"--nproc_per_node={nproc} must be at least 1")
    args = get_args_parser().parse_args([
        f"--nproc_per_node={nproc}", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0",
        script, *script_args,
    ])
    # The agent logs every rank's failure and each closing signal; the ranks say what happened.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGUSR1, _forward_to_ranks)
    try:
        run(args)
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    except ChildFailedError as failed:
        by_rank = sorted(failed.failures.items())
        code = launcher_exit_code(failure.exitcode for _, failure in by_rank)
        if code not in (EXIT_USER_ERROR, EXIT_PREEMPTED):
            rank, failure = by_rank[0]
            print(f"{prog}: error: rank {rank} exited with code {failure.exitcode} (see its output above)",
                  file=sys.stderr, flush=True)
        return code
    return 0


def _forward_to_ranks(signum: int, _frame) -> None:
    """Send `signum` on to this process's children (the ranks), read from /proc."""
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                os.kill(int(pid), signum)
            except ProcessLookupError:
                pass

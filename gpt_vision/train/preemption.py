"""Stop requests from signals (Slurm's warning signal, SIGTERM on preemption, submitit).

A handler only sets a flag: no collective runs inside a signal handler. The loop asks all
ranks at every step whether any of them was signalled, so they stop at the same step even
when the signal reached only some of them.
"""
from __future__ import annotations

import signal
import threading

_requested = threading.Event()
_reason: list[str] = []


def request_stop(reason: str) -> None:
    _reason.append(reason)
    _requested.set()


def stop_requested() -> bool:
    return _requested.is_set()


def stop_reason() -> str:
    return _reason[0] if _reason else ""


def clear() -> None:
    _requested.clear()
    _reason.clear()


def install_handlers(signals=(signal.SIGUSR1, signal.SIGTERM)) -> None:
    """Route the given signals to a stop request (main thread only, as Python requires)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signals:
        signal.signal(sig, lambda signum, _frame: request_stop(signal.Signals(signum).name))

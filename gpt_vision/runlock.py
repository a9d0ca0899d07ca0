"""One writer per output directory: an OS file lock held for the life of the run.

`flock` on `<dir>/.lock` is released by the kernel whenever the holding process ends, kill -9
included, so a lock that can be taken is never "still held". The file also carries a record of
its holder (pid, host, start time, command): a second writer is refused with one line naming
the holder, and a record left by a process that died without releasing is reported when a new
run takes the directory over. A clean release empties the record.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from gpt_vision.errors import UserError

LOCK_FILE = ".lock"


class DirectoryLock:
    """A held lock; `record()` writes the holder's details, `release()` (or exit) frees it."""

    def __init__(self, directory: Path, fd: int, previous: dict | None):
        self.directory = directory
        self.path = directory / LOCK_FILE
        self.stale = previous  # the record of a holder that died holding the directory, if any
        self._fd: int | None = fd
        self._recorded = False

    def record(self) -> None:
        """Name this process as the holder (after the checks that may still refuse the run)."""
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (text + "\n").encode(), 0)
        self._recorded = True

    def release(self) -> None:
        if self._fd is None:
            return
        if self._recorded:
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_directory(directory: Path, what: str) -> DirectoryLock:
    """Lock `directory` (created if missing) for this process, or raise a UserError naming the
    holder. `what` names the directory in messages ("run directory", "output_dir")."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = describe(_read_record(fd))
        os.close(fd)
        raise UserError(f"{what} {directory} is in use by {holder}; wait for that run to end or choose another directory") from None
    except OSError as error:
        os.close(fd)
        raise UserError(f"cannot lock {what} {directory} ({error.strerror}): this filesystem offers no file locks") from None
    return DirectoryLock(directory, fd, _read_record(fd))


def describe(record: dict | None) -> str:
    """`pid 123@host since 2026-...` (the command stays in the file, for whoever looks)."""
    if not record:
        return "another process (no holder record yet)"
    return f"pid {record.get('pid')}@{record.get('host')} since {record.get('since')}"


def _read_record(fd: int) -> dict | None:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None

import os
import sys
from pathlib import Path

# Tests use tiny models: one intra-op thread per process is faster than two on a 2-core machine
# running several test processes (OpenMP threads spin against each other); subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The shared test helpers are the package `tests.helpers`: the repository root must be importable
# also under a bare `pytest` (which does not put the working directory on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import pytest  # noqa: E402


_SESSION_ENVIRONMENT = dict(os.environ)
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process runs export RANK/WORLD_SIZE/MASTER_* (as launchers do), module fixtures too; jobs
    submitted by later tests (sbatch, submitit) inherit the environment. Each test starts with the
    session's launcher variables and gets back the whole environment it started with."""
    for name in _LAUNCHER_VARIABLES:
        if name in _SESSION_ENVIRONMENT:
            os.environ[name] = _SESSION_ENVIRONMENT[name]
        else:
            os.environ.pop(name, None)
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)

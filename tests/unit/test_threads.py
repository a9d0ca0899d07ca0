"""The CPU thread default: physical cores this process may use, shared among the node's ranks."""
import os

import pytest
import torch

from gpt_vision.threads import choose_threads, configure_threads, physical_cores


@pytest.mark.parametrize("cores, ranks, expected", [(2, 1, 2), (8, 2, 4), (8, 3, 2), (2, 2, 1), (2, 8, 1), (1, 1, 1)])
def test_cores_are_shared_among_local_ranks(cores, ranks, expected):
    assert choose_threads(cores, ranks) == expected


def write_topology(root, layout):
    """layout: cpu -> (package, core)."""
    for cpu, (package, core) in layout.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")


def test_hyperthread_siblings_count_once_and_only_allowed_cpus_count(tmp_path):
    # 2 packages x 2 cores x 2 hyper-threads
    write_topology(tmp_path, {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1), 4: (0, 0), 5: (0, 1), 6: (1, 0), 7: (1, 1)})
    assert physical_cores(range(8), tmp_path) == 4
    assert physical_cores([0, 4], tmp_path) == 1
    assert physical_cores([0, 1, 2], tmp_path) == 3


def test_without_topology_every_cpu_is_a_core(tmp_path):
    assert physical_cores([0, 1, 2], tmp_path / "missing") == 3


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert configure_threads(1) is None


def test_unset_omp_num_threads_sets_torch_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        chosen = configure_threads(1)
        assert chosen == choose_threads(physical_cores(os.sched_getaffinity(0)), 1)
        assert torch.get_num_threads() == chosen
        assert configure_threads(64) == 1
    finally:
        torch.set_num_threads(before)

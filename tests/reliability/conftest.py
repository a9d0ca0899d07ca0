"""Fixtures of the reliability drills: toy shards, the `reliability` marker on every test here,
and `figure(...)`, which records a drill's measured figure so the
terminal summary prints every figure of the run (the numbers in RELIABILITY.md)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.inproc import tmpfs
from tests.helpers.toydata import write_toy_shards


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.reliability)


def pytest_terminal_summary(terminalreporter):
    rows = [(report.nodeid, value) for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
            for name, value in report.user_properties if name == "figure"]
    if rows:
        terminalreporter.section("reliability figures")
        for nodeid, value in rows:
            terminalreporter.write_line(f"{nodeid.split('::')[-1]}: {value}")


@pytest.fixture
def figure(request):
    """`figure("first differing step: none")`: printed now and in the terminal summary."""
    def record(text: str) -> None:
        print(f"FIGURE {request.node.name}: {text}")
        request.node.user_properties.append(("figure", text))
    return record


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (needs root), for disk-full drills."""
    with tmpfs(tmp_path / "disk") as mount:
        yield mount


@pytest.fixture(scope="session")
def manifest(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("shards"))

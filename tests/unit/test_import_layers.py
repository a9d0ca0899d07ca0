"""The package is a strict top-down house: no import circle, and no import runs back up a floor.

The graph is read from the source with `ast` (every import statement, function-level ones too), so
a lazy import inside a function counts as much as one at the top of a file.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gpt_vision"

# Floors from the bottom up. A module may import its own floor or lower ones, never a higher one.
# A module is placed by its longest listed prefix; a new module must be placed here explicitly.
FLOORS = [
    ("errors", ["gpt_vision", "gpt_vision.errors"]),
    ("on-disk layout", ["gpt_vision.layout", "gpt_vision.runlock"]),
    ("config loader", ["gpt_vision.config_loader"]),
    ("components", ["gpt_vision.model", "gpt_vision.data", "gpt_vision.optim", "gpt_vision.distributed",
                    "gpt_vision.slurm_config", "gpt_vision.checkpoint", "gpt_vision.threads"]),
    ("parallel", ["gpt_vision.parallel"]),
    ("train", ["gpt_vision.train", "gpt_vision.run_configs"]),
    ("artifacts", ["gpt_vision.export", "gpt_vision.interop", "gpt_vision.sampling"]),
    ("tasks", ["gpt_vision.tasks"]),
    ("entry points", ["gpt_vision.cli", "gpt_vision.local_launch", "gpt_vision.slurm"]),
]


def module_names() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (`from pkg import sub` names the submodule)."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def floor_of(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    if best is None or (best[1] == len("gpt_vision") and module != "gpt_vision"):
        pytest.fail(f"{module} has no floor: add it to FLOORS in {Path(__file__).name}")
    return best[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_known_edges():
    graph = import_graph()
    assert "gpt_vision.optim" in graph["gpt_vision.parallel.full_replica"]
    assert "gpt_vision.parallel.common" in graph["gpt_vision.parallel.consolidate"]  # `from pkg import module`
    assert "gpt_vision.config_loader" in graph["gpt_vision.slurm"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_only_run_down_the_floors():
    upward = [
        f"{source} ({FLOORS[floor_of(source)][0]}) imports {target} ({FLOORS[floor_of(target)][0]})"
        for source, targets in import_graph().items()
        for target in sorted(targets)
        if floor_of(target) > floor_of(source)
    ]
    assert not upward, "\n".join(upward)


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()} | set(out.split())


def test_config_loader_imports_no_framework():
    loaded = loaded_after("import gpt_vision.config_loader")
    assert not loaded & {"torch", "submitit", "deepspeed", "fairscale"}


def test_run_configs_import_no_launcher_or_backend():
    loaded = loaded_after("import gpt_vision.run_configs")
    assert not loaded & {"submitit", "deepspeed", "fairscale"}

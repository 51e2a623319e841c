"""The core's shape: imports point one way (no module cycle), and the analysis runs without torch."""

import ast
import subprocess
import sys

from tests.conftest import REPO

# folder -> the package it is installed as (pyproject.toml's package-dir)
PACKAGES = {"mowbench": "mowbench", "baselines": "mowbench.baselines", "analysis": "mowbench.analysis",
            "ablations": "mowbench.ablations", "slurm": "mowbench.slurm"}


def module_imports() -> dict[str, set[str]]:
    """mowbench module -> the mowbench modules it imports anywhere in its file (lazy imports included)."""
    files = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    graph = {}
    for module, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if n in files and n != module}
        graph[module] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes (first == last), or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_find_cycle_finds_the_old_run_grid_cycle():
    old = {"mowbench.run": {"mowbench.grid", "mowbench.trainer"}, "mowbench.grid": {"mowbench.run"},
           "mowbench.trainer": set()}
    assert find_cycle(old) == ["mowbench.grid", "mowbench.run", "mowbench.grid"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_mowbench_modules():
    graph = module_imports()
    assert {"mowbench.config", "mowbench.runner", "mowbench.grid", "mowbench.run"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # the command line sits on top: CLI -> grid -> runner -> config -> registry
    assert "mowbench.run" not in set().union(*graph.values())
    assert "mowbench.grid" not in graph["mowbench.runner"] | graph["mowbench.config"]
    assert "mowbench.runner" not in graph["mowbench.config"]


def test_bench_imports_no_baseline():
    """mowbench.bench times what an agent exposes (Agent.bench_phases, bench_extras), knowing no baseline."""
    assert not {m for m in module_imports()["mowbench.bench"] if m.startswith("mowbench.baselines")}


def test_analysis_imports_no_torch():
    code = ("import sys, mowbench.analysis.__main__, mowbench.analysis.ablation_table; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

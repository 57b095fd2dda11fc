"""The package has no import cycle (function-level imports included) and no module over 800 lines.

The import graph is read from the source, not from ``sys.modules``: every ``import`` /
``from ... import`` node of every module at any depth (inside functions, ``if TYPE_CHECKING:``,
``try:``) is an edge, because a function-level import that closes a cycle is still a cycle: it
only moves the failure from import time to the first call.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "lightning_recipe"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to: itself, or its longest importable prefix
    (``lightning_recipe._probe.copy_module`` -> ``lightning_recipe._probe``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package that holds this module
                    base = mod.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import sub` imports the submodule; `from mod import name` the module
                targets = [f"{source}.{alias.name}" for alias in node.names]
            for target in targets:
                if not target.startswith(PACKAGE):
                    continue
                hit = _resolve(target, modules)
                if hit is not None and hit != mod:
                    graph[mod].add(hit)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle (``a -> b -> ... -> a``) through every module that is on one, found in
    the strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles: list[list[str]] = []
    for comp in components:
        members = set(comp)
        for start in comp:
            cycle = _shortest_cycle(graph, members, start)[:-1]
            turn = cycle.index(min(cycle))  # the same cycle found from another module
            cycle = [*cycle[turn:], *cycle[:turn], cycle[turn]]
            if cycle not in cycles:
                cycles.append(cycle)
    return sorted(cycles, key=lambda c: (len(c), c))  # the short ones, usually the cause, first


def _shortest_cycle(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """The shortest path ``start -> ... -> start`` inside one component (breadth-first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in came_from:
                    came_from[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is in a component but on no cycle")


def long_modules() -> dict[str, int]:
    return {
        name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }


def test_import_graph_reads_function_level_and_relative_imports():
    graph = import_graph()
    assert "lightning_recipe.callback" in graph["lightning_recipe.checks.base"]
    # the package re-exports its callbacks
    assert "lightning_recipe.checks.model_lint" in graph["lightning_recipe"]
    assert "lightning_recipe.checks.model_lint.check" in graph["lightning_recipe.checks.model_lint"]
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(toy) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def _print_cycles(cycles: list[list[str]]) -> None:
    for cycle in cycles:
        print("import cycle: " + " -> ".join(cycle))


def test_no_import_cycle():
    cycles = import_cycles(import_graph())
    _print_cycles(cycles)
    assert not cycles, f"{len(cycles)} import cycle(s), the first: {' -> '.join(cycles[0])}"


def test_no_module_over_800_lines():
    long = long_modules()
    for name, n in sorted(long.items()):
        print(f"{name}: {n} lines (limit {MAX_LINES})")
    assert not long, long

"""The package structure README.md "Architecture" describes, checked on the source itself.

- no import cycles among the project's modules (the agent's wiring imports its components,
  never the other way round; the store's backends do not import the module that picks one);
- the agent's SQLite schema is the buffer's own: outside ``edge_agent/buffer/`` no agent
  module runs SQL or reaches the buffer's connection, and none writes the buffer's counters.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge_agent", "cloud_sync", "firmware_bridge", "models")


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every project module ``name`` imports, at any level (TYPE_CHECKING and lazy too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        wanted: list[str] = []
        if isinstance(node, ast.Import):
            wanted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # ``from pkg import module`` depends on that module, not on pkg's __init__.
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            wanted = [m for m in submodules if m in known] or [base]
        for imported in wanted:
            target = imported
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root, first in graph.items():
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(first)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_module_imports_itself_through_others() -> None:
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def agent_side_sources() -> Iterator[tuple[Path, str]]:
    """The agent's modules outside its buffer package (the store service is not the agent)."""
    for path in sorted((ROOT / "edge_agent").rglob("*.py")):
        if "buffer" not in path.relative_to(ROOT / "edge_agent").parts:
            yield path, path.read_text("utf-8")
    for path in sorted((ROOT / "cloud_sync").glob("*.py")):
        yield path, path.read_text("utf-8")


def test_only_the_buffer_package_touches_the_agents_database() -> None:
    sql = re.compile(r"\.(execute|executemany|executescript|call|_call)\(|BEGIN IMMEDIATE")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path, text in agent_side_sources()
        for number, line in enumerate(text.splitlines(), 1)
        if sql.search(line)
    ]
    assert offenders == []


def test_only_the_buffer_writes_its_counters() -> None:
    write = re.compile(r"\bcounters\.\w+(\[[^\]]*\])?\s*(=|\+=|-=)(?!=)|\bcounters\.\w+\.update\(")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path, text in agent_side_sources()
        for number, line in enumerate(text.splitlines(), 1)
        if write.search(line)
    ]
    assert offenders == []

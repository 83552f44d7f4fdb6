"""The package layering stays as the README's code map describes: a graph without cycles, ``model/``
importing only torch, and no arrow from data or evaluation into training.

Imports are read from the source (every ``import``, at the top of a file or inside a function), so
a lazy import counts like any other.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import gptforge

ROOT = Path(gptforge.__file__).parent


def package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0]


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gptforge"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("gptforge"))
    packages = set()
    for name in names:
        parts = name.split(".")
        if len(parts) > 1 and ((ROOT / parts[1]).is_dir() or (ROOT / f"{parts[1]}.py").is_file()):
            packages.add(parts[1])
    return packages - {package_of(path)}


def import_graph() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        graph[package_of(path)] |= imported_packages(path)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail + [node, nxt]
            if nxt not in state:
                found = visit(nxt, trail + [node])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_packages_form_a_graph_without_cycles():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_model_imports_only_torch_and_data_and_eval_never_reach_into_train():
    graph = import_graph()
    assert graph["model"] <= {"errors"}, graph["model"]
    for package in ("data", "eval", "tokenizer", "checkpoints", "runtime"):
        assert "train" not in graph[package], f"{package} imports train"
        assert "commands" not in graph[package] and "serve" not in graph[package]

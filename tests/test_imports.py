"""The package's modules import one another without circles (function-level imports included): device residency
below the model wrappers, loaders above them."""

from __future__ import annotations

import ast

from tests.conftest import ROOT


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in (ROOT / "transfer").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        graph[module] = {node.module for node in ast.walk(ast.parse(path.read_text()))
                         if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transfer.")}
    return graph


def test_no_import_circles():
    graph = import_graph()
    state: dict[str, str] = {}  # grey while on the path, black when done

    def visit(module: str, path: list[str]) -> None:
        state[module] = "grey"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "grey":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep in graph and dep not in state:
                visit(dep, path + [dep])
        state[module] = "black"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert graph["transfer.residency"] == set()  # the bottom: no model, no loader
    below = ("transfer.checkpoint", "transfer.families.transfer25.models", "transfer.families.transfer25.text_encoding", "transfer.embedded_checkpoint", "transfer.acceleration")
    assert not [m for m in below if "transfer.families.transfer25.loading" in graph[m]]  # loaders sit above what they load

"""The import graph points one way: layers import only from layers below them, and nothing cycles.

Every ``import`` statement counts, also those inside functions (a lazy import is still a dependency); only
imports under ``if TYPE_CHECKING:`` (names for annotations) do not.
Layers, lowest first: the core modules; ``ponder.fast``; ``ponder.nn``; ``ponder.models``; ``ponder.data``;
``ponder.methods``; ``ponder.evaluate``; ``ponder.bench``; ``ponder.results``; ``ponder.engine``; and on top the
tools (report, cli, demo ...) and the package's public face (``ponder/__init__.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ponder"

#: what each part of the package may import from ponder (besides itself and the core)
ALLOWED = {
    "fast": set(),
    "nn": {"fast"},
    "models": {"fast", "nn"},
    "data": set(),
    "methods": {"nn", "models"},
    "evaluate": {"fast", "nn", "models", "data"},
    "bench": {"fast", "nn", "models"},
    "results": {"nn", "models", "evaluate", "bench"},
    "engine": {"nn", "models", "data", "methods", "evaluate", "bench", "results"},
}
CORE = {"output", "cost", "config", "layout", "dist", "plot", "weights", "machine", "files", "version", "threads",
        "_autoimport",
        "registry"}
#: the plugin import: the registry imports ponder.models to register the built-in models
EXCEPTIONS = {("registry", "models")}


def _part(module: str) -> str:
    """``ponder.nn.gates`` -> ``nn``; ``ponder.cost`` -> ``cost``; ``ponder`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """Every ``ponder...`` module ``path`` imports at run time (at any depth; ``from ponder import x`` counts as
    ``ponder.x``); imports under ``if TYPE_CHECKING:`` only name types for annotations and do not count."""
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ponder"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ponder":
                found |= {f"ponder.{a.name}" for a in node.names}
            elif node.module.startswith("ponder."):
                found.add(node.module)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = path
    return out


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_from_layers_below(module):
    here = _part(module)
    allowed = ALLOWED.get(here)
    bad = []
    for target in sorted(_imports(MODULES[module])):
        there = _part(target)
        if there == here or there in CORE or (here, there) in EXCEPTIONS:
            continue
        if allowed is None:  # core modules import only the core; the tools on top import anything
            if here in CORE:
                bad.append(target)
            continue
        if there not in allowed:
            bad.append(target)
    assert not bad, f"{module} ({here}) imports {bad}: that points up or sideways in the layers"


def test_no_module_level_import_cycles():
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:  # module level only: what runs at import time
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("ponder"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
                deps |= subs or {node.module}  # `from pkg import submodule` needs the submodule (pkg is loading)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("ponder")}
        graph[name] = {d for d in deps if d in MODULES and d != name}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_layering_rules_cover_every_part():
    parts = {_part(m) for m in MODULES}
    tools = parts - set(ALLOWED) - CORE
    assert tools <= {"__init__", "cli", "demo", "pondermap", "saliency", "report", "official", "sweeps"}, tools

"""The package's shape, checked by reading its source (docs/architecture.md, "Packages and layers").

Rules this file checks:
- Imports only go down the layers: config < imds < ops < http, bus <
  control < sources < process < cli. A module may import its own package
  or a lower layer; two packages on one layer (http and bus) never import
  each other.
- The module import graph has no cycles. Imports under `if TYPE_CHECKING:`
  are for the type checker only (never run), so they are not edges.
- No source file is over MAX_FILE_LINES lines, no class over MAX_CLASS_LINES.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import REPO_ROOT

PACKAGE = REPO_ROOT / "fastimds"
# Lower rank: lower layer. Packages of equal rank may not import each other.
LAYERS: dict[str, int] = {
    "config": 0,
    "imds": 1,
    "ops": 2,
    "http": 3,
    "bus": 3,
    "control": 4,
    "sources": 5,
    "process": 6,
    "cli": 7,
    "__main__": 8,
    "__init__": -1,  # fastimds/__init__.py holds only __version__ and build_kind(): anyone may read it
}
MAX_FILE_LINES = 500
MAX_CLASS_LINES = 300


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` but those under `if TYPE_CHECKING:` (imports the type checker alone runs)."""
    found: list[ast.AST] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        found.append(node)
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if test is not None and "TYPE_CHECKING" in ast.unparse(test):
                pending.extend(child.orelse)
                continue
            pending.append(child)
    return found


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The fastimds modules `module` imports (a `from package import module` names the module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("fastimds"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("fastimds"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in known else target)
    return found - {module}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports_of(module, path, known) & set(known) for module, path in known.items()}


def test_imports_only_go_down_the_layers() -> None:
    upward = []
    for module, targets in import_graph().items():
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if there != here and LAYERS[there] >= LAYERS[here]:
                upward.append(f"{module} imports {target} ({here} may not import {there})")
    assert upward == []


def test_the_import_graph_has_no_cycles() -> None:
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_files_and_classes_stay_small() -> None:
    too_big = []
    for module, path in modules().items():
        source = path.read_text()
        lines = source.count("\n")
        if lines > MAX_FILE_LINES:
            too_big.append(f"{module}: {lines} lines")
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_big.append(f"{module}.{node.name}: {size} lines")
    assert too_big == []


def test_the_checks_see_the_package() -> None:
    # A path mistake would make every check above pass on nothing.
    graph = import_graph()
    assert len(graph) > 40
    assert "fastimds.imds.render" in graph["fastimds.imds.snapshot"]
    assert layer_of("fastimds.http.connection") == "http"

"""The test tree's own rules, checked by reading its source (nothing is imported or run).

Rules this file checks:
- No test module imports from another test module: a helper two files need
  lives in tests/support. Test modules are tests/**/test_*.py and
  bench/bench_*.py (pytest collects both); support modules may not import
  them either.
- tests/unit starts no server process: it imports none of tests.support's
  process starters and never runs `python -m fastimds`. Those tests live in
  tests/e2e, so `make test-fast` stays fast.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

TESTS = REPO_ROOT / "tests"
# What only an end-to-end test may use: each one starts a process.
PROCESS_STARTERS = {
    "tests.support.server_process": {"running_server", "ServerProcess", "serve_command"},
    "tests.support.hostile_clients": None,  # None: any name
    "tests.support.etcd": {"EtcdCluster", "EtcdMember", "etcd", "etcd_cluster"},
}


def sources(*roots: Path, pattern: str = "*.py") -> list[Path]:
    return sorted(path for root in roots for path in root.rglob(pattern) if ".venv" not in path.parts)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)


def imported_modules(path: Path, source: str) -> list[tuple[str, list[str]]]:
    """(module, names) for every import in `source`, relative imports resolved against `path`'s package."""
    package = module_name(path).split(".")[:-1]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((module, [alias.name for alias in node.names]))
    return found


def collected_modules() -> frozenset[str]:
    """What pytest collects: tests/**/test_*.py, and the bench/bench_*.py files that hold tests."""
    found = {module_name(path) for path in sources(TESTS, pattern="test_*.py")}
    benches = sources(REPO_ROOT / "bench", pattern="bench_*.py")
    return frozenset(found | {module_name(path) for path in benches if "\ndef test_" in path.read_text()})


TEST_MODULES = collected_modules()


def is_test_module(module: str) -> bool:
    return module in TEST_MODULES


def imports_of_test_modules(path: Path, source: str) -> list[str]:
    """Each import of a test module in `source`, as "module" or "package.name"."""
    wrong = []
    for module, names in imported_modules(path, source):
        if is_test_module(module):
            wrong.append(module)
        wrong.extend(f"{module}.{name}" for name in names if is_test_module(f"{module}.{name}"))
    return wrong


def process_starters(path: Path, source: str) -> list[str]:
    """Each use in `source` of something that starts a server or the CLI as a process."""
    wrong = []
    for module, names in imported_modules(path, source):
        if module in PROCESS_STARTERS:
            starters = PROCESS_STARTERS[module]
            wrong.extend(f"{module}.{name}" for name in names if starters is None or name in starters)
            if not names and starters is None:
                wrong.append(module)
    if '"-m", "fastimds"' in source:
        wrong.append("python -m fastimds")
    return wrong


def test_the_checkers_catch_what_they_look_for() -> None:
    probe = TESTS / "unit" / "imds" / "test_probe_example.py"
    assert imports_of_test_modules(probe, "from tests.e2e.test_e2e import fresh_get") == ["tests.e2e.test_e2e"]
    assert imports_of_test_modules(probe, "import tests.unit.imds.test_snapshot") == ["tests.unit.imds.test_snapshot"]
    assert imports_of_test_modules(probe, "from tests.e2e import test_e2e") == ["tests.e2e.test_e2e"]
    assert imports_of_test_modules(probe, "from .test_snapshot import reference_gate") == [
        "tests.unit.imds.test_snapshot"
    ]
    assert imports_of_test_modules(probe, "from . import test_routing") == ["tests.unit.imds.test_routing"]
    assert imports_of_test_modules(probe, "from ..http import test_throttle") == ["tests.unit.http.test_throttle"]
    assert imports_of_test_modules(probe, "from bench.bench_ladder import run") == ["bench.bench_ladder"]
    assert imports_of_test_modules(probe, "from tests.support.fakes import request\nimport pytest") == []
    assert imports_of_test_modules(probe, "from bench.bench_scale import run") == []  # a script, not a test module
    assert process_starters(probe, "from tests.support.server_process import running_server, vm_document") == [
        "tests.support.server_process.running_server"
    ]
    assert process_starters(probe, "import tests.support.hostile_clients") == ["tests.support.hostile_clients"]
    assert process_starters(probe, 'subprocess.run([sys.executable, "-m", "fastimds", "logs"])') == [
        "python -m fastimds"
    ]
    assert process_starters(probe, "from tests.support.server_process import vm_document, vm_uuid") == []


def test_no_test_module_imports_another() -> None:
    checked = sources(TESTS, REPO_ROOT / "bench")
    assert len(checked) > 40
    wrong = {
        str(path.relative_to(REPO_ROOT)): found
        for path in checked
        if (found := imports_of_test_modules(path, path.read_text()))
    }
    assert wrong == {}


@pytest.mark.parametrize("package", ["tests/unit", "tests/fuzz"])
def test_fast_tests_start_no_server_process(package: str) -> None:
    checked = sources(REPO_ROOT / package)
    assert checked
    wrong = {
        str(path.relative_to(REPO_ROOT)): found
        for path in checked
        if path.name != "test_layout.py" and (found := process_starters(path, path.read_text()))
    }
    assert wrong == {}

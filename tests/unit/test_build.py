"""Which build runs: the pure-Python modules, or the mypyc-compiled ones (docs/architecture.md, "Two builds").

`make test` runs the suite twice, with FASTIMDS_EXPECT_BUILD=python and then
=mypyc; this fails if the build asked for is not the one imported, so the
compiled run can never quietly test Python (or the pure run a stale extension).
"""

from __future__ import annotations

import ast
import importlib
import os

import pytest

import fastimds
from fastimds.cli.main import build_parser
from tests.support import REPO_ROOT


def hot_modules() -> list[str]:
    """setup.py's HOT_MODULES, read from its source (importing it would run setup())."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "HOT_MODULES" for target in node.targets
        ):
            paths: list[str] = ast.literal_eval(node.value)
            return [path.removesuffix(".py").replace("/", ".") for path in paths]
    raise AssertionError("setup.py has no HOT_MODULES")


def test_the_build_in_use_is_the_one_asked_for() -> None:
    expected = os.environ.get("FASTIMDS_EXPECT_BUILD")
    assert expected in (None, "python", "mypyc"), expected
    if expected is not None:
        assert fastimds.build_kind() == expected


def test_every_hot_module_comes_from_the_same_build() -> None:
    # All compiled or none: one module left as Python beside the others' extensions is a stale build.
    compiled = {name: not str(importlib.import_module(name).__file__).endswith(".py") for name in hot_modules()}
    assert set(compiled.values()) == {fastimds.build_kind() == "mypyc"}, compiled


def test_the_version_names_the_build(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out == f"fastimds {fastimds.__version__} ({fastimds.build_kind()} build)\n"

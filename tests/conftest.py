"""Fixtures shared by the control-plane tests: a durable bus in a temp dir and the one writer over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastimds.bus.files import Bus
from fastimds.control.writer import Control
from fastimds.imds.registry import VmRegistry


@pytest.fixture
def bus(tmp_path: Path) -> Bus:
    return Bus(tmp_path / "bus", durable=True)


@pytest.fixture
def control(bus: Bus) -> Control:
    return Control(bus, VmRegistry())

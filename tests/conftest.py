"""Fixtures shared by the control-plane tests: a durable bus in a temp dir and the control plane over it.

The control serves in-process, as a single-process server runs it: every
write is applied at once by the same Follower code the workers run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fastimds.bus.files import Bus
from fastimds.control.plane import ControlPlane
from fastimds.control.writer import Control
from fastimds.ops.event_log import EventLog
from tests.support.fakes import in_process


@pytest.fixture
def log() -> EventLog:
    return EventLog()


@pytest.fixture
def bus(tmp_path: Path, log: EventLog) -> Bus:
    return Bus(tmp_path / "bus", durable=True, log=log)


@pytest.fixture
def plane(bus: Bus, log: EventLog) -> ControlPlane:
    return in_process(ControlPlane.over(bus, log))


@pytest.fixture
def control(plane: ControlPlane) -> Control:
    return plane.control

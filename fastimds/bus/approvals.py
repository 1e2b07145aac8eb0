"""How a scheduled-event approval gets from the VM that sent it to the control plane.

Rules of this module:
- Workers never write VM data (fastimds.control.writer), yet an approval
  (POST /metadata/scheduledevents) arrives at a worker. The worker checks it
  against the snapshot it serves, answers 200 and hands the EventIds to
  `APPROVALS`, which the server sets once per process:
  - one process: to the control plane (`Control.approve`) on the loop's next
    turn (`Deferred`), not inside the request's parser callback, which the
    publish it causes could re-enter (a long-poll on the same connection);
  - several: a file in the bus's `approvals/` folder, written whole and then
    renamed into place (readers never see half of one), which the control
    process watches, applies and deletes (`take_approvals`). Workers follow
    the bus folder without recursing, so these files never wake them.
- Approval is by EventId alone: one event can span many VMs (a scale set),
  and approving it from any of them starts it on all (spec §8). A VM can only
  approve an id its own snapshot holds, which the worker checks first.
- Not a hot path: at most a few approvals per event.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path
from typing import Protocol

import orjson

from fastimds.bus.files import write_whole
from fastimds.imds.once import Once
from fastimds.ops.event_log import log_event

APPROVALS_FOLDER = "approvals"
SUFFIX = ".json"


class ApprovalSink(Protocol):
    def approve(self, event_ids: frozenset[str]) -> None: ...


class Unconnected:
    """Before the server connects a sink (unit tests of routing): approvals are logged and dropped."""

    def approve(self, event_ids: frozenset[str]) -> None:
        log_event("approval_dropped", events=sorted(event_ids))


class Deferred:
    """One process's sink: `sink.approve` on the event loop's next turn."""

    def __init__(self, sink: ApprovalSink) -> None:
        self.sink = sink

    def approve(self, event_ids: frozenset[str]) -> None:
        asyncio.get_running_loop().call_soon(self.sink.approve, event_ids)


class BusApprovals:
    """A worker's sink: one file per approval in the bus's approvals folder."""

    def __init__(self, bus_directory: Path, durable: bool) -> None:
        self.directory = approvals_directory(bus_directory)
        self.durable = durable
        self.sequence = itertools.count()

    def approve(self, event_ids: frozenset[str]) -> None:
        name = f"{os.getpid()}-{next(self.sequence)}{SUFFIX}"
        write_whole(self.directory / name, orjson.dumps({"EventIds": sorted(event_ids)}), self.durable)


def approvals_directory(bus_directory: Path) -> Path:
    directory = bus_directory / APPROVALS_FOLDER
    directory.mkdir(exist_ok=True)
    return directory


def take_approvals(directory: Path) -> frozenset[str]:
    """Every EventId approved in `directory`'s files; the files are deleted once read."""
    approved: set[str] = set()
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        if path.name.startswith("."):
            continue
        try:
            record = orjson.loads(path.read_bytes())
            ids = record["EventIds"]
            if not isinstance(ids, list) or not all(isinstance(event_id, str) for event_id in ids):
                raise ValueError("EventIds must be a list of strings")
            approved.update(ids)
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log_event("approval_unreadable", path=str(path), error=str(exc))
        path.unlink(missing_ok=True)
    return frozenset(approved)


APPROVALS: Once[ApprovalSink] = Once(Unconnected)

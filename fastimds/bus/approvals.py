"""How a scheduled-event approval gets from the VM that sent it to the control plane.

Rules of this module:
- Whoever serves VMs never writes VM data (fastimds.control.writer), yet an
  approval (POST /metadata/scheduledevents) arrives where VMs are served.
  The server checks it against the snapshot it serves, answers 200 and hands
  the EventIds to its `BusApprovals`: a file in the bus's approvals folder
  (fastimds.bus.layout), written whole and then renamed into place (readers
  never see half of one). The control plane watches that folder, applies
  the approvals and deletes the files (`take_approvals`).
- One path for every topology: a single process sends its approvals through
  the folder too, so an approval never runs inside the request's parser
  callback (the publish it causes could re-enter a long-poll on the same
  connection), and every test of approvals exercises the production path.
- Approval is by EventId alone: one event can span many VMs (a scale set),
  and approving it from any of them starts it on all (spec §8). A VM can only
  approve an id its own snapshot holds, which the server checks first.
- Not a hot path: at most a few approvals per event.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import orjson

from fastimds.bus.atomic import write_whole
from fastimds.bus.layout import APPROVAL_SUFFIX, TEMP_PREFIX, approvals_directory
from fastimds.ops.event_log import EventLog


class ApprovalSink(Protocol):
    def approve(self, event_ids: frozenset[str]) -> None: ...


class BusApprovals:
    """The serving side's sink: one file per approval in the bus's approvals folder."""

    def __init__(self, bus_directory: Path, durable: bool, written: Callable[[], None] | None = None) -> None:
        self.directory = approvals_directory(bus_directory)
        self.durable = durable
        self.sequence = itertools.count()
        # In a single process, the control plane beside us: told at once, instead of by a watch.
        self.written = written

    def approve(self, event_ids: frozenset[str]) -> None:
        name = f"{os.getpid()}-{next(self.sequence)}{APPROVAL_SUFFIX}"
        write_whole(self.directory / name, orjson.dumps({"EventIds": sorted(event_ids)}), self.durable)
        if self.written is not None:
            self.written()


def take_approvals(directory: Path, log: EventLog) -> frozenset[str]:
    """Every EventId approved in `directory`'s files; the files are deleted once read."""
    approved: set[str] = set()
    for path in sorted(directory.glob(f"*{APPROVAL_SUFFIX}")):
        if path.name.startswith(TEMP_PREFIX):
            continue
        try:
            record = orjson.loads(path.read_bytes())
            ids = record["EventIds"]
            if not isinstance(ids, list) or not all(isinstance(event_id, str) for event_id in ids):
                raise ValueError("EventIds must be a list of strings")
            approved.update(ids)
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.event("approval_unreadable", path=str(path), error=str(exc))
        path.unlink(missing_ok=True)
    return frozenset(approved)

"""How a scheduled-event approval gets from the VM that sent it to the control plane.

Rules of this module:
- Whoever serves VMs never writes VM data (fastimds.control.writer), yet an
  approval (POST /metadata/scheduledevents) arrives where VMs are served.
  The server checks it against the snapshot it serves (an approval of
  events already Started is answered there and never gets here), answers
  and hands the approving VM's id and the EventIds to its `BusApprovals`.
- `BusApprovals.approve` does no I/O: it notes the approval in memory and
  answers at once whether it was taken. The notes are written as one file
  per batch, at most one every APPROVAL_BATCH_S, in a thread off the loop
  (fsync can take milliseconds, and 12,000 approvals fsynced one by one on
  the loop gave other VMs p99 1 s: reliability.md), one write at a time.
  A file is written whole and then renamed into place (readers never see
  half of one) into the bus's approvals folder (fastimds.bus.layout); the
  control plane watches it, applies the approvals and deletes the files
  (`take_approvals`).
- Each VM may have APPROVALS_PER_VM_PER_S approvals taken per second (per
  worker). Past that, `approve` answers False and the VM gets Azure's 429
  with Retry-After (spec §3.6): the approval was not recorded, so a 200
  would tell the VM something false; a client retries a 429. An approval
  of ids this VM already has waiting (or had taken this second) is the same
  approval again: True (200, as Azure answers a repeat, spec §8), nothing
  more to write, and it costs none of the rate.
- One path for every topology: a single process sends its approvals through
  the folder too (told at once by `written`, on the loop, never inside a
  parser callback), and every test of approvals exercises the production path.
- A file names the approving VM: {"Approvals": [{"VmId": ..., "EventIds":
  [...]}, ...]}. The control starts an event only within the group of the
  approving VM's event (fastimds.control.event_clock). A file without VM ids
  (written before they were recorded) is dropped and logged: its events
  still start at their NotBefore.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import orjson

from fastimds.bus.atomic import write_whole
from fastimds.bus.layout import APPROVAL_SUFFIX, TEMP_PREFIX, approvals_directory
from fastimds.ops.event_log import EventLog

# Approvals are written at most this often per worker (one file for all of
# them): a VM's approval reaches the control within ~50 ms plus the watch,
# far inside any event's notice (30 s at the least, spec §8), and a flood
# costs at most 20 files a second instead of one fsync per request.
APPROVAL_BATCH_S = 0.05
# Approvals taken per VM per second, per worker: Azure's per-VM IMDS rate
# (5 a second, spec §3.6); a VM approves a few events per maintenance, so a
# real client never meets it.
APPROVALS_PER_VM_PER_S = 5
# VMs whose approval rate is tracked per worker before the table starts over
# (only served VMs reach it, so the fleet's size bounds it anyway).
MAX_APPROVING_VMS = 100_000


class ApprovalSink(Protocol):
    """What a worker's connections hand approvals to (declared again in fastimds.http.worker_state)."""

    def approve(self, vm_id: str, event_ids: frozenset[str]) -> bool: ...


class _Window:
    """One VM's approvals taken in the current second."""

    __slots__ = ("second", "taken", "ids")

    def __init__(self, second: int) -> None:
        self.second = second
        self.taken = 0
        self.ids: set[str] = set()


class BusApprovals:
    """The serving side's sink: approvals noted in memory, written in batches to the bus's approvals folder."""

    def __init__(
        self,
        bus_directory: Path,
        durable: bool,
        written: Callable[[], None] | None = None,
        *,
        log: EventLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = approvals_directory(bus_directory)
        self.durable = durable
        self.sequence = itertools.count()
        # In a single process, the control plane beside us: told at once, instead of by a watch.
        self.written = written
        self.log = log if log is not None else EventLog()
        self.clock = clock
        self.pending: dict[str, set[str]] = {}  # VM id -> EventIds noted, not yet written
        self.windows: dict[str, _Window] = {}
        self.flushing = False  # a batch is due or being written: later approvals wait for the next
        self.files_written = 0
        self.refused = 0  # past a VM's rate (429)

    def approve(self, vm_id: str, event_ids: frozenset[str]) -> bool:
        """Note VM `vm_id`'s approval of `event_ids`; False if the VM is past its rate (see the module rules)."""
        second = int(self.clock())
        window = self.windows.get(vm_id)
        if window is None or window.second != second:
            if len(self.windows) >= MAX_APPROVING_VMS:
                self.windows.clear()
            window = self.windows[vm_id] = _Window(second)
        if event_ids <= window.ids or event_ids <= self.pending.get(vm_id, set()):
            return True  # the same approval again: already on its way
        if window.taken >= APPROVALS_PER_VM_PER_S:
            self.refused += 1
            return False
        window.taken += 1
        window.ids |= event_ids
        self.pending.setdefault(vm_id, set()).update(event_ids)
        self._schedule()
        return True

    def flush(self) -> None:
        """Write what is noted now, on this thread (no loop, or a worker stopping)."""
        batch = self._take()
        if batch:
            self._write(batch)
            if self.written is not None:
                self.written()

    def _schedule(self) -> None:
        if self.flushing:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a direct call, a test): nothing to defer to
            self.flush()
            return
        self.flushing = True
        loop.call_later(APPROVAL_BATCH_S, self._write_batch, loop)

    def _write_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._take()
        if not batch:
            self.flushing = False
            return
        future = loop.run_in_executor(None, self._write, batch)
        future.add_done_callback(self._batch_written)

    def _batch_written(self, future: asyncio.Future[None] | Future[None]) -> None:
        """On the loop, once a batch's file is in place (or failed): tell the control, take the next batch."""
        self.flushing = False
        error = future.exception() if not future.cancelled() else None
        if error is not None:  # a full disk: the events still start at NotBefore
            self.log.event("approval_write_failed", error=repr(error))
        elif self.written is not None:
            try:
                self.written()
            except Exception as exc:  # the control's apply failed (a full disk): later approvals still go
                self.log.event("approval_apply_failed", error=repr(exc))
        if self.pending:
            self._schedule()

    def _take(self) -> list[dict[str, Any]]:
        batch, self.pending = self.pending, {}
        return [{"VmId": vm_id, "EventIds": sorted(ids)} for vm_id, ids in sorted(batch.items())]

    def _write(self, batch: list[dict[str, Any]]) -> None:
        name = f"{os.getpid()}-{next(self.sequence)}{APPROVAL_SUFFIX}"
        write_whole(self.directory / name, orjson.dumps({"Approvals": batch}), self.durable)
        self.files_written += 1


def _records(record: Any) -> dict[str, set[str]]:
    """One file's approvals, VM id -> EventIds; ValueError if it is not a file `BusApprovals` writes."""
    approvals = record.get("Approvals") if isinstance(record, dict) else None
    if not isinstance(approvals, list):
        raise ValueError("expected {'Approvals': [{'VmId': ..., 'EventIds': [...]}, ...]}")
    found: dict[str, set[str]] = {}
    for approval in approvals:
        vm_id = approval.get("VmId") if isinstance(approval, dict) else None
        ids = approval.get("EventIds") if isinstance(approval, dict) else None
        if not isinstance(vm_id, str) or not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError("each approval is {'VmId': str, 'EventIds': [str, ...]}")
        found.setdefault(vm_id, set()).update(ids)
    return found


def take_approvals(directory: Path, log: EventLog) -> dict[str, frozenset[str]]:
    """Every approval in `directory`'s files, approving VM id -> EventIds; the files are deleted once read."""
    approved: dict[str, set[str]] = {}
    for path in sorted(directory.glob(f"*{APPROVAL_SUFFIX}")):
        if path.name.startswith(TEMP_PREFIX):
            continue
        try:
            for vm_id, ids in _records(orjson.loads(path.read_bytes())).items():
                approved.setdefault(vm_id, set()).update(ids)
        except (OSError, orjson.JSONDecodeError, ValueError) as exc:
            log.event("approval_unreadable", path=str(path), error=str(exc))
        path.unlink(missing_ok=True)
    return {vm_id: frozenset(ids) for vm_id, ids in approved.items()}

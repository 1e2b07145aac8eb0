"""The follower: what serves VMs applies what the bus holds, and nothing else.

Rules of this module:
- Every process that serves VMs (a worker, or the single process) has one
  `Follower` and never writes. It applies the files present at start (the
  last good data, with --state-dir), then every change the directory watch
  reports, with a rescan when the watch is idle.
- A file is applied only when its generation is newer than what is served,
  so replays, and a write applied at once by the in-process control
  (fastimds.control.writer), are no-ops when the watch reports them.
- A file that does not validate is logged and skipped; an address conflict
  within one batch is retried while retrying helps (an address can move
  between VMs in one batch).
- The injected faults file is loaded into this follower's fault table, and
  every memoised reply is forgotten when it changes.
- All of this runs on the event loop thread, between requests.
"""

from __future__ import annotations

import asyncio
import time

from fastimds.bus.files import Bus, BusEntry
from fastimds.bus.layout import FAULTS_FILE, vm_id_of
from fastimds.bus.watch import start_watch
from fastimds.imds import faults
from fastimds.imds.datafile import DataError
from fastimds.imds.registry import ConflictError, VmRegistry
from fastimds.ops.event_log import EventLog


def apply_entries(registry: VmRegistry, entries: list[BusEntry], log: EventLog) -> None:
    """Apply bus entries; an address can move between VMs within one batch, so
    apply whatever does not conflict, then retry the rest while that helps."""
    pending = entries
    while pending:
        refused = [entry for entry in pending if not apply_entry(registry, entry, log)]
        if len(refused) == len(pending):
            break
        pending = refused


def apply_entry(registry: VmRegistry, entry: BusEntry, log: EventLog) -> bool:
    """Publish (or remove) a bus entry if it is newer than what is served; False on a conflict."""
    store = registry.stores.get(entry.vm_id)
    if store is not None and entry.generation <= store.generation:
        return True
    if entry.document is None:
        if registry.remove(entry.vm_id, entry.generation):
            log.event("vm_removed", vm=entry.vm_id, generation=entry.generation)
        return True
    try:
        vm = entry.described()
        registry.publish(entry.vm_id, vm, entry.generation)
        log.event("update_applied", vm=entry.vm_id, generation=entry.generation)
    except DataError as exc:
        log.event("state_file_invalid", vm=entry.vm_id, problems=exc.problems)
    except ConflictError as exc:
        log.event("state_file_conflict", vm=entry.vm_id, error=str(exc))
        return False
    return True


class Follower:
    """One serving process's view of the bus: its registry and its fault table."""

    def __init__(
        self, bus: Bus, registry: VmRegistry, log: EventLog, budgets: faults.FaultBudgets | None = None
    ) -> None:
        self.bus = bus
        self.registry = registry
        self.log = log
        self.stamps: dict[str, tuple[int, int]] = {}  # what each VM file looked like when last applied
        # The injected faults this process applies; their counts are the server's shared `budgets`.
        self.fault_table = faults.FaultTable(budgets)
        self.faults_stamp: tuple[int, int] | None = None

    def rescan(self) -> None:
        """Apply every file that changed, appeared or vanished since the last look."""
        stamps = self.bus.stamps()
        changed = {vm_id for vm_id, stamp in stamps.items() if self.stamps.get(vm_id) != stamp}
        self.apply(changed | (set(self.stamps) - set(stamps)))
        if self.bus.faults_stamp() != self.faults_stamp:
            self.load_faults()

    def load_faults(self) -> None:
        self.faults_stamp = self.bus.faults_stamp()
        records = self.bus.read_faults()
        try:
            self.fault_table.load(records, time.time())
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.log.event("faults_file_invalid", error=repr(exc))

    def apply(self, vm_ids: set[str]) -> None:
        """Read and apply these VMs' files (a watch event, a rescan, or the in-process control's write)."""
        entries = []
        for vm_id in sorted(vm_ids):
            path = self.bus.path_of(vm_id)
            try:
                status = path.stat()
                self.stamps[vm_id] = (status.st_mtime_ns, status.st_size)
            except FileNotFoundError:
                self.stamps.pop(vm_id, None)
            entry = self.bus.read(vm_id)
            if entry is not None:
                entries.append(entry)
        apply_entries(self.registry, entries, self.log)

    def on_change(self, names: set[str]) -> None:
        """What the watch reports: VM files and the faults file, by name."""
        self.apply({vm_id for name in names if (vm_id := vm_id_of(name)) is not None})
        if FAULTS_FILE in names:
            self.load_faults()

    async def start(self) -> asyncio.Task[None]:
        """Start following; returns once the watch runs and the bus is applied."""
        return await start_watch(self.bus.directory, on_change=self.on_change, on_idle=self.rescan, log=self.log)

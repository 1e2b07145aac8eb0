"""The injected-faults list (fastimds.imds.faults), owned by the control plane like VM data.

Rules of this module:
- One list for the whole server: validated, written to the bus (durable before
  acknowledged, as VM updates are), and from there loaded by every follower,
  the in-process one at once.
- Faults saved in the state dir are kept across restarts; a counted one gets
  its whole count again when the server starts (`rearm`), not when a control
  process is replaced (that one inherits the counts left).
- A fault may name VMs only the control's own model knows.
"""

from __future__ import annotations

import time
from typing import Any

from fastimds.control.writer import Control, UpdateError
from fastimds.imds import faults
from fastimds.ops.event_log import EventLog


class FaultList:
    def __init__(self, control: Control, log: EventLog, budgets: faults.FaultBudgets) -> None:
        self.control = control
        self.log = log
        self.budgets = budgets  # the counts every process of the server shares (made before any fork)
        self.records: list[faults.FaultRecord] = self._valid(control.bus.read_faults())

    def _valid(self, records: list[faults.FaultRecord]) -> list[faults.FaultRecord]:
        try:
            faults.FaultTable(self.budgets).load(records, time.time())  # what every follower will do with them
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.log.event("faults_file_invalid", error=repr(exc))  # served without them; the next write replaces it
            return []
        return records

    def rearm(self) -> None:
        """At server start: counted faults saved in the state dir get their whole count again.

        Counts live in shared memory (`budgets`, fastimds.imds.faults.FaultBudgets), which a restart empties.
        """
        for record in self.records:
            slot, count = record.get("slot"), record.get("count")
            if isinstance(count, int) and isinstance(slot, int) and 0 <= slot < faults.MAX_FAULTS:
                self.budgets.set(slot, count)

    def live(self) -> list[faults.FaultRecord]:
        return faults.live(self.records, time.time(), self.budgets)

    def add(self, request: Any, vm_ids: list[str] | None) -> faults.FaultRecord:
        """Inject a fault on `vm_ids` (None: every VM, present and future); returns its record."""
        problems = faults.fault_problems(request)
        if problems:
            raise UpdateError(400, "invalid fault", problems)
        for vm_id in vm_ids or []:
            if self.control.vm(vm_id) is None:
                raise UpdateError(404, f"no VM {vm_id!r}")
        records = self.live()
        if len(records) >= faults.MAX_FAULTS:
            raise UpdateError(409, f"at most {faults.MAX_FAULTS} faults at a time")
        record = faults.make_fault(request, vm_ids, time.time(), self.budgets.free_slot(records), self.budgets)
        self._write([*records, record])
        self.log.event("fault_added", fault=record)
        return record

    def remove(self, fault_id: str | None = None, vm_id: str | None = None) -> list[str]:
        """Remove one fault, or a VM's own faults, or (neither given) all; returns the ids removed."""
        records = self.live()
        if fault_id is not None:
            removed = [record for record in records if record["id"] == fault_id]
            if not removed:
                raise UpdateError(404, f"no fault {fault_id!r}")
        elif vm_id is not None:
            removed = [record for record in records if record["vms"] == [vm_id]]
        else:
            removed = records
        self._write([record for record in records if record not in removed])
        self.log.event("faults_removed", faults=[record["id"] for record in removed])
        return [record["id"] for record in removed]

    def _write(self, records: list[faults.FaultRecord]) -> None:
        self.control.bus.write_faults(records)  # durable before acknowledged, as VM updates are
        self.records = records
        if self.control.in_process is not None:
            self.control.in_process.load_faults()  # served before acknowledged, as VM updates are

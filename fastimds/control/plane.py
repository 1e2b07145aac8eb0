"""The control plane's parts, built together: the writer, the event clock, the fault list.

Rules of this module:
- One ControlPlane per server: in the control process, or in the single
  process beside the serving code. Everything it knows is its own model
  (fastimds.control.model), loaded from the bus and then kept by its writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastimds.bus.files import Bus
from fastimds.control.event_clock import EventClock
from fastimds.control.faults import FaultList
from fastimds.control.writer import Control
from fastimds.imds.faults import MAX_FAULTS, FaultBudgets
from fastimds.ops.event_log import EventLog


@dataclass(frozen=True)
class ControlPlane:
    control: Control
    clock: EventClock
    faults: FaultList

    @classmethod
    def over(
        cls, bus: Bus, log: EventLog, default_vm_id: str | None = None, budgets: FaultBudgets | None = None
    ) -> ControlPlane:
        """A plane over `bus` with the bus's saved state loaded (the last good data, with --state-dir).

        `budgets`: the fault counts the server's processes share (made before any fork); None makes
        private ones (one process, or a test).
        """
        control = Control(bus, log, default_vm_id)
        control.load_state()
        return cls(control, EventClock(control, log), FaultList(control, log, budgets or FaultBudgets(MAX_FAULTS)))

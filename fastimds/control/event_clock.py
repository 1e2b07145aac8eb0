"""Scheduled events as the control plane runs them: scheduling, the clock, approvals.

Rules of this module:
- An event's lifecycle (fastimds.imds.events) runs here: the clock starts and
  removes events on time, approvals arrive through the bus's approvals
  folder (fastimds.bus.approvals) from whoever served the approving request,
  and every change is a new generation of the VM, written through `Control`
  like any update.
- It reads VMs from the control's own model, never from what is served.
- A failed transition (the bus write failed) is logged and tried again
  soon: the clock never stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from fastimds.bus.approvals import take_approvals
from fastimds.bus.layout import approvals_directory
from fastimds.bus.watch import start_watch
from fastimds.control.writer import Control, UpdateError, vm_name
from fastimds.imds import events
from fastimds.ops.event_log import EventLog

# The event clock wakes at least this often, so a wall-clock step cannot
# delay an event's start or removal for long.
EVENT_CLOCK_MAX_SLEEP_S = 5.0
# After a failed transition (the bus write failed), the clock tries again this soon.
EVENT_CLOCK_RETRY_S = 1.0


class EventClock:
    def __init__(self, control: Control, log: EventLog) -> None:
        self.control = control
        self.log = log

    def add_event(self, vm_ids: list[str], request: Any) -> tuple[str, dict[str, int]]:
        """Schedule one event on every VM in `vm_ids`; returns its EventId and each VM's new generation.

        Its Resources default to the names of all of them: one event, as Azure
        sends it to every VM of an availability set or scale set.
        """
        problems = events.event_problems(request, "$")
        if problems:
            raise UpdateError(400, "invalid scheduled event", problems)
        served = {vm_id: self.control.vm(vm_id) for vm_id in vm_ids}
        missing = sorted(vm_id for vm_id, vm in served.items() if vm is None)
        if missing:
            raise UpdateError(404, f"no VM {missing[0]!r}")
        names = [vm_name(vm_id, vm) for vm_id, vm in served.items() if vm is not None]
        if "Resources" not in request and len(names) > events.MAX_RESOURCES:
            raise UpdateError(
                400, f"an event names at most {events.MAX_RESOURCES} VMs in Resources: give Resources, or fewer VMs"
            )
        event = events.make_event(request, time.time(), names)
        try:  # every VM's new state first, so a refusal changes nothing
            states = {vm_id: events.add(vm.scheduled, event) for vm_id, vm in served.items() if vm is not None}
        except events.EventError as exc:
            raise UpdateError(exc.status, exc.message) from None
        generations = {vm_id: self.control.write_events(vm_id, state) for vm_id, state in states.items()}
        self.log.event("event_scheduled", vms=sorted(vm_ids), event_id=event["EventId"], type=event["EventType"])
        return event["EventId"], generations

    def vms_in_scale_set(self, name: str) -> list[str]:
        """The VMs whose compute.vmScaleSetName is `name`."""
        return sorted(
            vm_id
            for vm_id, vm in self.control.model.live().items()
            if vm.instance.get("compute", {}).get("vmScaleSetName") == name
        )

    def cancel_event(self, event_id: str, vm_id: str | None = None) -> dict[str, int]:
        """Remove an event from one VM, or from every VM that has it; returns their new generations."""
        holders = [vm_id] if vm_id is not None else self._holders(frozenset({event_id}))
        if vm_id is not None and self.control.vm(vm_id) is None:
            raise UpdateError(404, f"no VM {vm_id!r}")
        try:
            states = {holder: events.cancel(self.control.events_of(holder), event_id) for holder in holders}
        except events.EventError as exc:
            raise UpdateError(exc.status, exc.message) from None
        if not states:
            raise UpdateError(404, f"no event {event_id}")
        self.log.event("event_cancelled", vms=sorted(states), event_id=event_id)
        return {holder: self.control.write_events(holder, state) for holder, state in states.items()}

    def approve(self, event_ids: frozenset[str]) -> None:
        """Start the approved events on every VM that has them (an approval covers all its Resources)."""
        now = time.time()
        for vm_id in self._holders(event_ids):
            vm = self.control.vm(vm_id)
            assert vm is not None  # _holders only names VMs with data
            state = events.approve(vm.scheduled, event_ids, now)
            if state is not vm.scheduled and state is not None:
                self.control.write_events(vm_id, state)
                self.log.event("event_approved", vm=vm_id, events=sorted(event_ids & events.event_ids(state)))

    def advance_events(self, now: float) -> None:
        """Start the events whose time has come and remove the finished ones."""
        for vm_id in sorted(self.control.with_events):
            vm = self.control.vm(vm_id)
            state = vm.scheduled if vm is not None else None
            advanced = events.advance(state, now)
            if advanced is not state and advanced is not None:
                self.control.write_events(vm_id, advanced)

    def next_event_change(self) -> float | None:
        moments = []
        for vm_id in self.control.with_events:
            vm = self.control.vm(vm_id)
            moment = events.next_change(vm.scheduled) if vm is not None else None
            if moment is not None:
                moments.append(moment)
        return min(moments, default=None)

    async def run(self) -> None:
        """Run every VM's events on time, waking early when an update or approval changes them."""
        changed = self.control.events_changed
        while True:
            try:
                self.advance_events(time.time())
                next_change = self.next_event_change()
            except Exception as exc:  # a failed bus write (a full disk): try again soon, never stop
                self.log.event("event_clock_failed", error=repr(exc))
                next_change = time.time() + EVENT_CLOCK_RETRY_S
            sleep_s = EVENT_CLOCK_MAX_SLEEP_S if next_change is None else next_change - time.time()
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(max(sleep_s, 0.001), EVENT_CLOCK_MAX_SLEEP_S))

    def apply_approvals(self) -> None:
        """Apply (and delete) the approvals in the bus's approvals folder (fastimds.bus.approvals)."""
        approved = take_approvals(approvals_directory(self.control.bus.directory), self.log)
        if approved:
            self.approve(approved)

    async def start_approvals_watch(self) -> asyncio.Task[None]:
        """Apply approvals as workers in other processes drop them (a single process calls apply_approvals)."""
        return await start_watch(
            approvals_directory(self.control.bus.directory),
            on_change=lambda _names: self.apply_approvals(),
            on_idle=self.apply_approvals,
            log=self.log,
        )

    def _holders(self, event_ids: frozenset[str]) -> list[str]:
        return sorted(
            vm_id
            for vm_id in self.control.with_events
            if (vm := self.control.vm(vm_id)) is not None and events.event_ids(vm.scheduled) & event_ids
        )

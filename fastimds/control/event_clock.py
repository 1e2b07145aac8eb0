"""Scheduled events as the control plane runs them: scheduling, the clock, approvals.

Rules of this module:
- An event's lifecycle (fastimds.imds.events) runs here: the clock starts and
  removes events on time, approvals arrive through the bus's approvals
  folder (fastimds.bus.approvals) from whoever served the approving request,
  and every change is a new generation of the VM, written through `Control`
  like any update.
- It reads VMs from the control's own model, never from what is served.
- An event belongs to a group, the VMs it was added to, stored with it
  (fastimds.imds.events). An approval names the VM that sent it, and starts
  an event that VM holds on that event's group only: never on another VM
  that happens to hold the same EventId. An EventId already held outside
  the group it is being added to is refused (409), so one id never means
  two unrelated events.
- A scale set is its subscriptionId, resourceGroupName and vmScaleSetName
  together: two tenants' "web" are two scale sets (`vms_in_scale_set`).
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
        sends it to every VM of an availability set or scale set. `vm_ids` is
        its group, stored with it: approvals act within it.
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
        event = events.make_event(request, time.time(), names, list(served))
        outside = [holder for holder in self._holders(frozenset({event["EventId"]})) if holder not in served]
        if outside:
            raise UpdateError(
                409,
                f"event {event['EventId']} already exists on VM {outside[0]!r}, outside this group:"
                " an EventId names one event (give another, or none for a fresh one)",
            )
        try:  # every VM's new state first, so a refusal changes nothing
            states = {vm_id: events.add(vm.scheduled, event) for vm_id, vm in served.items() if vm is not None}
        except events.EventError as exc:
            raise UpdateError(exc.status, exc.message) from None
        generations = {vm_id: self.control.write_events(vm_id, state) for vm_id, state in states.items()}
        self.log.event("event_scheduled", vms=sorted(vm_ids), event_id=event["EventId"], type=event["EventType"])
        return event["EventId"], generations

    def vms_in_scale_set(
        self, name: str, subscription_id: str | None = None, resource_group: str | None = None
    ) -> list[str]:
        """The VMs of one scale set: compute's subscriptionId, resourceGroupName and vmScaleSetName.

        Those not given match anything, but the VMs found must then be of one
        scale set: a bare "web" that two resource groups (two tenants) both
        have is refused (409) rather than merged.
        """
        found: dict[tuple[str, str], list[str]] = {}
        for vm_id, vm in self.control.model.live().items():
            compute = vm.instance.get("compute", {})
            if compute.get("vmScaleSetName") != name:
                continue
            key = (str(compute.get("subscriptionId", "")), str(compute.get("resourceGroupName", "")))
            if subscription_id is not None and key[0] != subscription_id:
                continue
            if resource_group is not None and key[1] != resource_group:
                continue
            found.setdefault(key, []).append(vm_id)
        if len(found) > 1:
            raise UpdateError(
                409,
                f"{len(found)} scale sets are named {name!r}: give subscriptionId and resourceGroupName too",
                [f"subscriptionId {sub!r}, resourceGroupName {group!r}" for sub, group in sorted(found)],
            )
        return sorted(vm_id for vm_ids in found.values() for vm_id in vm_ids)

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

    def approve(self, approvals: dict[str, frozenset[str]]) -> None:
        """Start each approved event on its own group: approver VM id -> the EventIds it approved.

        An id the approver does not hold is ignored (it was cancelled or has
        finished since; the worker checked it against what it served). A
        group member is started only if it holds the same event (same id,
        same group): a VM that left the group, or never joined it, is not.
        """
        now = time.time()
        starts: dict[str, set[str]] = {}
        for approver, event_ids in sorted(approvals.items()):
            approver_vm = self.control.vm(approver)
            state = approver_vm.scheduled if approver_vm is not None else None
            for event_id in sorted(event_ids):
                event = events.find(state, event_id)
                if event is None:
                    self.log.event("approval_ignored", vm=approver, event_id=event_id)
                    continue
                group = events.group_of(event, approver)
                for member in sorted(group):
                    if self._holds(member, event_id, group):
                        starts.setdefault(member, set()).add(event_id)
        for vm_id, started in sorted(starts.items()):
            vm = self.control.vm(vm_id)
            assert vm is not None  # _holds only names VMs with data
            state = events.approve(vm.scheduled, frozenset(started), now)
            if state is not vm.scheduled and state is not None:
                self.control.write_events(vm_id, state)
                self.log.event("event_approved", vm=vm_id, events=sorted(started))

    def _holds(self, vm_id: str, event_id: str, group: frozenset[str]) -> bool:
        """Whether `vm_id` holds event `event_id` of `group` (the same event, not only the same id)."""
        vm = self.control.vm(vm_id)
        event = events.find(vm.scheduled if vm is not None else None, event_id)
        return event is not None and events.group_of(event, vm_id) == group

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

"""The writer: the one place VM data changes, numbered and written to the bus.

Rules of this module:
- Every update, from any source (fastimds.sources: the --data file, files
  under --data-dir; the admin API), goes through `Control`: validated,
  checked for caller-address conflicts against the control's own model
  (fastimds.control.model), numbered with the VM's next generation, written
  to the bus, and only then acknowledged. A refused update changes nothing
  anywhere and says why.
- A VM that etcd holds (fleet mode, fastimds.sources.etcd: source
  "etcd:<key>") is etcd's: a write or removal from any other source is
  refused naming etcd as its owner, so the store stays the truth for the
  fleet's VMs. etcd's own writes replace whatever a local source had.
- A removal is numbered and written too (a tombstone), so generations never
  go back, even across a restart of the control process.
- The control keeps its own model and never reads what is served. What
  serves follows the bus (fastimds.bus.follower); in a single process the
  control tells its in-process follower to apply each write at once, before
  acknowledging it, so an acknowledged admin write is served already.
- A VM keeps its scheduled events (fastimds.imds.events) across updates that
  leave its description's "scheduledEvents" alone; changing that list
  replaces them. Their clock runs in fastimds.control.event_clock.
- All of this runs on the event loop thread, between requests.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import orjson

from fastimds.bus.files import Bus, BusEntry
from fastimds.bus.follower import Follower
from fastimds.control.model import VmModel
from fastimds.imds import events
from fastimds.imds.datafile import MAX_VM_FILE_BYTES, VM_ID_PATTERN, DataError, VmDescription, describe_vm
from fastimds.imds.registry import ConflictError
from fastimds.ops.event_log import EventLog

ADMIN_SOURCE = "admin"
DATA_DIR_SOURCE_PREFIX = "data-dir:"
ETCD_SOURCE_PREFIX = "etcd:"


class UpdateError(Exception):
    """An update refused; `status` is the HTTP status the admin API answers with."""

    def __init__(self, status: int, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems or []


def source_kind(source: str) -> str:
    """The telemetry label of an update's source: admin, data-dir, etcd or data-file."""
    if source == ADMIN_SOURCE:
        return "admin"
    if source.startswith(ETCD_SOURCE_PREFIX):
        return "etcd"
    return "data-dir" if source.startswith(DATA_DIR_SOURCE_PREFIX) else "data-file"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def encoded_size(document: Any) -> int:
    """`document`'s size as JSON, or UpdateError if it cannot be stored.

    orjson parses 1024 levels of nesting but encodes only 254, so a parsed
    body can be too deep for the bus (and for merge_patch's recursion).
    """
    try:
        return len(orjson.dumps(document))
    except orjson.JSONEncodeError as exc:
        raise UpdateError(400, "invalid VM description", [f"$: not storable as JSON: {exc}"]) from None


def vm_name(vm_id: str, vm: VmDescription) -> str:
    """What an event's Resources call this VM: its compute.name, else its id."""
    name = vm.instance.get("compute", {}).get("name")
    return name if isinstance(name, str) and name else vm_id


class Control:
    def __init__(self, bus: Bus, log: EventLog, default_vm_id: str | None = None) -> None:
        self.bus = bus
        self.log = log
        self.model = VmModel(default_vm_id)
        # Telemetry: updates by (result, source kind), read at scrape time.
        self.updates: Counter[tuple[str, str]] = Counter()
        self.events_changed = asyncio.Event()  # wakes the event clock (fastimds.control.event_clock)
        # VMs with events: all the event clock and approvals look at (10,000 VMs, a few with events).
        self.with_events: set[str] = set()
        self.in_process: Follower | None = None  # the follower of this very process, if it serves too

    def attach(self, follower: Follower) -> None:
        """Single process: apply every write to `follower` at once, so an acknowledged write is served."""
        self.in_process = follower

    # ---- reads (the control's own model) ----

    def vm(self, vm_id: str) -> VmDescription | None:
        return self.model.vm(vm_id)

    def generation(self, vm_id: str) -> int:
        return self.model.generation(vm_id)

    def live_ids(self) -> list[str]:
        return list(self.model.live())

    def document(self, vm_id: str) -> dict[str, Any]:
        vm = self.vm(vm_id)
        if vm is None:
            raise UpdateError(404, f"no VM {vm_id!r}")
        return {"id": vm_id, "generation": self.generation(vm_id), "source": vm.source, "vm": vm.document}

    def source_of(self, vm_id: str) -> str | None:
        vm = self.vm(vm_id)
        return vm.source if vm is not None else None

    def events_of(self, vm_id: str) -> events.EventsState:
        """A VM's events state, private timing fields included (the admin API shows it)."""
        vm = self.vm(vm_id)
        if vm is None:
            raise UpdateError(404, f"no VM {vm_id!r}")
        return vm.scheduled if vm.scheduled is not None else events.EMPTY_STATE

    def summary(self) -> list[dict[str, Any]]:
        return self.model.summary()

    # ---- writes ----

    def put(
        self, vm_id: str, document: Any, source: str = ADMIN_SOURCE, replacing: frozenset[str] = frozenset()
    ) -> int:
        """Replace `vm_id` with `document` (removing the VMs in `replacing`); returns the new generation."""
        try:
            generation = self._put(vm_id, document, source, replacing)
        except UpdateError:
            self.updates["refused", source_kind(source)] += 1
            raise
        self.updates["accepted", source_kind(source)] += 1
        return generation

    def _check_owner(self, vm_id: str, source: str) -> None:
        """UpdateError 409 when etcd holds `vm_id` and `source` is not etcd (see the module rules)."""
        owner = self.source_of(vm_id)
        if owner is not None and owner.startswith(ETCD_SOURCE_PREFIX) and not source.startswith(ETCD_SOURCE_PREFIX):
            key = owner[len(ETCD_SOURCE_PREFIX) :]
            raise UpdateError(409, f"VM {vm_id!r} is owned by etcd (key {key}): change it there, with `fastimds fleet`")

    def _put(self, vm_id: str, document: Any, source: str, replacing: frozenset[str]) -> int:
        self._check_owner(vm_id, source)
        if not VM_ID_PATTERN.fullmatch(vm_id):
            raise UpdateError(400, f"{vm_id!r} is not a VM id (letters, digits, '.', '_', '-'; at most 128)")
        if isinstance(document, dict) and document.get("id", vm_id) != vm_id:
            raise UpdateError(400, f"the document's id {document['id']!r} does not match the VM id {vm_id!r}")
        if encoded_size(document) > MAX_VM_FILE_BYTES:
            raise UpdateError(413, f"a VM description is limited to {MAX_VM_FILE_BYTES} bytes")
        try:
            vm = describe_vm(document, source)
            self.model.check(vm_id, vm, replacing)
        except DataError as exc:
            raise UpdateError(400, "invalid VM description", exc.problems) from None
        except ConflictError as exc:
            raise UpdateError(409, str(exc)) from None
        for old_id in sorted(replacing - {vm_id}):
            self.delete(old_id, source)
        vm = replace(vm, scheduled=self._events_after_update(vm_id, vm))
        generation = self._write(vm_id, vm, source)
        self.log.event("update_accepted", vm=vm_id, generation=generation, source=source)
        return generation

    def _events_after_update(self, vm_id: str, vm: VmDescription) -> events.EventsState | None:
        """The VM's events once `vm` replaces what it had (see the module rules)."""
        previous = self.vm(vm_id)
        given = vm.reserved.get("scheduledEvents")
        if previous is not None and previous.reserved.get("scheduledEvents") == given:
            return previous.scheduled
        if given is None and (previous is None or previous.scheduled is None):
            return None
        now = time.time()
        # A description's events are its own VM's: their group is that VM alone.
        made = [events.make_event(event, now, [vm_name(vm_id, vm)], [vm_id]) for event in given or []]
        return events.with_events(previous.scheduled if previous is not None else None, made)

    def put_if_changed(
        self, vm_id: str, document: dict[str, Any], source: str, replacing: frozenset[str] = frozenset()
    ) -> None:
        """`put`, unless `vm_id` already holds `document` from `source` (a source's rescan)."""
        current = self.vm(vm_id)
        unchanged = current is not None and current.document == document and current.source == source
        if unchanged and not replacing - {vm_id}:
            return
        self.put(vm_id, document, source, replacing)

    def patch(self, vm_id: str, patch: Any) -> int:
        """Apply an RFC 7396 merge patch; one that changes nothing keeps the generation (no write)."""
        current = self.document(vm_id)["vm"]
        try:
            self._check_owner(vm_id, ADMIN_SOURCE)  # even a patch that would change nothing
        except UpdateError:
            self.updates["refused", "admin"] += 1
            raise
        encoded_size(patch)  # refuses nesting merge_patch could not recurse through
        merged = merge_patch(current, patch)
        if merged == current:
            return self.generation(vm_id)
        return self.put(vm_id, merged)

    def delete(self, vm_id: str, source: str = ADMIN_SOURCE) -> int:
        """Remove a VM; returns the generation of the removal."""
        try:
            if self.source_of(vm_id) is None:
                raise UpdateError(404, f"no VM {vm_id!r}")
            self._check_owner(vm_id, source)
        except UpdateError:
            self.updates["refused", source_kind(source)] += 1
            raise
        generation = self._write(vm_id, None, source)
        self.updates["accepted", source_kind(source)] += 1
        self.log.event("vm_removed", vm=vm_id, generation=generation)
        return generation

    def write_events(self, vm_id: str, state: events.EventsState) -> int:
        """A new generation of a VM with `state` as its events (the event clock's changes)."""
        vm = self.vm(vm_id)
        assert vm is not None
        return self._write(vm_id, replace(vm, scheduled=state), vm.source)

    def _write(self, vm_id: str, vm: VmDescription | None, source: str) -> int:
        """Number, write (durable before acknowledged), then take into the model and the in-process follower."""
        generation = self.generation(vm_id) + 1
        if vm is None:
            self.bus.write(BusEntry(vm_id, generation, source, None))
            self.model.remove(vm_id, generation, time.time())
        else:
            self.bus.write(BusEntry(vm_id, generation, source, vm.document, vm.scheduled))
            self.model.set(vm_id, vm, generation, time.time())
        self._note_events(vm_id, vm.scheduled if vm is not None else None)
        if self.in_process is not None:
            self.in_process.apply({vm_id})
        return generation

    def _note_events(self, vm_id: str, state: events.EventsState | None) -> None:
        """Keep `with_events` right, and wake the event clock when it or a VM's events change."""
        if state is not None and state["Events"]:
            self.with_events.add(vm_id)
            self.events_changed.set()
        elif vm_id in self.with_events:
            self.with_events.discard(vm_id)
            self.events_changed.set()

    # ---- the last good state ----

    def load_state(self) -> None:
        """Take what the bus already holds into the model (the last good data, with --state-dir)."""
        pending = self.bus.read_all()
        while pending:  # an address can move between VMs within the saved files: retry while it helps
            refused = [entry for entry in pending if not self._load(entry)]
            if len(refused) == len(pending):
                for entry in refused:  # never served, but their generations still count
                    self.model.remove(entry.vm_id, entry.generation, time.time())
                break
            pending = refused

    def _load(self, entry: BusEntry) -> bool:
        """One saved entry into the model; False on an address conflict (the caller may retry)."""
        now = time.time()
        if entry.document is None:
            self.model.remove(entry.vm_id, entry.generation, now)
            return True
        try:
            vm = entry.described()
            self.model.set(entry.vm_id, vm, entry.generation, now)
        except DataError as exc:
            self.log.event("state_file_invalid", vm=entry.vm_id, problems=exc.problems)
            self.model.remove(entry.vm_id, entry.generation, now)  # its generation still counts
            return True
        except ConflictError as exc:
            self.log.event("state_file_conflict", vm=entry.vm_id, error=str(exc))
            return False
        self._note_events(entry.vm_id, vm.scheduled)
        return True

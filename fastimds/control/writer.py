"""The control plane: the one writer of VM data, and the workers' follower.

Rules of this module:
- Every update, from any source (the --data file on SIGHUP, files under
  --data-dir, the admin API), goes through `Control`: validated, checked
  for caller-address conflicts, numbered with the VM's next generation,
  written to the bus, and only then acknowledged. A refused update changes
  nothing anywhere and says why.
- A removal is numbered and written too (a tombstone), so generations never
  go back, even across a restart of the control process.
- A --data-dir file that does not validate (a half-written one included)
  never replaces or removes the VM it held; only deleting the file removes
  it. The last writer wins between --data-dir and the admin API.
- Workers never write. `Follower` applies what the bus holds: the files
  present at start (the last good data, with --state-dir), then every change
  the directory watch reports, with a rescan when the watch is idle. It
  applies a file only when its generation is newer than what the worker
  serves, so replays and its own control's writes are no-ops.
- Watches are known to run before the scan that precedes serving, so no
  write falls between the scan and the watch.
- Scheduled events live beside each VM's description (fastimds.imds.events) and
  their lifecycle runs here: the event clock starts and removes events on
  time, approvals arrive from the workers (fastimds.bus.approvals), and every
  change is a new generation of the VM, written and published like any
  update. A VM keeps its events across updates that leave its description's
  "scheduledEvents" alone; changing that list replaces them.
- Injected faults (fastimds.imds.faults) are one list, owned here like VM data:
  validated, written to the bus, then loaded into this process's fault table
  and, through the bus, every worker's.
- All of this runs on the event loop thread, between requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from fastimds.bus.approvals import approvals_directory, take_approvals
from fastimds.bus.files import Bus, BusEntry, file_stamps, until_watching, watch_directory
from fastimds.imds import events, faults
from fastimds.imds.datafile import (
    MAX_VM_FILE_BYTES,
    VM_ID_PATTERN,
    DataError,
    VmDescription,
    describe_vm,
    load_vm,
    parse_vm,
)
from fastimds.imds.registry import ConflictError, VmRegistry
from fastimds.imds.store import DEFAULT_VM_ID
from fastimds.ops.event_log import log_event
from fastimds.sources.files import read_description

ADMIN_SOURCE = "admin"
DATA_DIR_SOURCE_PREFIX = "data-dir:"
# A watch is expected to start within this; past it we serve anyway and rely
# on the once-a-second rescan.
WATCH_START_TIMEOUT_S = 5.0
# The event clock wakes at least this often, so a wall-clock step cannot
# delay an event's start or removal for long.
EVENT_CLOCK_MAX_SLEEP_S = 5.0
# After a failed transition (the bus write failed), the clock tries again this soon.
EVENT_CLOCK_RETRY_S = 1.0


class UpdateError(Exception):
    """An update refused; `status` is the HTTP status the admin API answers with."""

    def __init__(self, status: int, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems or []


def source_kind(source: str) -> str:
    """The telemetry label of an update's source: admin, data-dir or data-file."""
    if source == ADMIN_SOURCE:
        return "admin"
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


class Control:
    def __init__(self, bus: Bus, registry: VmRegistry) -> None:
        self.bus = bus
        self.registry = registry
        self.data_dir_stamps: dict[Path, tuple[int, int]] = {}
        # Telemetry: updates by (result, source kind), read at scrape time.
        self.updates: Counter[tuple[str, str]] = Counter()
        self.events_changed = asyncio.Event()  # wakes the event clock (run_event_clock)
        # VMs with events: all the event clock and approvals look at (10,000 VMs, a few with events).
        self.with_events: set[str] = set()
        # Kept across restarts (--state-dir); counted ones are re-armed by `rearm_faults`.
        self.fault_records: list[dict[str, Any]] = bus.read_faults()
        # This process's faults: the ones it applies when it also serves (one worker).
        self.fault_table = faults.FaultTable()
        self._load_fault_table()

    def _load_fault_table(self) -> None:
        try:
            self.fault_table.load(self.fault_records, time.time())
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log_event("faults_file_invalid", error=repr(exc))  # served without them; the next write replaces it
            self.fault_records = []

    def rearm_faults(self) -> None:
        """At server start: counted faults saved in the state dir get their whole count again.

        Counts live in shared memory (fastimds.imds.faults.BUDGETS), which a restart
        empties. Called once per server start, not when a control process is
        replaced: that one inherits the counts left.
        """
        for record in self.fault_records:
            slot, count = record.get("slot"), record.get("count")
            if isinstance(count, int) and isinstance(slot, int) and 0 <= slot < faults.MAX_FAULTS:
                faults.BUDGETS.set(slot, count)
        self._load_fault_table()

    # ---- reads ----

    def document(self, vm_id: str) -> dict[str, Any]:
        vm = self._served(vm_id)
        if vm is None:
            raise UpdateError(404, f"no VM {vm_id!r}")
        generation = self.registry.stores[vm_id].generation
        return {"id": vm_id, "generation": generation, "source": vm.source, "vm": vm.document}

    def source_of(self, vm_id: str) -> str | None:
        vm = self._served(vm_id)
        return vm.source if vm is not None else None

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

    def _put(self, vm_id: str, document: Any, source: str, replacing: frozenset[str]) -> int:
        if not VM_ID_PATTERN.fullmatch(vm_id):
            raise UpdateError(400, f"{vm_id!r} is not a VM id (letters, digits, '.', '_', '-'; at most 128)")
        if isinstance(document, dict) and document.get("id", vm_id) != vm_id:
            raise UpdateError(400, f"the document's id {document['id']!r} does not match the VM id {vm_id!r}")
        if encoded_size(document) > MAX_VM_FILE_BYTES:
            raise UpdateError(413, f"a VM description is limited to {MAX_VM_FILE_BYTES} bytes")
        try:
            vm = describe_vm(document, source)
            self.registry.check(vm_id, vm, replacing)
        except DataError as exc:
            raise UpdateError(400, "invalid VM description", exc.problems) from None
        except ConflictError as exc:
            raise UpdateError(409, str(exc)) from None
        for old_id in sorted(replacing - {vm_id}):
            self.delete(old_id, source)
        vm = replace(vm, scheduled=self._events_after_update(vm_id, vm))
        generation = self._next_generation(vm_id)
        # Durable before acknowledged.
        self.bus.write(BusEntry(vm_id, generation, source, vm.document, vm.scheduled))
        self.registry.publish(vm_id, vm, generation)
        log_event("update_accepted", vm=vm_id, generation=generation, source=source)
        self._note_events(vm_id, vm.scheduled)
        return generation

    def _events_after_update(self, vm_id: str, vm: VmDescription) -> dict[str, Any] | None:
        """The VM's events once `vm` replaces what it serves (see the module rules)."""
        previous = self._served(vm_id)
        given = vm.reserved.get("scheduledEvents")
        if previous is not None and previous.reserved.get("scheduledEvents") == given:
            return previous.scheduled
        if given is None and (previous is None or previous.scheduled is None):
            return None
        now = time.time()
        made = [events.make_event(event, now, [_vm_name(vm_id, vm)]) for event in given or []]
        return events.with_events(previous.scheduled if previous is not None else None, made)

    def _served(self, vm_id: str) -> VmDescription | None:
        store = self.registry.stores.get(vm_id)
        return store.current.vm if store is not None and store.current is not None else None

    def patch(self, vm_id: str, patch: Any) -> int:
        """Apply an RFC 7396 merge patch; one that changes nothing keeps the generation (no write)."""
        current = self.document(vm_id)["vm"]
        encoded_size(patch)  # refuses nesting merge_patch could not recurse through
        merged = merge_patch(current, patch)
        if merged == current:
            return self._next_generation(vm_id) - 1
        return self.put(vm_id, merged)

    def delete(self, vm_id: str, source: str = ADMIN_SOURCE) -> int:
        """Remove a VM; returns the generation of the removal."""
        if self.source_of(vm_id) is None:
            self.updates["refused", source_kind(source)] += 1
            raise UpdateError(404, f"no VM {vm_id!r}")
        generation = self._next_generation(vm_id)
        self.bus.write(BusEntry(vm_id, generation, source, None))
        self.updates["accepted", source_kind(source)] += 1
        self.registry.remove(vm_id, generation)
        log_event("vm_removed", vm=vm_id, generation=generation)
        self._note_events(vm_id, None)
        return generation

    def _next_generation(self, vm_id: str) -> int:
        store = self.registry.stores.get(vm_id)
        return (store.generation if store is not None else 0) + 1

    # ---- scheduled events ----

    def events_of(self, vm_id: str) -> dict[str, Any]:
        """A VM's events state, private timing fields included (the admin API shows it)."""
        vm = self._served(vm_id)
        if vm is None:
            raise UpdateError(404, f"no VM {vm_id!r}")
        return vm.scheduled if vm.scheduled is not None else events.EMPTY_STATE

    def add_event(self, vm_ids: list[str], request: Any) -> tuple[str, dict[str, int]]:
        """Schedule one event on every VM in `vm_ids`; returns its EventId and each VM's new generation.

        Its Resources default to the names of all of them: one event, as Azure
        sends it to every VM of an availability set or scale set.
        """
        problems = events.event_problems(request, "$")
        if problems:
            raise UpdateError(400, "invalid scheduled event", problems)
        served = {vm_id: self._served(vm_id) for vm_id in vm_ids}
        missing = sorted(vm_id for vm_id, vm in served.items() if vm is None)
        if missing:
            raise UpdateError(404, f"no VM {missing[0]!r}")
        names = [_vm_name(vm_id, vm) for vm_id, vm in served.items() if vm is not None]
        if "Resources" not in request and len(names) > events.MAX_RESOURCES:
            raise UpdateError(
                400, f"an event names at most {events.MAX_RESOURCES} VMs in Resources: give Resources, or fewer VMs"
            )
        event = events.make_event(request, time.time(), names)
        try:  # every VM's new state first, so a refusal changes nothing
            states = {vm_id: events.add(vm.scheduled, event) for vm_id, vm in served.items() if vm is not None}
        except events.EventError as exc:
            raise UpdateError(exc.status, exc.message) from None
        generations = {vm_id: self._publish_events(vm_id, state) for vm_id, state in states.items()}
        log_event("event_scheduled", vms=sorted(vm_ids), event_id=event["EventId"], type=event["EventType"])
        return event["EventId"], generations

    def vms_in_scale_set(self, name: str) -> list[str]:
        """The VMs whose compute.vmScaleSetName is `name`."""
        return sorted(
            vm_id
            for vm_id, store in self.registry.live().items()
            if store.current is not None and store.current.vm.instance.get("compute", {}).get("vmScaleSetName") == name
        )

    def cancel_event(self, event_id: str, vm_id: str | None = None) -> dict[str, int]:
        """Remove an event from one VM, or from every VM that has it; returns their new generations."""
        holders = [vm_id] if vm_id is not None else self._holders(frozenset({event_id}))
        if vm_id is not None and self._served(vm_id) is None:
            raise UpdateError(404, f"no VM {vm_id!r}")
        try:
            states = {holder: events.cancel(self.events_of(holder), event_id) for holder in holders}
        except events.EventError as exc:
            raise UpdateError(exc.status, exc.message) from None
        if not states:
            raise UpdateError(404, f"no event {event_id}")
        log_event("event_cancelled", vms=sorted(states), event_id=event_id)
        return {holder: self._publish_events(holder, state) for holder, state in states.items()}

    def approve(self, event_ids: frozenset[str]) -> None:
        """Start the approved events on every VM that has them (an approval covers all its Resources)."""
        now = time.time()
        for vm_id in self._holders(event_ids):
            vm = self._served(vm_id)
            assert vm is not None  # _holders only names served VMs
            state = events.approve(vm.scheduled, event_ids, now)
            if state is not vm.scheduled and state is not None:
                self._publish_events(vm_id, state)
                log_event("event_approved", vm=vm_id, events=sorted(event_ids & events.event_ids(state)))

    def advance_events(self, now: float) -> None:
        """Start the events whose time has come and remove the finished ones."""
        for vm_id in sorted(self.with_events):
            vm = self._served(vm_id)
            state = vm.scheduled if vm is not None else None
            advanced = events.advance(state, now)
            if advanced is not state and advanced is not None:
                self._publish_events(vm_id, advanced)

    def next_event_change(self) -> float | None:
        moments = []
        for vm_id in self.with_events:
            vm = self._served(vm_id)
            moment = events.next_change(vm.scheduled) if vm is not None else None
            if moment is not None:
                moments.append(moment)
        return min(moments, default=None)

    async def run_event_clock(self) -> None:
        """Run every VM's events on time, waking early when an update or approval changes them."""
        while True:
            try:
                self.advance_events(time.time())
                next_change = self.next_event_change()
            except Exception as exc:  # a failed bus write (a full disk): try again soon, never stop
                log_event("event_clock_failed", error=repr(exc))
                next_change = time.time() + EVENT_CLOCK_RETRY_S
            sleep_s = EVENT_CLOCK_MAX_SLEEP_S if next_change is None else next_change - time.time()
            self.events_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.events_changed.wait(), min(max(sleep_s, 0.001), EVENT_CLOCK_MAX_SLEEP_S))

    async def start_approvals_watch(self) -> asyncio.Task[None]:
        """Apply the approvals the workers drop in the bus (fastimds.bus.approvals)."""
        directory = approvals_directory(self.bus.directory)

        def apply_approvals() -> None:
            approved = take_approvals(directory)
            if approved:
                self.approve(approved)

        return await start_watch(directory, on_change=lambda _names: apply_approvals(), on_idle=apply_approvals)

    def _holders(self, event_ids: frozenset[str]) -> list[str]:
        return sorted(
            vm_id
            for vm_id in self.with_events
            if (vm := self._served(vm_id)) is not None and events.event_ids(vm.scheduled) & event_ids
        )

    def _note_events(self, vm_id: str, state: dict[str, Any] | None) -> None:
        """Keep `with_events` right, and wake the event clock when it or a VM's events change."""
        if state is not None and state["Events"]:
            self.with_events.add(vm_id)
            self.events_changed.set()
        elif vm_id in self.with_events:
            self.with_events.discard(vm_id)
            self.events_changed.set()

    def _publish_events(self, vm_id: str, state: dict[str, Any]) -> int:
        """A new generation of a served VM with `state` as its events: written, then published."""
        vm = self._served(vm_id)
        assert vm is not None
        generation = self._next_generation(vm_id)
        self.bus.write(BusEntry(vm_id, generation, vm.source, vm.document, state))
        self.registry.publish(vm_id, replace(vm, scheduled=state), generation)
        self._note_events(vm_id, state)
        return generation

    # ---- injected faults ----

    def live_faults(self) -> list[dict[str, Any]]:
        return faults.live(self.fault_records, time.time())

    def add_fault(self, request: Any, vm_ids: list[str] | None) -> dict[str, Any]:
        """Inject a fault on `vm_ids` (None: every VM, present and future); returns its record."""
        problems = faults.fault_problems(request)
        if problems:
            raise UpdateError(400, "invalid fault", problems)
        for vm_id in vm_ids or []:
            if self._served(vm_id) is None:
                raise UpdateError(404, f"no VM {vm_id!r}")
        records = self.live_faults()
        if len(records) >= faults.MAX_FAULTS:
            raise UpdateError(409, f"at most {faults.MAX_FAULTS} faults at a time")
        record = faults.make_fault(request, vm_ids, time.time(), faults.free_slot(records))
        self._write_faults([*records, record])
        log_event("fault_added", fault=record)
        return record

    def remove_faults(self, fault_id: str | None = None, vm_id: str | None = None) -> list[str]:
        """Remove one fault, or a VM's own faults, or (neither given) all; returns the ids removed."""
        records = self.live_faults()
        if fault_id is not None:
            removed = [record for record in records if record["id"] == fault_id]
            if not removed:
                raise UpdateError(404, f"no fault {fault_id!r}")
        elif vm_id is not None:
            removed = [record for record in records if record["vms"] == [vm_id]]
        else:
            removed = records
        self._write_faults([record for record in records if record not in removed])
        log_event("faults_removed", faults=[record["id"] for record in removed])
        return [record["id"] for record in removed]

    def _write_faults(self, records: list[dict[str, Any]]) -> None:
        self.bus.write_faults(records)  # durable before acknowledged, as VM updates are
        self.fault_records = records
        self.fault_table.load(records, time.time())
        self.registry.forget_requests()

    # ---- sources ----

    def load_state(self) -> None:
        """Serve what the bus already holds (the last good data, with --state-dir)."""
        apply_entries(self.registry, self.bus.read_all())
        for vm_id, store in self.registry.live().items():
            self._note_events(vm_id, store.current.vm.scheduled if store.current is not None else None)

    def load_data_file(self, path: Path | None) -> None:
        """Single-VM mode: the --data file (or the embedded sample) is VM "default"."""
        vm = load_vm(path)  # DataError propagates: at start it is fatal, on SIGHUP the caller logs it
        self._put_if_changed(DEFAULT_VM_ID, vm.document, vm.source)

    def sync_data_dir(self, directory: Path) -> None:
        """Make the VMs that came from `directory` match its files (a full rescan)."""
        paths = sorted(directory.glob("*.json"))
        self.data_dir_stamps = file_stamps(paths)
        self.sync_data_files(paths)
        present = {DATA_DIR_SOURCE_PREFIX + path.name for path in paths}
        for vm_id, store in list(self.registry.live().items()):
            source = store.current.vm.source if store.current is not None else ""
            if source.startswith(DATA_DIR_SOURCE_PREFIX) and source not in present:
                self.delete(vm_id, source)

    def rescan_data_dir(self, directory: Path) -> None:
        """Sync the files whose stamp changed since the last look (the idle safety net)."""
        paths = sorted(directory.glob("*.json"))
        stamps = file_stamps(paths)
        changed = {path for path, stamp in stamps.items() if self.data_dir_stamps.get(path) != stamp}
        changed |= set(self.data_dir_stamps) - set(stamps)
        self.data_dir_stamps = stamps
        self.sync_data_files(sorted(changed))

    def sync_data_files(self, paths: list[Path]) -> None:
        """Apply changed --data-dir files; one whose address another file gives up is retried."""
        pending = list(paths)
        while pending:
            conflicted = [path for path in pending if self._sync_data_file(path) == "conflict"]
            if len(conflicted) == len(pending):
                for path in conflicted:
                    self._sync_data_file(path, report=True)
                break
            pending = conflicted

    def _sync_data_file(self, path: Path, report: bool = False) -> str:
        """One --data-dir file: "ok", "refused" or "conflict" (which the caller may retry)."""
        source = DATA_DIR_SOURCE_PREFIX + path.name
        owned = frozenset(vm_id for vm_id, store in self.registry.live().items() if self.source_of(vm_id) == source)
        if not path.exists():
            for vm_id in sorted(owned):
                self.delete(vm_id, source)
            return "ok"
        try:
            vm = parse_vm(read_description(path, MAX_VM_FILE_BYTES), str(path))  # regular files only, bounded
        except (OSError, DataError) as exc:
            # Also what a half-written file looks like: it never replaces (or removes) good data.
            problems = exc.problems if isinstance(exc, DataError) else [str(exc)]
            log_event("update_refused", source=source, problems=problems)
            self.updates["refused", "data-dir"] += 1
            return "refused"
        vm_id = str(vm.document.get("id", path.stem))
        other = self.source_of(vm_id)
        other_file = other[len(DATA_DIR_SOURCE_PREFIX) :] if other and other.startswith(DATA_DIR_SOURCE_PREFIX) else ""
        if other_file and other != source and (path.parent / other_file).exists():
            error = f"VM id {vm_id!r} is also defined by {other_file}"
            log_event("update_refused", source=source, vm=vm_id, error=error)
            return "refused"
        try:
            self._put_if_changed(vm_id, vm.document, source, replacing=owned)  # an id changed in the file
        except UpdateError as exc:
            if exc.status == 409 and not report:
                return "conflict"
            log_event("update_refused", source=source, vm=vm_id, error=exc.message, problems=exc.problems)
            return "refused"
        return "ok"

    def _put_if_changed(
        self, vm_id: str, document: dict[str, Any], source: str, replacing: frozenset[str] = frozenset()
    ) -> None:
        store = self.registry.stores.get(vm_id)
        if store is not None and store.current is not None and not replacing - {vm_id}:
            current = store.current.vm
            if current.document == document and current.source == source:
                return
        self.put(vm_id, document, source, replacing)

    async def start_data_dir_watch(self, directory: Path) -> asyncio.Task[None]:
        """Watch --data-dir; returns once the watch runs and a rescan after it is applied."""
        return await start_watch(
            directory,
            on_change=lambda names: self.sync_data_files(
                [directory / name for name in sorted(names) if name.endswith(".json")]
            ),
            on_idle=lambda: self.rescan_data_dir(directory),
        )


async def start_watch(
    directory: Path, on_change: Callable[[set[str]], None], on_idle: Callable[[], None]
) -> asyncio.Task[None]:
    """Watch `directory`; once the watch is known to run, rescan (`on_idle`) and return its task.

    A write before the watch runs is caught by that rescan, one after it by
    the watch, so none is missed.
    """
    active = asyncio.Event()

    async def follow() -> None:
        async for names, probed in watch_directory(directory):
            if probed:
                active.set()
            try:
                if names:
                    on_change(names)
                elif not probed:
                    on_idle()  # idle: a safety net for anything the watch missed
            except Exception as exc:  # a bug in one callback must not end the watch for good
                log_event("watch_callback_failed", directory=str(directory), error=repr(exc))

    task = asyncio.ensure_future(follow())
    await until_watching(directory, active, WATCH_START_TIMEOUT_S)
    on_idle()
    return task


def _vm_name(vm_id: str, vm: VmDescription) -> str:
    """What an event's Resources call this VM: its compute.name, else its id."""
    name = vm.instance.get("compute", {}).get("name")
    return name if isinstance(name, str) and name else vm_id


def apply_entries(registry: VmRegistry, entries: list[BusEntry]) -> None:
    """Apply bus entries; an address can move between VMs within one batch, so
    apply whatever does not conflict, then retry the rest while that helps."""
    pending = entries
    while pending:
        refused = [entry for entry in pending if not apply_entry(registry, entry)]
        if len(refused) == len(pending):
            break
        pending = refused


def apply_entry(registry: VmRegistry, entry: BusEntry) -> bool:
    """Publish (or remove) a bus entry if it is newer than what is served; False on a conflict."""
    store = registry.stores.get(entry.vm_id)
    if store is not None and entry.generation <= store.generation:
        return True
    if entry.document is None:
        if registry.remove(entry.vm_id, entry.generation):
            log_event("vm_removed", vm=entry.vm_id, generation=entry.generation)
        return True
    try:
        vm = describe_vm(entry.document, entry.source)
        if entry.events is not None:
            problems = events.state_problems(entry.events)
            if problems:
                raise DataError(entry.source, problems)
            vm = replace(vm, scheduled=entry.events)
        registry.publish(entry.vm_id, vm, entry.generation)
        log_event("update_applied", vm=entry.vm_id, generation=entry.generation)
    except DataError as exc:
        log_event("state_file_invalid", vm=entry.vm_id, problems=exc.problems)
    except ConflictError as exc:
        log_event("state_file_conflict", vm=entry.vm_id, error=str(exc))
        return False
    return True


class Follower:
    """A worker's view of the bus."""

    def __init__(self, bus: Bus, registry: VmRegistry) -> None:
        self.bus = bus
        self.registry = registry
        self.stamps: dict[str, tuple[int, int]] = {}  # what each VM file looked like when last applied
        self.fault_table = faults.FaultTable()  # the injected faults this worker applies
        self.faults_stamp: tuple[int, int] | None = None

    def rescan(self) -> None:
        """Apply every file that changed, appeared or vanished since the last look."""
        stamps = self.bus.stamps()
        changed = {vm_id for vm_id, stamp in stamps.items() if self.stamps.get(vm_id) != stamp}
        self.apply(changed | (set(self.stamps) - set(stamps)))
        path = self.bus.directory / faults.FAULTS_FILE
        if file_stamps([path]).get(path) != self.faults_stamp:
            self.load_faults()

    def load_faults(self) -> None:
        path = self.bus.directory / faults.FAULTS_FILE
        self.faults_stamp = file_stamps([path]).get(path)
        records = self.bus.read_faults()
        try:
            self.fault_table.load(records, time.time())
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log_event("faults_file_invalid", error=repr(exc))
            return
        self.registry.forget_requests()

    def apply(self, vm_ids: set[str]) -> None:
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
        apply_entries(self.registry, entries)

    def _on_change(self, names: set[str]) -> None:
        self.apply({name[:-5] for name in names if name.endswith(".json") and VM_ID_PATTERN.fullmatch(name[:-5])})
        if faults.FAULTS_FILE in names:
            self.load_faults()

    async def start(self) -> asyncio.Task[None]:
        """Start following; returns once the watch runs and the bus is applied."""
        return await start_watch(
            self.bus.directory,
            on_change=self._on_change,
            on_idle=self.rescan,
        )

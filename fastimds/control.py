"""The control plane: the one writer of VM data, and the workers' follower.

Rules of this module:
- Every update, from any source (the --data file on SIGHUP, files under
  --data-dir, the admin API), goes through `Control`: validated, checked
  for caller-address conflicts, numbered with the VM's next generation,
  written to the bus, and only then acknowledged. A refused update changes
  nothing anywhere and says why.
- Workers never write. `Follower` applies what the bus holds: the files
  present at start (the last good data, with --state-dir), then every change
  the directory watch reports. It applies a file only when its generation is
  newer than what the worker serves, so replays and its own control's
  writes (single-process mode) are no-ops.
- All of this runs on the event loop thread, between requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import orjson

from fastimds.bus import PROBE_PREFIX, Bus, BusEntry
from fastimds.datafile import MAX_VM_FILE_BYTES, VM_ID_PATTERN, DataError, describe_vm, load_vm, parse_vm
from fastimds.log import log_event
from fastimds.registry import ConflictError, VmRegistry
from fastimds.store import DEFAULT_VM_ID

ADMIN_SOURCE = "admin"
# A worker waits this long for its bus watch to start before serving anyway
# (it then relies on the once-a-second rescan).
WATCH_START_TIMEOUT_S = 5.0
DATA_DIR_SOURCE_PREFIX = "data-dir:"


class UpdateError(Exception):
    """An update refused; `status` is the HTTP status the admin API answers with."""

    def __init__(self, status: int, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems or []


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


class Control:
    def __init__(self, bus: Bus, registry: VmRegistry) -> None:
        self.bus = bus
        self.registry = registry

    # ---- reads ----

    def document(self, vm_id: str) -> dict[str, Any]:
        store = self.registry.stores.get(vm_id)
        if store is None or store.current is None:
            raise UpdateError(404, f"no VM {vm_id!r}")
        vm = store.current.vm
        return {"id": vm_id, "generation": store.generation, "source": vm.source, "vm": vm.document}

    # ---- writes ----

    def put(self, vm_id: str, document: Any, source: str = ADMIN_SOURCE) -> int:
        """Replace `vm_id` with `document`; returns the new generation."""
        if not VM_ID_PATTERN.fullmatch(vm_id):
            raise UpdateError(400, f"{vm_id!r} is not a VM id (letters, digits, '.', '_', '-'; at most 128)")
        if isinstance(document, dict) and document.get("id", vm_id) != vm_id:
            raise UpdateError(400, f"the document's id {document['id']!r} does not match the VM id {vm_id!r}")
        if len(orjson.dumps(document)) > MAX_VM_FILE_BYTES:
            raise UpdateError(413, f"a VM description is limited to {MAX_VM_FILE_BYTES} bytes")
        try:
            vm = describe_vm(document, source)
            self.registry.check(vm_id, vm)
        except DataError as exc:
            raise UpdateError(400, "invalid VM description", exc.problems) from None
        except ConflictError as exc:
            raise UpdateError(409, str(exc)) from None
        store = self.registry.stores.get(vm_id)
        generation = (store.generation if store is not None else 0) + 1
        self.bus.write(BusEntry(vm_id, generation, source, vm.document))  # durable before acknowledged
        self.registry.publish(vm_id, vm, generation)
        log_event("update_accepted", vm=vm_id, generation=generation, source=source)
        return generation

    def patch(self, vm_id: str, patch: Any) -> int:
        current = self.document(vm_id)["vm"]
        return self.put(vm_id, merge_patch(current, patch))

    def delete(self, vm_id: str) -> None:
        if not self.registry.remove(vm_id):
            raise UpdateError(404, f"no VM {vm_id!r}")
        self.bus.delete(vm_id)
        log_event("vm_removed", vm=vm_id)

    # ---- sources ----

    def load_state(self) -> None:
        """Serve what the bus already holds (the last good data, with --state-dir)."""
        for entry in self.bus.read_all():
            apply_entry(self.registry, entry)

    def load_data_file(self, path: Path | None) -> None:
        """Single-VM mode: the --data file (or the embedded sample) is VM "default"."""
        vm = load_vm(path)  # DataError propagates: at start it is fatal, on SIGHUP the caller logs it
        self._put_if_changed(DEFAULT_VM_ID, vm.document, vm.source)

    def sync_data_dir(self, directory: Path) -> None:
        """Make the VMs that came from `directory` match its files."""
        seen = set()
        for path in sorted(directory.glob("*.json")):
            vm_id = self.sync_data_file(path)
            if vm_id is not None:
                seen.add(vm_id)
        for vm_id, store in list(self.registry.live().items()):
            source = store.current.vm.source if store.current is not None else ""
            if source.startswith(DATA_DIR_SOURCE_PREFIX) and vm_id not in seen:
                self.delete(vm_id)

    def sync_data_file(self, path: Path) -> str | None:
        """Apply one file of --data-dir; returns its VM id, or None if refused."""
        source = DATA_DIR_SOURCE_PREFIX + path.name
        try:
            vm = parse_vm(path.read_bytes(), str(path))
        except (OSError, DataError) as exc:
            # Also what a half-written file looks like: it never replaces good data.
            problems = exc.problems if isinstance(exc, DataError) else [str(exc)]
            log_event("update_refused", source=source, problems=problems)
            return None
        vm_id = vm.document.get("id", path.stem)
        try:
            self._put_if_changed(vm_id, vm.document, source)
        except UpdateError as exc:
            log_event("update_refused", source=source, vm=vm_id, error=exc.message, problems=exc.problems)
            return None
        return str(vm_id)

    def forget_data_file(self, path: Path) -> None:
        source = DATA_DIR_SOURCE_PREFIX + path.name
        for vm_id, store in list(self.registry.live().items()):
            if store.current is not None and store.current.vm.source == source:
                self.delete(vm_id)

    def _put_if_changed(self, vm_id: str, document: dict[str, Any], source: str) -> None:
        store = self.registry.stores.get(vm_id)
        if store is not None and store.current is not None:
            current = store.current.vm
            if current.document == document and current.source == source:
                return
        self.put(vm_id, document, source)

    async def watch_data_dir(self, directory: Path) -> None:
        from watchfiles import awatch

        async for batch in awatch(directory, debounce=200, step=20, recursive=False):
            for _change, raw_path in sorted(batch, key=lambda change: change[1]):
                path = Path(raw_path)
                if path.suffix != ".json" or path.name.startswith("."):
                    continue
                if path.exists():
                    self.sync_data_file(path)
                else:
                    self.forget_data_file(path)


def apply_entry(registry: VmRegistry, entry: BusEntry) -> bool:
    """Publish a bus entry if it is newer than what is served; False if refused."""
    store = registry.stores.get(entry.vm_id)
    if store is not None and entry.generation <= store.generation:
        return True
    try:
        vm = describe_vm(entry.document, entry.source)
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

    def rescan(self) -> None:
        """Apply every file that changed, appeared or vanished since the last look."""
        stamps = self.bus.stamps()
        changed = {vm_id for vm_id, stamp in stamps.items() if self.stamps.get(vm_id) != stamp}
        self.apply(changed | (set(self.stamps) - set(stamps)))

    def apply(self, vm_ids: set[str]) -> None:
        pending = []
        for vm_id in sorted(vm_ids):
            path = self.bus.path_of(vm_id)
            try:
                status = path.stat()
                self.stamps[vm_id] = (status.st_mtime_ns, status.st_size)
            except FileNotFoundError:
                self.stamps.pop(vm_id, None)
            entry = self.bus.read(vm_id)
            if entry is None:
                if not path.exists() and self.registry.remove(vm_id):
                    log_event("vm_removed", vm=vm_id)
                continue
            pending.append(entry)
        # An address can move from one VM to another within one batch; apply
        # whatever does not conflict, then retry the rest while that helps.
        while pending:
            refused = [entry for entry in pending if not apply_entry(self.registry, entry)]
            if len(refused) == len(pending):
                break
            pending = refused

    async def start(self) -> asyncio.Task[None]:
        """Start following; returns once the watch is known to run and the bus is applied.

        Order matters: a write before the watcher runs is caught by the scan
        after it, and one after it by the watcher, so none is missed.
        """
        active = asyncio.Event()
        task = asyncio.ensure_future(self._follow(active))
        probe = self.bus.directory / f"{PROBE_PREFIX}{os.getpid()}"
        give_up_at = asyncio.get_running_loop().time() + WATCH_START_TIMEOUT_S
        try:
            while not active.is_set() and asyncio.get_running_loop().time() < give_up_at:
                probe.write_bytes(b"")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(active.wait(), 0.02)
            if not active.is_set():
                log_event("watch_start_slow", directory=str(self.bus.directory))
        finally:
            probe.unlink(missing_ok=True)
        self.rescan()
        return task

    async def _follow(self, active: asyncio.Event) -> None:
        async for vm_ids, probed in self.bus.changes():
            if probed:
                active.set()
            if vm_ids:
                self.apply(vm_ids)
            elif not probed:
                self.rescan()  # idle: a safety net for anything the watcher missed

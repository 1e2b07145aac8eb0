"""The --data-dir folder: one VM per `*.json` file, watched.

Rules of this module:
- The VMs that came from the folder match its files: a new or changed file
  is put, a deleted file's VM is removed. Source names are
  "data-dir:<file name>" (fastimds.control.writer.DATA_DIR_SOURCE_PREFIX).
- A file that does not validate (a half-written one included) never
  replaces or removes the VM it held; only deleting the file removes it.
  The last writer wins between the folder and the admin API.
- Two files naming one VM id: the second is refused while the first exists.
  A file whose caller address another file gives up in the same batch is
  retried once that one is applied.
- The watch reports changed names; when idle, a rescan by file stamps is the
  safety net (fastimds.bus.watch).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastimds.bus.atomic import file_stamps
from fastimds.bus.watch import start_watch
from fastimds.control.writer import DATA_DIR_SOURCE_PREFIX, Control, UpdateError
from fastimds.imds.datafile import MAX_VM_FILE_BYTES, DataError, parse_vm
from fastimds.ops.event_log import EventLog
from fastimds.sources.base import SourceStatus
from fastimds.sources.files import read_description


class DataDirSource:
    def __init__(self, directory: Path, control: Control, log: EventLog) -> None:
        self.directory = directory
        self.control = control
        self.log = log
        self.stamps: dict[Path, tuple[int, int]] = {}
        self.watch: asyncio.Task[None] | None = None

    def load(self) -> None:
        """Make the VMs that came from the folder match its files (a full rescan)."""
        paths = sorted(self.directory.glob("*.json"))
        self.stamps = file_stamps(paths)
        self.sync_files(paths)
        present = {DATA_DIR_SOURCE_PREFIX + path.name for path in paths}
        for vm_id in self.control.live_ids():
            source = self.control.source_of(vm_id) or ""
            if source.startswith(DATA_DIR_SOURCE_PREFIX) and source not in present:
                self.control.delete(vm_id, source)

    reload = load

    async def start(self) -> None:
        """Watch the folder; returns once the watch runs and a rescan after it is applied."""
        self.watch = await start_watch(
            self.directory,
            on_change=lambda names: self.sync_files(
                [self.directory / name for name in sorted(names) if name.endswith(".json")]
            ),
            on_idle=self.rescan,
            log=self.log,
        )

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.cancel()

    def status(self) -> SourceStatus:
        return SourceStatus("data-dir", str(self.directory))

    def rescan(self) -> None:
        """Sync the files whose stamp changed since the last look (the idle safety net)."""
        paths = sorted(self.directory.glob("*.json"))
        stamps = file_stamps(paths)
        changed = {path for path, stamp in stamps.items() if self.stamps.get(path) != stamp}
        changed |= set(self.stamps) - set(stamps)
        self.stamps = stamps
        self.sync_files(sorted(changed))

    def sync_files(self, paths: list[Path]) -> None:
        """Apply changed files; one whose address another file gives up is retried."""
        pending = list(paths)
        while pending:
            conflicted = [path for path in pending if self._sync_file(path) == "conflict"]
            if len(conflicted) == len(pending):
                for path in conflicted:
                    self._sync_file(path, report=True)
                break
            pending = conflicted

    def _sync_file(self, path: Path, report: bool = False) -> str:
        """One file: "ok", "refused" or "conflict" (which the caller may retry)."""
        control = self.control
        source = DATA_DIR_SOURCE_PREFIX + path.name
        owned = frozenset(vm_id for vm_id in control.live_ids() if control.source_of(vm_id) == source)
        if not path.exists():
            for vm_id in sorted(owned):
                control.delete(vm_id, source)
            return "ok"
        try:
            vm = parse_vm(read_description(path, MAX_VM_FILE_BYTES), str(path))  # regular files only, bounded
        except (OSError, DataError) as exc:
            # Also what a half-written file looks like: it never replaces (or removes) good data.
            problems = exc.problems if isinstance(exc, DataError) else [str(exc)]
            self.log.event("update_refused", source=source, problems=problems)
            control.updates["refused", "data-dir"] += 1
            return "refused"
        vm_id = str(vm.document.get("id", path.stem))
        other = control.source_of(vm_id)
        other_file = other[len(DATA_DIR_SOURCE_PREFIX) :] if other and other.startswith(DATA_DIR_SOURCE_PREFIX) else ""
        if other_file and other != source and (path.parent / other_file).exists():
            error = f"VM id {vm_id!r} is also defined by {other_file}"
            self.log.event("update_refused", source=source, vm=vm_id, error=error)
            return "refused"
        try:
            control.put_if_changed(vm_id, vm.document, source, replacing=owned)  # an id changed in the file
        except UpdateError as exc:
            if exc.status == 409 and not report:
                return "conflict"
            self.log.event("update_refused", source=source, vm=vm_id, error=exc.message, problems=exc.problems)
            return "refused"
        return "ok"

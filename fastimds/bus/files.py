"""The update bus: one directory of accepted VM descriptions, one file per VM.

Rules of this module:
- The control plane is the only writer of VM files and the faults file;
  every follower reads. A VM file (fastimds.bus.layout) holds
  {"generation": N, "source": "...", "vm": {...}, "events": {...}}, "events"
  being the VM's live scheduled events (fastimds.imds.events; null when it
  has none).
  A removed VM keeps its file as a tombstone ("vm": null) so its generation
  survives: a control process that restarts numbers the VM's next version
  above everything any worker has seen.
- Every write is whole (fastimds.bus.atomic): a reader never sees half a file.
- With `--state-dir` the bus is that directory and durable, so a restarted
  server serves the last good data before any source speaks; without it the
  bus is a private temporary directory and nothing is fsynced.
- A file that cannot be read or parsed is reported and skipped, never served.
  Each version of such a file is reported once per Bus (per process), however
  many readers of that process read it (the control and the follower of one
  process share their Bus).
- One more file, FAULTS_FILE (fastimds.bus.layout), holds the injected
  faults; its name is no VM id, so VM scans pass it by. Its records are
  checked field by field as they are read (faults.parse_records): a file that
  does not hold records is reported and read as no faults.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from fastimds.bus.atomic import file_stamps, write_whole
from fastimds.bus.layout import FAULTS_FILE, vm_file_name, vm_id_of
from fastimds.imds.datafile import DataError, VmDescription, describe_vm
from fastimds.imds.events import EventsState, state_problems
from fastimds.imds.faults import FaultRecord, parse_records
from fastimds.ops.event_log import EventLog


@dataclass(frozen=True)
class BusEntry:
    vm_id: str
    generation: int
    source: str
    document: dict[str, Any] | None  # None: the VM was removed (a tombstone); JSON, checked when applied
    # The live scheduled events, when there are any. As read from a file it is
    # unchecked: whoever applies the entry checks it first (events.state_problems).
    events: EventsState | None = None

    def described(self) -> VmDescription:
        """The VM this entry holds, validated as any description is, with its events checked.

        Raises DataError naming every problem; a tombstone has no VM (the caller checks `document` first).
        """
        if self.document is None:
            raise DataError(self.source, ["$: a removed VM (tombstone) describes no VM"])
        vm = describe_vm(self.document, self.source)
        if self.events is None:
            return vm
        problems = state_problems(self.events)
        if problems:
            raise DataError(self.source, problems)
        return replace(vm, scheduled=self.events)


class Bus:
    def __init__(self, directory: Path, durable: bool, log: EventLog) -> None:
        self.directory = directory
        self.durable = durable
        self.log = log
        self.reported: dict[Path, tuple[int, int] | None] = {}  # corrupt files already reported, by stamp
        directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def private(cls, log: EventLog) -> Bus:
        return cls(Path(tempfile.mkdtemp(prefix="fastimds-bus-")), durable=False, log=log)

    def path_of(self, vm_id: str) -> Path:
        return self.directory / vm_file_name(vm_id)

    @property
    def faults_path(self) -> Path:
        return self.directory / FAULTS_FILE

    def write(self, entry: BusEntry) -> None:
        data = orjson.dumps(
            {"generation": entry.generation, "source": entry.source, "vm": entry.document, "events": entry.events},
            option=orjson.OPT_SORT_KEYS,
        )
        write_whole(self.path_of(entry.vm_id), data, self.durable)

    def write_faults(self, records: list[FaultRecord]) -> None:
        write_whole(self.faults_path, orjson.dumps({"faults": records}), self.durable)

    def read_faults(self) -> list[FaultRecord]:
        """The fault records; [] when there are none or the file is unreadable or not records (reported)."""
        path = self.faults_path
        try:
            records = parse_records(orjson.loads(path.read_bytes())["faults"])
        except FileNotFoundError:
            return []
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            self._report("faults_file_corrupt", path, str(exc))
            return []
        return records

    def read(self, vm_id: str) -> BusEntry | None:
        """The entry for `vm_id`; None if absent or unreadable (reported)."""
        path = self.path_of(vm_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.log.event("state_file_unreadable", path=str(path), error=exc.strerror)
            return None
        try:
            record = orjson.loads(raw)
            entry = BusEntry(
                vm_id, int(record["generation"]), str(record["source"]), record["vm"], record.get("events")
            )
            if not (entry.document is None or isinstance(entry.document, dict)) or entry.generation < 1:
                raise ValueError("bad generation or document")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            self._report("state_file_corrupt", path, str(exc))
            return None
        return entry

    def _report(self, event: str, path: Path, error: str) -> None:
        stamp = file_stamps([path]).get(path)
        if path in self.reported and self.reported[path] == stamp:
            return  # this very file was reported already
        self.reported[path] = stamp
        self.log.event(event, path=str(path), error=error)

    def ids(self) -> list[str]:
        return sorted(vm_id for path in self.directory.iterdir() if (vm_id := vm_id_of(path.name)) is not None)

    def read_all(self) -> list[BusEntry]:
        return [entry for vm_id in self.ids() if (entry := self.read(vm_id)) is not None]

    def stamps(self) -> dict[str, tuple[int, int]]:
        """(mtime_ns, size) of every VM file: what changed since a scan, without reading."""
        return {
            vm_id: stamp
            for path, stamp in file_stamps(list(map(self.path_of, self.ids()))).items()
            if (vm_id := vm_id_of(path.name)) is not None
        }

    def faults_stamp(self) -> tuple[int, int] | None:
        return file_stamps([self.faults_path]).get(self.faults_path)

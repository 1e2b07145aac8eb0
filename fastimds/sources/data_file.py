"""The --data file (or the embedded sample): VM "default" in single-VM mode.

Rules of this module:
- At start a file that does not validate refuses the start (DataError);
  on SIGHUP it is refused with a log line naming every problem, and the old
  data keeps serving.
- A reload that changes nothing writes nothing (no new generation).
- Without --data, the embedded sample is re-read only while the server
  holds no VM but "default": once other VMs were written (the admin API),
  the sample is no longer what it serves.
"""

from __future__ import annotations

from pathlib import Path

from fastimds.control.writer import Control, UpdateError
from fastimds.imds.datafile import DataError, load_vm
from fastimds.imds.store import DEFAULT_VM_ID
from fastimds.ops.event_log import EventLog
from fastimds.sources.base import SourceStatus


class DataFileSource:
    def __init__(self, path: Path | None, control: Control, log: EventLog) -> None:
        self.path = path  # None: the embedded sample
        self.control = control
        self.log = log

    def load(self) -> None:
        vm = load_vm(self.path)  # DataError propagates: at start it is fatal
        self.control.put_if_changed(DEFAULT_VM_ID, vm.document, vm.source)

    async def start(self) -> None:
        pass  # nothing to follow: a file is re-read on SIGHUP only

    def reload(self) -> None:
        if self.path is None and set(self.control.model.records) - {DEFAULT_VM_ID}:
            return  # serving the VMs written since, not the sample
        try:
            self.load()
        except (DataError, UpdateError) as exc:
            self.log.event(
                "reload_refused",
                source=str(self.path),
                problems=exc.problems if exc.problems else [str(exc)],
                serving_generation=self.control.generation(DEFAULT_VM_ID),
            )
            return
        self.log.event("reload_published", source=str(self.path), generation=self.control.generation(DEFAULT_VM_ID))

    def stop(self) -> None:
        pass

    def status(self) -> SourceStatus:
        return SourceStatus("data-file", str(self.path) if self.path is not None else "<embedded sample>")

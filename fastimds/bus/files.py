"""The update bus: one directory of accepted VM descriptions, one file per VM.

Rules of this module:
- The control plane is the only writer; every worker reads. A file is
  `<vm id>.json` holding {"generation": N, "source": "...", "vm": {...},
  "events": {...}}, "events" being the VM's live scheduled events
  (fastimds.imds.events; null when it has none).
  A removed VM keeps its file as a tombstone ("vm": null) so its generation
  survives: a control process that restarts numbers the VM's next version
  above everything any worker has seen.
- A write is a new temp file (name starting with ".", which readers ignore),
  written whole, fsynced when durable, then renamed over the old file and
  the directory fsynced: a reader sees the old file or the new one, never a
  half-written one, and after a crash the last acknowledged write is there.
- With `--state-dir` the bus is that directory and durable, so a restarted
  server serves the last good data before any source speaks; without it the
  bus is a private temporary directory and nothing is fsynced.
- A file that cannot be read or parsed is reported and skipped, never served.
- One more file, FAULTS_FILE (fastimds.imds.faults), holds the injected faults;
  its name is no VM id, so VM scans pass it by. Its records are checked
  field by field as they are read (faults.parse_records): a file that does
  not hold records is reported and read as no faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fastimds.imds.datafile import VM_ID_PATTERN
from fastimds.imds.events import EventsState
from fastimds.imds.faults import FAULTS_FILE, FaultRecord, parse_records
from fastimds.ops.event_log import log_event

SUFFIX = ".json"
# Changes seen by the watcher are delivered this soon after the last one
# (watchfiles' `step`); the update-latency target is 100 ms at p99.
WATCH_STEP_MS = 5
WATCH_DEBOUNCE_MS = 50
# With no change for this long the watch yields an empty batch: the caller
# rescans then, which closes the window between its first load and the
# watcher starting, and is a safety net for any event the OS dropped.
WATCH_IDLE_RESCAN_MS = 1000
# Files a follower touches until its watcher reports one (never a VM file).
PROBE_PREFIX = ".probe-"


@dataclass(frozen=True)
class BusEntry:
    vm_id: str
    generation: int
    source: str
    document: dict[str, Any] | None  # None: the VM was removed (a tombstone); JSON, checked when applied
    # The live scheduled events, when there are any. As read from a file it is
    # unchecked: whoever applies the entry checks it first (events.state_problems).
    events: EventsState | None = None


class Bus:
    def __init__(self, directory: Path, durable: bool) -> None:
        self.directory = directory
        self.durable = durable
        directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def private(cls) -> Bus:
        return cls(Path(tempfile.mkdtemp(prefix="fastimds-bus-")), durable=False)

    def path_of(self, vm_id: str) -> Path:
        return self.directory / f"{vm_id}{SUFFIX}"

    def write(self, entry: BusEntry) -> None:
        data = orjson.dumps(
            {"generation": entry.generation, "source": entry.source, "vm": entry.document, "events": entry.events},
            option=orjson.OPT_SORT_KEYS,
        )
        write_whole(self.path_of(entry.vm_id), data, self.durable)

    def write_faults(self, records: list[FaultRecord]) -> None:
        write_whole(self.directory / FAULTS_FILE, orjson.dumps({"faults": records}), self.durable)

    def read_faults(self) -> list[FaultRecord]:
        """The fault records; [] when there are none or the file is unreadable or not records (reported)."""
        path = self.directory / FAULTS_FILE
        try:
            records = parse_records(orjson.loads(path.read_bytes())["faults"])
        except FileNotFoundError:
            return []
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log_event("faults_file_corrupt", path=str(path), error=str(exc))
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
            log_event("state_file_unreadable", path=str(path), error=exc.strerror)
            return None
        try:
            record = orjson.loads(raw)
            entry = BusEntry(
                vm_id, int(record["generation"]), str(record["source"]), record["vm"], record.get("events")
            )
            if not (entry.document is None or isinstance(entry.document, dict)) or entry.generation < 1:
                raise ValueError("bad generation or document")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log_event("state_file_corrupt", path=str(path), error=str(exc))
            return None
        return entry

    def ids(self) -> list[str]:
        return sorted(
            path.name[: -len(SUFFIX)]
            for path in self.directory.iterdir()
            if path.name.endswith(SUFFIX) and VM_ID_PATTERN.fullmatch(path.name[: -len(SUFFIX)])
        )

    def read_all(self) -> list[BusEntry]:
        return [entry for vm_id in self.ids() if (entry := self.read(vm_id)) is not None]

    def stamps(self) -> dict[str, tuple[int, int]]:
        """(mtime_ns, size) of every VM file: what changed since a scan, without reading."""
        return {
            path.name[: -len(SUFFIX)]: stamp for path, stamp in file_stamps(list(map(self.path_of, self.ids()))).items()
        }


def write_whole(path: Path, data: bytes, durable: bool) -> None:
    """Write `path` whole under a temp name starting with ".", then rename it into place (see the
    module rules); with `durable`, the file and then its directory are fsynced first."""
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.stem}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    if durable:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


async def watch_directory(directory: Path) -> AsyncIterator[tuple[set[str], bool]]:
    """(names that changed, whether a probe file was seen), batch by batch.

    Names starting with "." (temp and probe files) are not reported. An empty
    batch means "nothing for a while": time to rescan (WATCH_IDLE_RESCAN_MS).
    Probe files (PROBE_PREFIX) let a caller learn that the watch is running.
    """
    from watchfiles import awatch

    watch = awatch(
        directory,
        debounce=WATCH_DEBOUNCE_MS,
        step=WATCH_STEP_MS,
        recursive=False,
        rust_timeout=WATCH_IDLE_RESCAN_MS,
        yield_on_timeout=True,
    )
    async for batch in watch:
        names = set()
        probed = False
        for _change, raw_path in batch:
            name = Path(raw_path).name
            probed = probed or name.startswith(PROBE_PREFIX)
            if not name.startswith("."):
                names.add(name)
        if names or probed or not batch:
            yield names, probed


async def until_watching(directory: Path, active: asyncio.Event, timeout_s: float) -> bool:
    """Touch a probe file in `directory` until the watch reading it sets `active`."""
    loop = asyncio.get_running_loop()
    probe = directory / f"{PROBE_PREFIX}{os.getpid()}"
    give_up_at = loop.time() + timeout_s
    try:
        while not active.is_set() and loop.time() < give_up_at:
            probe.write_bytes(b"")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(active.wait(), 0.02)
    finally:
        probe.unlink(missing_ok=True)
    if not active.is_set():
        log_event("watch_start_slow", directory=str(directory))
    return active.is_set()


def file_stamps(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    """(mtime_ns, size) of each file that exists: enough to tell a changed file without reading it."""
    found = {}
    for path in paths:
        try:
            status = path.stat()
        except FileNotFoundError:
            continue
        found[path] = (status.st_mtime_ns, status.st_size)
    return found

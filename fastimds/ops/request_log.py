"""Cold-path request log: one JSON line per request, written in batches off the hot path.

Rules of this module:
- Recording is the only work on the hot path: four references appended to
  the flat `buffer` (O(1), no I/O, no formatting). The protocol does it
  itself for a read with one reply and calls `record_read` for several;
  `record()` takes one request's fields (tools and tests). Past
  `MAX_BUFFERED_RECORDS` records are dropped and counted in `dropped`, so a
  stuck disk can never grow a worker's memory without bound.
- `flush(now)` runs from the worker's flush timer (every REQUEST_LOG_FLUSH_S,
  fastimds.process.worker) and at shutdown. It
  encodes the buffer with orjson (one call per batch) and appends it to the
  worker's current file with one write(2), then rotates and enforces
  retention; `max_records` slices a large buffer so that no one flush stalls
  the loop for long. It never raises: a failure is counted in `errors`
  (`last_error` says what), the records it cost in `lost`, and an event for
  the event log is queued (`take_events()`) once per streak of failures,
  and once when the streak ends.
- Every worker writes only its own files, so N workers never share a file,
  a lock or a name. File names, in DIR:
      requests.w003.jsonl                              worker 3's current file
      requests.20261126T101500.123456Z.w003.jsonl      rotated: closed at that UTC time
  Rotated names sort by time (then worker), and a rotated file holds only
  records from before the time in its name.
- The current file is rotated (renamed) when it has grown to
  `max_file_bytes` or is `max_file_age_s` old; then at most `retain_files`
  rotated files per worker are kept and, with `retain_age_s`, none closed
  longer ago than that. The current file is never deleted.
- File descriptors stay open between flushes (O_APPEND). A worker that
  restarts continues its predecessor's current file; if that file ends
  inside a line (a crash mid-write), the next write starts a new line, so
  one record is corrupt, not two (`fastimds logs` skips it).

The file format and the record fields: fastimds.ops.request_log_format.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from fastimds.ops.request_log_format import (
    FIELDS,
    HEADER,
    LOG_FILE_NAME,
    RECORD_WIDTH,
    Event,
    Head,
    Record,
    Sent,
    current_file_name,
    encode_records,
    parse_stamp,
    rotated_file_name,
)

MAX_BUFFERED_RECORDS: Final = 100_000
DEFAULT_MAX_FILE_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_FILE_AGE_S: Final = 3600.0
DEFAULT_RETAIN_FILES: Final = 48
# Retention is enforced after every rotation and, for age, at least this often.
RETENTION_CHECK_INTERVAL_S: Final = 60.0
# Bytes read from the head of an existing current file to learn when it was started.
FIRST_LINE_PROBE_BYTES: Final = 4096
FILE_MODE: Final = 0o640

MAX_BUFFERED_VALUES: Final = MAX_BUFFERED_RECORDS * RECORD_WIDTH


class RequestLog:
    """One worker's request log; see the module's rules."""

    def __init__(
        self,
        directory: Path,
        worker: int,
        *,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_file_age_s: float = DEFAULT_MAX_FILE_AGE_S,
        retain_files: int = DEFAULT_RETAIN_FILES,
        retain_age_s: float | None = None,
    ) -> None:
        if worker < 0:
            raise ValueError(f"worker must be >= 0, not {worker}")
        if max_file_bytes <= 0 or max_file_age_s <= 0:
            raise ValueError("max_file_bytes and max_file_age_s must be more than 0")
        if retain_files < 0 or (retain_age_s is not None and retain_age_s <= 0):
            raise ValueError("retain_files must be >= 0 and retain_age_s more than 0")
        self.directory = directory
        self.worker = worker
        self.max_file_bytes = max_file_bytes
        self.max_file_age_s = max_file_age_s
        self.retain_files = retain_files
        self.retain_age_s = retain_age_s
        self.current_path = directory / current_file_name(worker)
        # Counters, for the worker's telemetry and for tests.
        self.written = 0  # records written to disk
        self.dropped = 0  # records refused on arrival: the buffer was full
        self.lost = 0  # records in batches that could not be written or encoded
        self.errors = 0  # failed flushes, rotations and retention passes
        self.rotations = 0
        self.last_error: str | None = None
        # Records laid end to end, four values each: no tuple is made per
        # record (a new tuple per record made every collection walk the whole
        # buffer: 1.0 -> 0.4 µs per request); the head and sent tuples it
        # holds are shared by many records and made once each.
        self.buffer: list[Any] = []
        self._fd: int | None = None
        self._size = 0  # bytes in the current file
        self._started_at = 0.0  # Unix time of the current file's first record
        self._needs_newline = False  # the current file ends inside a line
        self._last_stamp_us = 0  # the newest rotated name of this worker, Unix µs
        self._seen_rotated = False  # _last_stamp_us includes the files already in the directory
        self._next_retention_at = 0.0  # 0: on the first flush
        self._failing = False  # inside a streak of errors
        self._dropping = False  # the last flush saw new drops
        self._dropped_seen = 0
        self._reported_unencodable = False
        self._events: list[Event] = []

    # ---- hot path ----

    def record(  # noqa: PLR0917 - positional, in the order of the fields it takes
        self,
        ts: float,
        caller: str | bytes,
        vm_id: str,
        method: str | bytes,
        target: str | bytes,
        status: int,
        size: int,
        latency_us: int,
        generation: int,
    ) -> None:
        """Remember one request; O(1), no I/O. `caller`, `method` and `target` may be bytes (decoded at flush)."""
        buffer = self.buffer
        if len(buffer) < MAX_BUFFERED_VALUES:
            buffer += ((caller, vm_id, generation), ts, ((method, target, status), size), latency_us)
        else:
            self.dropped += 1

    def record_read(self, ts: float, head: Head, latency_us: int, replies: Sequence[Sent]) -> None:
        """Remember every reply of one read at once: what they share is passed once (the protocol's call).

        The protocol writes a read with one reply straight into `buffer`, the same way.
        """
        buffer = self.buffer
        for sent in replies:
            if len(buffer) >= MAX_BUFFERED_VALUES:
                self.dropped += 1
                continue
            buffer += (head, ts, sent, latency_us)

    # ---- the tick ----

    @property
    def buffered(self) -> int:
        return len(self.buffer) // RECORD_WIDTH

    def flush(self, now: float, max_records: int | None = None) -> None:
        """Write what was recorded, rotate, enforce retention. `now` is Unix time. Never raises.

        With `max_records`, only the oldest that many are written (one write);
        the rest stay buffered (`buffered`) for the next call. A server under
        heavy load calls it again with `loop.call_soon` until nothing is left,
        so requests are served between slices instead of waiting for one
        long flush.
        """
        if max_records is None or len(self.buffer) <= max_records * RECORD_WIDTH:
            flat, self.buffer = self.buffer, []
        else:
            flat = self.buffer[: max_records * RECORD_WIDTH]
            del self.buffer[: max_records * RECORD_WIDTH]
        # Back into one tuple per record, in C, for orjson; they die with this call.
        records: list[Record] = list(zip(*[iter(flat)] * RECORD_WIDTH, strict=True))
        if self.dropped != self._dropped_seen:
            if not self._dropping:
                self._events.append(("request_log_dropping", {"dropped": self.dropped, "buffer": MAX_BUFFERED_RECORDS}))
            self._dropping, self._dropped_seen = True, self.dropped
        else:
            self._dropping = False
        try:
            if records:
                self._write(records, now)
            if self._fd is not None and (
                self._size >= self.max_file_bytes or now - self._started_at >= self.max_file_age_s
            ):
                self._rotate(now)
            if now >= self._next_retention_at:
                self._enforce_retention(now)
        except Exception as exc:  # the server must never see it
            self._fail(exc)
            return
        if self._failing:
            self._failing = False
            self._events.append(("request_log_recovered", {"errors": self.errors, "lost": self.lost}))

    def close(self, now: float) -> None:
        """Flush and close the current file (the next start continues it). Never raises."""
        self.flush(now)
        self._close_fd()

    def take_events(self) -> list[Event]:
        """Events to log since the last call, as (event, fields) for `EventLog.event`; usually none."""
        events, self._events = self._events, []
        return events

    # ---- inside ----

    def _fail(self, exc: BaseException) -> None:
        """Count a failure; the first of a streak queues an event, the next success ends the streak."""
        self.errors += 1
        self.last_error = _describe(exc)
        if not self._failing:
            self._failing = True
            self._events.append(
                ("request_log_error", {"error": self.last_error, "directory": str(self.directory), "lost": self.lost})
            )

    def _write(self, records: list[Record], now: float) -> None:
        chunks, bad = encode_records(records)
        if bad:  # a caller's bug, not the disk's: counted, reported the first time only
            self.lost += bad
            self.errors += 1
            self.last_error = f"ValueError: {bad} records could not be encoded"
            if not self._reported_unencodable:
                self._reported_unencodable = True
                self._events.append(("request_log_unencodable", {"error": self.last_error}))
        if not chunks:
            return
        try:
            opened = self._fd is None
            fd = self._open(now)
            if opened:
                chunks.insert(0, HEADER)  # names the fields of the lines this process appends
            if self._needs_newline:
                chunks.insert(0, b"\n")
            self._write_all(fd, chunks)
        except OSError:
            self.lost += len(records) - bad
            raise
        self.written += len(records) - bad

    def _write_all(self, fd: int, chunks: list[bytes | memoryview]) -> None:
        """One writev(2), unless the kernel takes less (a full disk): then the rest, in order."""
        total = sum(len(chunk) for chunk in chunks)
        done = os.writev(fd, chunks)
        self._size += done
        if done < total:
            rest = memoryview(b"".join(chunks))[done:]
            self._needs_newline = True  # until the rest is in
            while rest:
                written = os.write(fd, rest)
                self._size += written
                rest = rest[written:]
        self._needs_newline = False

    def _open(self, now: float) -> int:
        if self._fd is not None:
            return self._fd
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self.current_path, flags, FILE_MODE)
        except FileNotFoundError:  # the directory was removed under us: make it again
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.current_path, flags, FILE_MODE)
        try:
            size = os.fstat(fd).st_size
            started_at = now
            needs_newline = False
            if size:  # continue a predecessor's file: learn its start and whether it ends mid-line
                with open(self.current_path, "rb") as existing:
                    started_at = _first_ts(existing.read(FIRST_LINE_PROBE_BYTES), default=now)
                    existing.seek(size - 1)
                    needs_newline = existing.read(1) != b"\n"
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size, self._started_at, self._needs_newline = fd, size, started_at, needs_newline
        return fd

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                self._fail(exc)

    def _rotate(self, now: float) -> None:
        if not self._seen_rotated:  # a restarted worker continues after its predecessor's names
            self._seen_rotated = True
            self._last_stamp_us = max(
                [self._last_stamp_us, *(s for s, _ in rotated_files(self.directory, self.worker))]
            )
        stamp_us = max(int(now * 1_000_000), self._last_stamp_us + 1)  # names never repeat, never go back
        target = self.directory / rotated_file_name(self.worker, stamp_us)
        while target.exists():  # a clock that went back across a restart
            stamp_us += 1
            target = self.directory / rotated_file_name(self.worker, stamp_us)
        self._close_fd()
        os.rename(self.current_path, target)
        self._last_stamp_us = stamp_us
        self.rotations += 1
        self._next_retention_at = 0.0  # in this flush

    def _enforce_retention(self, now: float) -> None:
        self._next_retention_at = now + RETENTION_CHECK_INTERVAL_S
        rotated = sorted(rotated_files(self.directory, self.worker))
        if rotated:
            self._last_stamp_us = max(self._last_stamp_us, rotated[-1][0])
        self._seen_rotated = True
        doomed = rotated[: max(0, len(rotated) - self.retain_files)]
        if self.retain_age_s is not None:
            oldest_kept_us = int((now - self.retain_age_s) * 1_000_000)
            doomed += [item for item in rotated[len(doomed) :] if item[0] < oldest_kept_us]
        first_error: OSError | None = None
        for _, path in doomed:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error


def rotated_files(directory: Path, worker: int | None = None) -> list[tuple[int, Path]]:
    """(closed at, Unix µs; path) of every rotated request-log file in `directory` (one worker's, if given)."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = LOG_FILE_NAME.match(entry.name)
            if match is None or match["stamp"] is None:
                continue
            if worker is not None and int(match["worker"]) != worker:
                continue
            try:
                found.append((parse_stamp(match["stamp"]), Path(entry.path)))
            except ValueError:  # 20261399T...: not one of ours
                continue
    return found


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


def _first_ts(head: bytes, default: float) -> float:
    """The time of the first record in a file's first bytes (header lines skipped)."""
    for line in head.split(b"\n")[:-1] or [head]:
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            return default
        if isinstance(value, dict) and "fields" in value:
            continue
        ts = value[FIELDS.index("ts")] if isinstance(value, list) and len(value) == len(FIELDS) else None
        if isinstance(value, dict):
            ts = value.get("ts")
        return float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else default
    return default


def prepare_directory(directory: Path) -> None:
    """Create `directory` if needed and check it is writable: for `serve` to refuse a bad flag at start.

    Raises ValueError with a message fit for the command line.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create --request-log directory {directory}: {exc.strerror}") from None
    if not directory.is_dir():
        raise ValueError(f"--request-log {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"--request-log directory {directory} is not writable: {os.strerror(errno.EACCES)}")

"""Cold-path request log: one JSON line per request, written in batches off the hot path.

Rules of this module:
- Recording is the only work on the hot path: four references appended to
  the flat `buffer` (O(1), no I/O, no formatting). The protocol does it
  itself for a read with one reply and calls `record_read` for several;
  `record()` takes one request's fields (tools and tests). Past
  `MAX_BUFFERED_RECORDS` records are dropped and counted in `dropped`, so a
  stuck disk can never grow a worker's memory without bound.
- `flush(now)` runs from the worker's once-a-second tick and at shutdown. It
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

File format: JSON lines. Each time a worker opens its file (a new file, a
rotation, a restart) it first writes a header line naming the fields,
    {"fastimds_request_log":2,"fields":[["caller","vm","generation"],"ts",[["method","target","status"],"bytes"],"latency_us"]}
and every following line is one record as a JSON array shaped like those
fields, for example
    [["10.0.0.4","vm-1",7],1795677751.4213,[["GET","/metadata/versions",200],61],87]
Arrays, not objects: orjson encodes a batch of tuples in one call at
~0.1 µs per record, against ~0.7-1.25 µs when each record is first made
into a dict (measured, tuning.md). Nested, because the hot path then stores
four references per request: the connection's (caller, vm, generation),
made once per connection and generation, the reply's ((method, target,
status), bytes), made once per remembered reply, and the two numbers that
are the request's own; copying nine values cost ~0.45 µs more per request
in the server (tuning.md). Each record starts with `[["`, so the byte
sequence `],[["` occurs between two records, and nowhere else inside a
record's structure; but a string ending in `],[[` (a caller's target can)
shows it too, before its closing quote. So one replace turns the batch into
lines only when the sequence occurs exactly once per boundary, which one
count checks; otherwise (a hostile target) that batch is encoded record by
record. `fastimds logs`
reads the header and prints records as objects; it also reads the earlier
formats: flat arrays under a version 1 header, and lines of objects.

Record fields:
    caller      str    the caller's IP address
    ts          float  Unix time of the request, seconds
    vm          str    the VM id that answered ("" when none)
    method      str    the HTTP method
    target      str    the request target: path and query, as sent
    status      int    the HTTP status code sent
    bytes       int    bytes of response body sent
    latency_us  int    microseconds from the request's bytes arriving to its reply written
    generation  int    the generation of the VM's data that answered (0 when none)
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import orjson

MAX_BUFFERED_RECORDS: Final = 100_000
DEFAULT_MAX_FILE_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_FILE_AGE_S: Final = 3600.0
DEFAULT_RETAIN_FILES: Final = 48
# `--request-log-retain 7d` limits age only: any number of rotated files.
UNLIMITED_FILES: Final = sys.maxsize
# Retention is enforced after every rotation and, for age, at least this often.
RETENTION_CHECK_INTERVAL_S: Final = 60.0
# Bytes read from the head of an existing current file to learn when it was started.
FIRST_LINE_PROBE_BYTES: Final = 4096
FILE_MODE: Final = 0o640

FILE_PREFIX: Final = "requests."
FILE_SUFFIX: Final = ".jsonl"
STAMP_FORMAT: Final = "%Y%m%dT%H%M%S.%fZ"
# requests.w003.jsonl / requests.20261126T101500.123456Z.w003.jsonl
LOG_FILE_NAME: Final = re.compile(r"^requests\.(?:(?P<stamp>\d{8}T\d{6}\.\d{6}Z)\.)?w(?P<worker>\d+)\.jsonl$")

RECORD_KEYS: Final = ("ts", "caller", "vm", "method", "target", "status", "bytes", "latency_us", "generation")
# The shape of a record's array on disk (see the module's rules).
FIELDS: Final = (("caller", "vm", "generation"), "ts", (("method", "target", "status"), "bytes"), "latency_us")
_WIDTH: Final = len(FIELDS)  # values per record in the flat buffer
MAX_BUFFERED_VALUES: Final = MAX_BUFFERED_RECORDS * _WIDTH
HEADER: Final = orjson.dumps({"fastimds_request_log": 2, "fields": FIELDS}) + b"\n"

# Who asked: (caller, vm_id, generation); the protocol makes one per connection and generation.
Head = tuple[str | bytes, str, int]
# What the protocol keeps of each reply: (method, target, status).
Stub = tuple[str | bytes, str | bytes, int]
# A reply as the request log keeps it: (its stub, bytes of body sent).
Sent = tuple[Stub, int]
# (head, ts, sent, latency_us): FIELDS' shape
Record = tuple[Head, float, Sent, int]
# (event name, fields) for fastimds.ops.event_log.log_event.
Event = tuple[str, dict[str, Any]]

_DURATION_UNITS_S: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


def current_file_name(worker: int) -> str:
    return f"{FILE_PREFIX}w{worker:03d}{FILE_SUFFIX}"


def rotated_file_name(worker: int, closed_at_us: int) -> str:
    return f"{FILE_PREFIX}{format_stamp(closed_at_us)}.w{worker:03d}{FILE_SUFFIX}"


def format_stamp(unix_us: int) -> str:
    seconds, micros = divmod(unix_us, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros).strftime(STAMP_FORMAT)


def parse_stamp(stamp: str) -> int:
    """Unix microseconds of a rotated file's stamp (as `format_stamp` wrote it); ValueError if it is not one."""
    moment = datetime.strptime(stamp, STAMP_FORMAT).replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MICROSECOND


def parse_retention(text: str) -> tuple[int, float | None]:
    """`--request-log-retain`: "48" (files), "7d" / "12h" / "30m" / "90s" (age), or "48,7d" (both).

    Returns (retain_files, retain_age_s). What is not given is not limited:
    "7d" keeps any number of files younger than 7 days (`UNLIMITED_FILES`),
    "48" keeps 48 files of any age. "0" keeps no rotated file at all.
    """
    files: int | None = None
    age_s: float | None = None
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or len(parts) > 2:
        raise ValueError(f"retention {text!r}: expected a file count (48), an age (7d, 12h, 30m), or both (48,7d)")
    for part in parts:
        if part.isdigit():
            if files is not None:
                raise ValueError(f"retention {text!r}: two file counts")
            files = int(part)
            continue
        if len(part) < 2 or part[-1] not in _DURATION_UNITS_S or not part[:-1].isdigit():
            raise ValueError(
                f"retention {text!r}: {part!r} is neither a file count (48) nor an age "
                f"(a whole number with s, m, h or d: 7d)"
            )
        if age_s is not None:
            raise ValueError(f"retention {text!r}: two ages")
        age_s = int(part[:-1]) * _DURATION_UNITS_S[part[-1]]
        if age_s <= 0:
            raise ValueError(f"retention {text!r}: the age must be more than 0")
    return (UNLIMITED_FILES if files is None else files), age_s


UTF8: Final = "utf-8"
DECODE_ERRORS: Final = "backslashreplace"  # invalid UTF-8 stays visible in the log: \xff


# Between two records of one JSON array of records (see the module's rules).
_ARRAY_BOUNDARY: Final = b'],[["'
_LINE_BOUNDARY: Final = b']\n[["'


def encode_records(records: list[Record]) -> tuple[list[bytes | memoryview], int]:
    """The JSON lines for `records`, as chunks to write in order, and how many records were left out.

    Fast because orjson is called once per batch on the tuples themselves;
    the array's record boundaries become newlines. Records holding bytes are
    decoded first (once per distinct value); a record that cannot be encoded
    at all (a caller's bug) is left out and counted.
    """
    bad = 0
    try:
        body = orjson.dumps(records)
    except TypeError:  # bytes to decode, or something orjson cannot encode
        records, bad = _encodable_records(records)
        body = orjson.dumps(records)
    if not records:
        return [], bad
    if body.count(_ARRAY_BOUNDARY) != len(records) - 1:  # a string holds the boundary's bytes
        return [b"\n".join(map(orjson.dumps, records)), b"\n"], bad
    body = body.replace(_ARRAY_BOUNDARY, _LINE_BOUNDARY)
    return [memoryview(body)[1:-1], b"\n"], bad


def _encodable_records(records: list[Record]) -> tuple[list[Record], int]:
    """The slow path: bytes decoded, each record checked on its own; the bad ones left out and counted."""
    texts: dict[bytes, str] = {}

    def text(value: object) -> object:
        if not isinstance(value, bytes):
            return value
        found = texts.get(value)
        if found is None:
            found = texts[value] = value.decode(UTF8, DECODE_ERRORS)
        return found

    kept: list[Record] = []
    bad = 0
    for record in records:
        try:
            (caller, vm, generation), ts, ((method, target, status), size), latency_us = record
            candidate = ((text(caller), vm, generation), ts, ((text(method), text(target), status), size), latency_us)
            if not isinstance(candidate[0][0], str):
                raise TypeError("the caller must be text")
            orjson.dumps(candidate)
        except (TypeError, ValueError):
            bad += 1
            continue
        kept.append(candidate)  # type: ignore[arg-type]
    return kept, bad


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
        return len(self.buffer) // _WIDTH

    def flush(self, now: float, max_records: int | None = None) -> None:
        """Write what was recorded, rotate, enforce retention. `now` is Unix time. Never raises.

        With `max_records`, only the oldest that many are written (one write);
        the rest stay buffered (`buffered`) for the next call. A server under
        heavy load calls it again with `loop.call_soon` until nothing is left,
        so requests are served between slices instead of waiting for one
        long flush.
        """
        if max_records is None or len(self.buffer) <= max_records * _WIDTH:
            flat, self.buffer = self.buffer, []
        else:
            flat = self.buffer[: max_records * _WIDTH]
            del self.buffer[: max_records * _WIDTH]
        # Back into one tuple per record, in C, for orjson; they die with this call.
        records: list[Record] = list(zip(*[iter(flat)] * _WIDTH, strict=True))
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
        """Events to log since the last call, as (event, fields) for `log_event`; usually none."""
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

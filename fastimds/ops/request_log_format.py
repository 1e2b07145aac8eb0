"""The request log's files: names, stamps, the line format, and encoding records into it.

Rules of this module:
- What the writer (fastimds.ops.request_log) and the reader (`fastimds logs`,
  fastimds.cli.logs) must agree on lives here, and only that: file names and
  their stamps, the header line, the record's shape, the retention flag.
- No I/O: names and bytes only.

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

import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

# `--request-log-retain 7d` limits age only: any number of rotated files.
UNLIMITED_FILES: Final = sys.maxsize

FILE_PREFIX: Final = "requests."
FILE_SUFFIX: Final = ".jsonl"
STAMP_FORMAT: Final = "%Y%m%dT%H%M%S.%fZ"
# requests.w003.jsonl / requests.20261126T101500.123456Z.w003.jsonl
LOG_FILE_NAME: Final = re.compile(r"^requests\.(?:(?P<stamp>\d{8}T\d{6}\.\d{6}Z)\.)?w(?P<worker>\d+)\.jsonl$")

RECORD_KEYS: Final = ("ts", "caller", "vm", "method", "target", "status", "bytes", "latency_us", "generation")
# The shape of a record's array on disk (see the module's rules).
FIELDS: Final = (("caller", "vm", "generation"), "ts", (("method", "target", "status"), "bytes"), "latency_us")
RECORD_WIDTH: Final = len(FIELDS)  # values per record in the flat buffer
HEADER: Final = orjson.dumps({"fastimds_request_log": 2, "fields": FIELDS}) + b"\n"

# Who asked: (caller, vm_id, generation); the protocol makes one per connection and generation.
Head = tuple[str | bytes, str, int]
# What the protocol keeps of each reply: (method, target, status).
Stub = tuple[str | bytes, str | bytes, int]
# A reply as the request log keeps it: (its stub, bytes of body sent).
Sent = tuple[Stub, int]
# (head, ts, sent, latency_us): FIELDS' shape
Record = tuple[Head, float, Sent, int]
# (event name, fields) for fastimds.ops.event_log.EventLog.event.
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

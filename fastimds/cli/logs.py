"""`fastimds logs DIR ...`: the request log, filtered, for an engineer who was paged.

Rules of this module:
- Reads every request-log file in DIR, current and rotated, of every worker
  (names in fastimds.ops.request_log), and merges them in time order with a heap
  (workers' files overlap in time). Rotated files that were closed long
  before --since are not opened at all.
- Filters are ANDed: --since/--until (10m, 2h, 1d, or an ISO time, UTC if no
  zone), --status (404, 5xx, or a comma list of either), --vm, --path (a
  prefix of the target's path, query excluded), --caller (an address or a
  CIDR network). --limit N stops after the first N matches; --tail N prints
  the last N (still oldest first).
- Output is the matching lines as they are on disk (JSON lines), or with
  --format table aligned columns. A line that is not a whole record (a
  crash mid-write) is skipped and counted on stderr: never fatal.
- Exit 0 with or without matches; 2 on bad arguments or a missing DIR.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import ipaddress
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import orjson

from fastimds.cli.durations import format_moment, parse_moment
from fastimds.ops.request_log_format import LOG_FILE_NAME, RECORD_KEYS, parse_stamp

# A rotated file holds records from before the time in its name; this much
# slack covers a clock stepped back while it was written.
ROTATED_SKIP_SLACK_S: Final = 300.0
# --format table aligns columns over this many rows at a time (widths only grow).
TABLE_BATCH_ROWS: Final = 1000

_INT_KEYS: Final = ("status", "bytes", "latency_us", "generation")
_STR_KEYS: Final = ("caller", "vm", "method", "target")
# (heading, key, right-aligned); the target comes last and is never padded.
TABLE_COLUMNS: Final = (
    ("TIME", "ts", False),
    ("CALLER", "caller", False),
    ("VM", "vm", False),
    ("METHOD", "method", False),
    ("STATUS", "status", True),
    ("BYTES", "bytes", True),
    ("LATENCY_US", "latency_us", True),
    ("GEN", "generation", True),
    ("TARGET", "target", False),
)

Record = dict[str, Any]
Predicate = Callable[[Record], bool]


class UsageError(ValueError):
    """A bad argument: exit 2 with this message."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, metavar="DIR", help="the --request-log directory")
    parser.add_argument("--since", help="only records at or after: 10m, 2h, 1d ago, or an ISO time")
    parser.add_argument("--until", help="only records before: 10m, 2h, 1d ago, or an ISO time")
    parser.add_argument("--status", help="404, 5xx, or a comma list: 4xx,503")
    parser.add_argument("--vm", help="only this VM id")
    parser.add_argument("--path", help="only targets whose path starts with this")
    parser.add_argument("--caller", help="only this caller address, or callers in this CIDR network")
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--limit", type=int, help="print the first N matches and stop")
    count.add_argument("--tail", type=int, help="print the last N matches")
    parser.add_argument("--format", choices=("json", "table"), default="json", help="output (default json lines)")


@dataclass
class Query:
    since: float | None = None
    until: float | None = None
    predicates: list[Predicate] = field(default_factory=list)

    def matches(self, record: Record) -> bool:
        ts = record["ts"]
        if self.since is not None and ts < self.since:
            return False
        if self.until is not None and ts >= self.until:
            return False
        return all(predicate(record) for predicate in self.predicates)


def build_query(args: argparse.Namespace, now: float) -> Query:
    query = Query()
    try:
        if args.since is not None:
            query.since = parse_moment(args.since, now)
        if args.until is not None:
            query.until = parse_moment(args.until, now)
    except ValueError as exc:
        raise UsageError(f"--since/--until: {exc}") from None
    if args.status is not None:
        query.predicates.append(status_predicate(args.status))
    if args.vm is not None:
        vm = args.vm
        query.predicates.append(lambda record: record["vm"] == vm)
    if args.path is not None:
        prefix = args.path
        query.predicates.append(lambda record: record["target"].partition("?")[0].startswith(prefix))
    if args.caller is not None:
        query.predicates.append(caller_predicate(args.caller))
    for flag in ("limit", "tail"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be at least 1, not {value}")
    return query


def status_predicate(text: str) -> Predicate:
    """404 / 5xx / 4xx,503: exact codes and classes."""
    exact: set[int] = set()
    classes: set[int] = set()
    for part in (item.strip().lower() for item in text.split(",")):
        if len(part) == 3 and part[0] in "12345" and part[1:] == "xx":
            classes.add(int(part[0]))
        elif len(part) == 3 and part.isdigit() and 100 <= int(part) <= 599:
            exact.add(int(part))
        else:
            raise UsageError(f"--status: {part!r} is neither a status code (404) nor a class (5xx)")
    return lambda record: record["status"] in exact or record["status"] // 100 in classes


def caller_predicate(text: str) -> Predicate:
    """An exact address, or every address in a CIDR network (10.0.0.0/24)."""
    if "/" not in text:
        return lambda record: record["caller"] == text
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise UsageError(f"--caller: {text!r} is neither an address nor a CIDR network") from None
    verdicts: dict[str, bool] = {}

    def inside(record: Record) -> bool:
        caller = record["caller"]
        verdict = verdicts.get(caller)
        if verdict is None:
            try:
                verdict = ipaddress.ip_address(caller) in network
            except ValueError:
                verdict = False
            verdicts[caller] = verdict
        return verdict

    return inside


@dataclass
class Corruption:
    """Lines skipped because they are not whole records, per file."""

    lines: collections.Counter[str] = field(default_factory=collections.Counter)

    def report(self, stream: IO[str]) -> None:
        total = sum(self.lines.values())
        if not total:
            return
        where = ", ".join(f"{name} ({count})" for name, count in sorted(self.lines.items()))
        print(f"fastimds logs: skipped {total} corrupt line{'s' if total != 1 else ''}: {where}", file=stream)


def log_files(directory: Path, since: float | None) -> list[Path]:
    """Every request-log file in `directory`, without rotated ones closed well before `since`."""
    found = []
    for entry in os.scandir(directory):
        match = LOG_FILE_NAME.match(entry.name)
        if match is None or not entry.is_file():
            continue
        if match["stamp"] is not None and since is not None:
            try:
                closed_at = parse_stamp(match["stamp"]) / 1e6
            except ValueError:
                closed_at = None
            if closed_at is not None and closed_at < since - ROTATED_SKIP_SLACK_S:
                continue
        found.append(Path(entry.path))
    return sorted(found)


def read_records(path: Path, query: Query, corruption: Corruption) -> Iterator[tuple[float, bytes, Record]]:
    """(ts, line as a JSON object, record) of every whole record in `path` that `query` matches, in file order."""
    try:
        with open(path, "rb") as source:
            fields: list[Any] | None = None  # from the last header line (names, nested as the arrays are)
            for raw in source:
                line = raw.rstrip(b"\r\n")
                if not line.strip():
                    continue
                parsed = parse_line(line, fields)
                if isinstance(parsed, list):
                    fields = parsed  # a header: the lines after it are arrays of these fields
                    continue
                if parsed is None:
                    corruption.lines[path.name] += 1
                elif query.matches(parsed):
                    # Array lines are printed as objects, like the lines of the first format.
                    shown = line if line.startswith(b"{") else orjson.dumps(parsed)
                    yield parsed["ts"], shown, parsed
    except FileNotFoundError:  # rotated away or deleted by retention while we read
        return


def parse_line(line: bytes, fields: list[Any] | None) -> Record | list[Any] | None:
    """A record (from an object line, or an array line under a header), a header's fields, or None.

    A header's fields are names, nested as its records' arrays are: flat in
    version 1, `[["caller","vm","generation"],"ts",...]` in version 2.
    """
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(value, dict) and isinstance(value.get("fields"), list):
        return list(value["fields"])
    if isinstance(value, list):
        named: dict[str, Any] = {}
        if fields is None or not _name_values(fields, value, named):
            return None
        value = {key: named[key] for key in RECORD_KEYS if key in named}
    return checked_record(value)


def _name_values(fields: list[Any], values: list[Any], named: dict[str, Any]) -> bool:
    """Name each value by its field, through any nesting; False if the shapes differ."""
    if not isinstance(values, list) or len(values) != len(fields):
        return False
    for name, value in zip(fields, values, strict=True):
        if isinstance(name, list):
            if not _name_values(name, value, named):
                return False
        elif isinstance(name, str):
            named[name] = value
        else:
            return False
    return True


def checked_record(record: Any) -> Record | None:
    """`record` if it has every field with its type, else None."""
    if not isinstance(record, dict) or any(key not in record for key in RECORD_KEYS):
        return None
    ts = record["ts"]
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return None
    for key in _INT_KEYS:
        value = record[key]
        if not isinstance(value, int) or isinstance(value, bool):
            return None
    for key in _STR_KEYS:
        if not isinstance(record[key], str):
            return None
    return record


def matching(directory: Path, query: Query, corruption: Corruption) -> Iterator[tuple[float, bytes, Record]]:
    """Every matching record of every file, merged in time order."""
    streams = [read_records(path, query, corruption) for path in log_files(directory, query.since)]
    return heapq.merge(*streams, key=lambda item: item[0])


def table_cells(record: Record) -> list[str]:
    return [format_moment(record["ts"]), *(str(record[key]) for _, key, _ in TABLE_COLUMNS[1:])]


class TableWriter:
    """Aligned columns, a batch of rows at a time; a column only ever widens."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.widths = [len(heading) for heading, _, _ in TABLE_COLUMNS]
        self.rows: list[list[str]] = []
        self.header_written = False

    def add(self, record: Record) -> None:
        self.rows.append(table_cells(record))
        if len(self.rows) >= TABLE_BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return  # no match, no header
        for row in self.rows:
            self.widths = [max(width, len(cell)) for width, cell in zip(self.widths, row, strict=True)]
        if not self.header_written:
            self.header_written = True
            self._line([heading for heading, _, _ in TABLE_COLUMNS])
        for row in self.rows:
            self._line(row)
        self.rows = []

    def _line(self, cells: list[str]) -> None:
        padded = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, (_, _, right) in zip(cells[:-1], self.widths, TABLE_COLUMNS, strict=False)
        ]
        self.out.write("  ".join([*padded, cells[-1]]) + "\n")


def emit(found: Iterable[tuple[float, bytes, Record]], output_format: str) -> None:
    if output_format == "table":
        table = TableWriter(sys.stdout)
        for _, _, record in found:
            table.add(record)
        table.flush()
        sys.stdout.flush()
        return
    out = sys.stdout.buffer
    for _, line, _ in found:
        out.write(line + b"\n")
    out.flush()


def run(args: argparse.Namespace, now: float | None = None) -> int:
    directory: Path = args.directory
    if not directory.is_dir():
        print(f"fastimds logs: {directory} is not a directory", file=sys.stderr)
        return 2
    try:
        query = build_query(args, time.time() if now is None else now)
    except UsageError as exc:
        print(f"fastimds logs: {exc}", file=sys.stderr)
        return 2
    corruption = Corruption()
    found: Iterable[tuple[float, bytes, Record]] = matching(directory, query, corruption)
    if args.limit is not None:
        found = itertools.islice(found, args.limit)
    elif args.tail is not None:
        found = collections.deque(found, maxlen=args.tail)
    try:
        sys.stdout.flush()
        emit(found, args.format)
    except BrokenPipeError:  # `fastimds logs DIR | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    corruption.report(sys.stderr)
    return 0

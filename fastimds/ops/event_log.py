"""Warm-path event log: one JSON object per line, rate-limited.

Rules of this module:
- Only for events (startup, config, updates accepted or refused, worker
  exits, limit hits, sampled request errors), never for every request: the
  cold-path request log (fastimds.ops.request_log) is for that.
- Every line carries the event name, the time, the pid and the process's
  role ("worker 0", "control", "supervisor"); callers add the VM id and
  generation where they know them.
- A flood cannot flood the log: each event name has a token bucket
  (LOG_BURST lines, refilled at LOG_LINES_PER_S). What it drops is counted
  (telemetry's log_suppressed counter) and summed up once a second in one
  `log_suppressed` line per event name.
- Lines go to stderr by default (stdout carries only the ready line), to a
  file with `--log-file PATH` (created 0640, LOG_FILE_MODE), or to stdout
  with `--log-file -`.
- No module-level log: each process has one EventLog, built at start (a
  forked child keeps its parent's and names its own role) and passed to
  everything that logs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

import orjson

# Per event name: at most LOG_BURST lines at once, LOG_LINES_PER_S sustained.
LOG_BURST = 100
LOG_LINES_PER_S = 20.0
# A log file this creates: lines name caller addresses and VM ids, which other
# local users (tenants' neighbours) have no business reading. An existing file
# keeps the mode its owner gave it.
LOG_FILE_MODE = 0o640


class EventLog:
    def __init__(self) -> None:
        self.stream: IO[bytes] | None = None  # None: whatever sys.stderr is at the time of writing
        self.role = "main"
        self.buckets: dict[str, list[float]] = {}  # event -> [tokens, last refill time]
        self.suppressed: dict[str, int] = {}
        self.counters: list[int] | None = None  # telemetry, where suppressed lines are counted
        self.suppressed_slot = 0

    def configure(self, path: str | None = None, role: str | None = None) -> None:
        if path == "-":
            self.stream = sys.stdout.buffer
        elif path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
            self.stream = os.fdopen(fd, "ab", buffering=0)  # lives as long as the process
        if role is not None:
            self.role = role

    def count_into(self, counters: list[int] | None, slot: int) -> None:
        """Count suppressed lines in `counters[slot]` (the process's telemetry), from now on."""
        self.counters, self.suppressed_slot = counters, slot

    def allow(self, event: str, now: float) -> bool:
        """Take a token for `event`; False (and counted) when its bucket is empty."""
        bucket = self.buckets.get(event)
        if bucket is None:
            bucket = self.buckets[event] = [float(LOG_BURST), now]
        tokens = min(float(LOG_BURST), bucket[0] + (now - bucket[1]) * LOG_LINES_PER_S)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            self.suppressed[event] = self.suppressed.get(event, 0) + 1
            if self.counters is not None:
                self.counters[self.suppressed_slot] += 1
            return False
        bucket[0] = tokens - 1.0
        return True

    def event(self, event: str, **fields: Any) -> None:
        now = time.time()
        if self.allow(event, now):
            self.write(event, now, fields)

    def write(self, event: str, now: float, fields: dict[str, Any]) -> None:
        """Write one line now, past the rate limit (callers that checked `allow` themselves)."""
        record = {"ts": round(now, 3), "event": event, "pid": os.getpid(), "role": self.role, **fields}
        stream = self.stream or sys.stderr.buffer
        try:
            stream.write(orjson.dumps(record, default=str) + b"\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a log that cannot be written must not take the server down

    def tick(self) -> None:
        """Once a second: one summary line per event name that was suppressed."""
        if not self.suppressed:
            return
        suppressed, self.suppressed = self.suppressed, {}
        now = time.time()
        for event, count in sorted(suppressed.items()):
            self.write("log_suppressed", now, {"suppressed_event": event, "lines": count})

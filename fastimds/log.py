"""Warm-path event log: one JSON object per line on stderr.

Rules of this module:
- Only for events (startup, reloads, refusals, worker exits), never per request.
- Every line carries the event name, the time and the worker's pid.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import orjson


def log_event(event: str, **fields: Any) -> None:
    record = {"ts": round(time.time(), 3), "event": event, "pid": os.getpid(), **fields}
    sys.stderr.buffer.write(orjson.dumps(record, default=str) + b"\n")
    sys.stderr.flush()

"""Request-log directories for tests of `fastimds logs`, written by the real RequestLog.

Rules of this module: records go through fastimds' own writer (never
hand-written lines), so the reader is tested against what the server
writes; times are fixed, from T0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastimds.ops.request_log import RequestLog

T0 = 1_795_000_000.0  # 2026-11-18T11:06:40Z


def write_log(directory: Path, worker: int, records: list[dict[str, Any]], max_file_bytes: int = 10**9) -> None:
    """Records through the real writer, one flush per record (so small max_file_bytes rotates often)."""
    log = RequestLog(directory, worker, max_file_bytes=max_file_bytes, retain_files=1000)
    for fields in records:
        full = {
            "caller": "10.0.0.4",
            "vm_id": f"vm-{worker}",
            "method": "GET",
            "target": "/metadata/instance?api-version=2021-02-01",
            "status": 200,
            "size": 100,
            "latency_us": 50,
            "generation": 1,
        } | fields
        ts = full.pop("ts")
        log.record(ts, **full)
        log.flush(ts)
    log.close(records[-1]["ts"])
    assert log.errors == 0

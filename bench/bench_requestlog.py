"""The request log's two costs: record() per request on the hot path, flush() per second off it.

Run with `make bench`; under `make test` each runs once as a smoke test.
The issue's budget: throughput with the request log on within 15 % of off,
so record() plus its share of flush() must stay near 1 µs per request at
~120k requests/s on one core.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from fastimds.ops.request_log import RequestLog

BATCH = 10_000
TARGETS = (
    b"/metadata/instance?api-version=2021-02-01",
    b"/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
    b"/metadata/versions",
)


def test_record(benchmark: Any, tmp_path: Path) -> None:
    log = RequestLog(tmp_path, worker=0)
    record = log.record
    now = time.time()
    target = TARGETS[0]

    def thousand() -> None:
        for _ in range(1000):
            record(now, "10.0.0.4", "vm-1", b"GET", target, 200, 2915, 87, 7)
        log.buffer.clear()  # stay far from MAX_BUFFERED_RECORDS

    benchmark(thousand)
    assert log.dropped == 0


def test_flush_10k(benchmark: Any, tmp_path: Path) -> None:
    """10,000 varied records (100 callers and VMs, fresh bytes targets) encoded and appended with one write."""
    log = RequestLog(tmp_path, worker=0, max_file_bytes=1 << 40)
    rng = random.Random(7)
    now = time.time()
    batch = [
        (
            now + index * 1e-4,
            f"10.0.0.{rng.randrange(100)}",
            f"vm-{rng.randrange(100)}",
            b"GET",
            bytes(bytearray(rng.choice(TARGETS))),  # a new object per request, as httptools makes them
            200,
            2915,
            rng.randrange(50, 500),
            7,
        )
        for index in range(BATCH)
    ]

    def flush() -> None:
        for item in batch:
            log.record(*item)
        log.flush(now)

    benchmark(flush)
    assert log.errors == 0 and log.written % BATCH == 0
    log.close(now)

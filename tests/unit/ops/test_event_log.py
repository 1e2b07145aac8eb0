"""The warm-path event log: JSON lines, rate-limited per event, sampled request errors.

A real server's --log-file is in tests/e2e/test_event_log_e2e.py.
"""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from fastimds.ops.event_log import LOG_BURST, LOG_FILE_MODE, LOG_LINES_PER_S, EventLog
from fastimds.ops.telemetry import LAYOUT, new_counters
from tests.support.fakes import make_connection, request


def lines(stream: io.BytesIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_flood_is_cut_at_the_burst_counted_and_summed_up() -> None:
    log = EventLog()
    log.stream = io.BytesIO()
    log.counters = new_counters()
    log.suppressed_slot = LAYOUT.log_suppressed
    for index in range(LOG_BURST + 50):
        log.event("flood", n=index)
    log.event("other")  # another event has its own bucket
    written = lines(log.stream)
    assert [r["event"] for r in written].count("flood") == LOG_BURST
    assert written[-1]["event"] == "other"
    assert log.counters[LAYOUT.log_suppressed] == 50
    log.tick()
    summary = lines(log.stream)[-1]
    assert (summary["event"], summary["suppressed_event"], summary["lines"]) == ("log_suppressed", "flood", 50)
    log.tick()  # nothing more suppressed: no more summaries
    assert len(lines(log.stream)) == LOG_BURST + 2


def test_the_bucket_refills_at_its_rate() -> None:
    log = EventLog()
    now = 1000.0
    for _ in range(LOG_BURST):
        assert log.allow("e", now)
    assert not log.allow("e", now)
    assert log.allow("e", now + 1.0 / LOG_LINES_PER_S + 1e-6)


def test_every_line_has_time_event_pid_and_role() -> None:
    log = EventLog()
    log.stream = io.BytesIO()
    log.configure(role="worker 3")
    log.event("update_applied", vm="a", generation=2)
    [record] = lines(log.stream)
    assert record["role"] == "worker 3"
    assert {"ts", "event", "pid", "vm", "generation"} <= set(record)


def test_refused_requests_are_logged_with_caller_vm_and_target(capsys: pytest.CaptureFixture[str]) -> None:
    # The connection logs to its worker's own EventLog (a fresh one here), whose buckets are full.
    protocol, _, _ = make_connection(peer="10.0.0.4")
    protocol.data_received(request("/metadata/instance?api-version=1999-01-01"))
    protocol.data_received(b"GET /metadata/versions HTTP/1.1\r\n" + b"X: " + b"v" * 9000 + b"\r\n\r\n")
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    error = next(r for r in records if r["event"] == "request_error")
    assert (error["caller"], error["status"], error["vm"]) == ("10.0.0.4", 400, "default")
    assert error["target"] == "/metadata/instance?api-version=1999-01-01"
    assert error["generation"] == 1
    limit = next(r for r in records if r["event"] == "limit_hit")
    assert limit["status"] == 431


def test_a_log_file_is_created_0640_and_an_existing_one_keeps_its_mode(tmp_path: Path) -> None:
    # Regression (issue 16, item 9): --log-file was created 0644, and its lines name caller
    # addresses and VM ids.
    old_umask = os.umask(0o022)  # the usual umask, under which a file made 0644 stays 0644
    try:
        created, existing = tmp_path / "new.log", tmp_path / "existing.log"
        existing.write_bytes(b"")
        existing.chmod(0o600)
        for path in (created, existing):
            log = EventLog()
            log.configure(path=str(path))
            log.event("hello")
            assert log.stream is not None
            log.stream.close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(created.stat().st_mode) == LOG_FILE_MODE == 0o640
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    assert json.loads(created.read_bytes())["event"] == "hello"

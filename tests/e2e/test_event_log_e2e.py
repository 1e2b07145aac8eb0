"""The event log of a real server, written to --log-file from start to stop.

The log's rules, without a server, are in tests/unit/ops/test_event_log.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import fastimds
from tests.support.server_process import running_server


def test_log_file_receives_the_events(tmp_path: Path) -> None:
    log_file = tmp_path / "events.jsonl"
    with running_server("--log-file", str(log_file)) as server:
        assert server.port
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    events = [record["event"] for record in records]
    assert events[0] == "config"
    assert "worker_ready" in events and "worker_stopped" in events
    assert records[0]["workers"] == 1 and records[0]["admin_token"] is None
    assert records[0]["build"] == fastimds.build_kind()  # "mypyc" or "python": a benchmark can say which it ran

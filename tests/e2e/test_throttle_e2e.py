"""Per-caller throttling in a real server started with --throttle azure.

The throttle's rules, without sockets, are in tests/unit/http/test_throttle.py.
"""

from __future__ import annotations

from tests.support.server_process import fresh_get, running_server


def test_a_throttled_server_answers_429_end_to_end() -> None:
    with running_server("--throttle", "azure") as server:
        codes = [fresh_get(server.port, "/metadata/versions")[0] for _ in range(12)]
    # All within a second or two of the tick clock: at most 5 per second get through.
    assert codes.count(429) >= 2 and codes.count(200) >= 5

"""End-to-end: a long-poll's timeout_sec never ends the wait early (issue 15, item 9).

A worker's tick refreshes its cached clock just after each wall-clock
second, so just before the next tick that clock is ~1 s stale. A deadline
taken from it ended a `timeout_sec=1` wait after as little as ~0.05 s. Each
run here waits until a chosen moment of the wall-clock second (the server
idle since its last reply), connects, then times from the request's last
byte to the reply's: it must never be under timeout_sec, and may be late by
at most a sweep interval (plus a loaded machine's slack).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.server_process import RawReader, ServerProcess, connect, get_request, running_server

TIMEOUT_SEC = 1
LONG_POLL = (
    "/metadata/instance/compute/location?api-version=2021-02-01&format=text"
    f"&wait_for_change=true&timeout_sec={TIMEOUT_SEC}"
)
# Moments of the wall-clock second to send at. Ticks fire just after each second,
# so 0.9 to 0.99 is when the cached clock is stalest: where the early replies were.
SEND_AT_FRACTIONS = (0.3, 0.6, 0.9, 0.9, 0.95, 0.99)
# A wait may end late by one sweep interval (1 s); the rest is room for a loaded machine.
LATE_BY_AT_MOST_S = 1.0 + 1.5


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server() as running:
        yield running


def sleep_until_fraction(fraction: float) -> None:
    """Sleep until the wall clock's fractional second is `fraction` (the next time it is)."""
    now = time.time()
    time.sleep((fraction - now % 1.0) % 1.0)


@pytest.mark.parametrize("fraction", SEND_AT_FRACTIONS)
def test_timeout_sec_never_answers_early(server: ServerProcess, fraction: float) -> None:
    with connect(server.port, timeout=TIMEOUT_SEC + LATE_BY_AT_MOST_S + 2) as sock:
        sleep_until_fraction(fraction)
        sent = time.monotonic()
        sock.sendall(get_request(LONG_POLL, "Metadata: true"))
        response = RawReader(sock).read_response()
        waited = time.monotonic() - sent
    assert (response.status, response.body) == (200, b"westeurope")
    assert waited >= TIMEOUT_SEC, f"answered after {waited:.3f} s, sent at {fraction} of a second"
    assert waited <= TIMEOUT_SEC + LATE_BY_AT_MOST_S, f"answered after {waited:.3f} s"

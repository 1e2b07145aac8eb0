"""Admin connections without sockets (issue 16, items 5 and 9): the token at the head, caps, deadlines.

Time is pinned: each listener's clock is a list the test moves, and the
sweep is called as the control part's tick would. The real listeners, an
attacker's many connections and the fd limit are in
tests/e2e/test_admin_port_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from fastimds.control.admin_api import AdminApi
from fastimds.control.admin_connection import (
    ADMIN_FEED_SLICE_BYTES,
    ADMIN_IDLE_TIMEOUT_S,
    ADMIN_LINGER_S,
    ADMIN_REQUEST_TIMEOUT_S,
    MAX_ADMIN_LINGERING_REFUSALS,
    AdminListener,
)
from fastimds.control.plane import ControlPlane
from fastimds.ops.telemetry import LAYOUT
from tests.support.fakes import admin_api, admin_connection, new_plane, split_responses
from tests.support.server_process import vm_document

TOKEN = "0123456789abcdef0123456789abcdef"
METRICS = b'# TYPE fastimds_vm_generation gauge\nfastimds_vm_generation{vm="a"} 1\n'
ONE_MIB = 1024 * 1024


@pytest.fixture
def plane(tmp_path: Path) -> ControlPlane:
    return new_plane(tmp_path / "bus")


@pytest.fixture
def api(plane: ControlPlane) -> AdminApi:
    return admin_api(plane, TOKEN, metrics=lambda: METRICS, counters=[0] * LAYOUT.size)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def listener(api: AdminApi, clock: Clock, *, tcp: bool = True, cap: int = 4) -> AdminListener:
    return AdminListener(api, over_tcp=tcp, cap=cap, clock=clock)


def head(method: str, target: str, *headers: str, length: int | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", *headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


BEARER = f"Authorization: Bearer {TOKEN}"


# ---- item 9: /metrics behind the token on TCP ----


def test_metrics_over_tcp_needs_the_token_and_over_unix_does_not(api: AdminApi) -> None:
    for authorization, status in ((None, 401), (b"Bearer wrong", 401), (f"Bearer {TOKEN}".encode(), 200)):
        [response] = split_responses(api.handle("GET", "/metrics", authorization, b"", True))
        assert response.status == status, authorization
        if status == 200:
            assert response.body == METRICS
        else:
            assert b'vm="a"' not in response.body
    [response] = split_responses(api.handle("GET", "/metrics", None, b"", False))
    assert (response.status, response.body) == (200, METRICS)


def test_metrics_through_the_protocol_over_tcp(api: AdminApi) -> None:
    protocol, transport = admin_connection(api, tcp=True)
    protocol.data_received(head("GET", "/metrics"))
    assert [r.status for r in split_responses(transport.output)] == [401]
    protocol, transport = admin_connection(api, tcp=True)
    protocol.data_received(head("GET", "/metrics", BEARER) + head("GET", "/healthz") + head("GET", "/readyz"))
    assert [r.status for r in split_responses(transport.output)] == [200, 200, 200]  # health and readiness stay open
    protocol, transport = admin_connection(api, tcp=False)
    protocol.data_received(head("GET", "/metrics"))
    assert [r.status for r in split_responses(transport.output)] == [200]


# ---- item 5: a head that never ends ----


def test_a_header_line_that_never_ends_gets_431_after_the_head_limit(api: AdminApi) -> None:
    # httptools keeps an unfinished header line itself: the limit must be counted between reads,
    # or an unauthenticated client grows the control's memory (and its parse time) without bound.
    protocol, transport = admin_connection(api, tcp=True)
    protocol.data_received(b"GET /vms HTTP/1.1\r\nX: ")
    for _ in range(64):  # 4 MiB, 64 KiB at a time
        protocol.data_received(b"a" * 65536)
    [response] = split_responses(transport.output)
    assert response.status == 431
    assert protocol.lingering and not protocol.backlog


# ---- item 5: the token before the body ----


@pytest.mark.parametrize("authorization", [(), ("Authorization: Bearer wrong",)])
def test_a_request_without_the_token_is_refused_at_its_head_and_its_body_never_read(
    api: AdminApi, authorization: tuple[str, ...]
) -> None:
    protocol, transport = admin_connection(api, tcp=True)
    protocol.data_received(head("POST", "/vms/a/faults", *authorization, length=ONE_MIB))
    [response] = split_responses(transport.output)
    assert (response.status, response.headers["connection"]) == (401, "close")
    assert response.headers["www-authenticate"] == 'Bearer realm="fastimds"'
    assert transport.eof_written  # our side is shut; the client reads its 401
    # The body that follows is dropped as it arrives: nothing is buffered, nothing more is written.
    for _ in range(ONE_MIB // 65536):
        protocol.data_received(b"x" * 65536)
    assert (protocol.body, protocol.body_size, protocol.backlog) == ([], 0, b"")
    assert len(transport.writes) == 1
    assert api.counters is not None and api.counters[LAYOUT.request_slot("admin", 401)] == 1


def test_a_body_arriving_with_its_head_is_not_buffered_either(api: AdminApi) -> None:
    protocol, transport = admin_connection(api, tcp=True)
    protocol.data_received(head("PUT", "/vms/a", length=ONE_MIB) + b"{" * (ONE_MIB // 2))
    assert [r.status for r in split_responses(transport.output)] == [401]
    assert (protocol.body, protocol.body_size) == ([], 0)


def test_with_the_token_the_body_is_read_and_the_write_applied(api: AdminApi) -> None:
    body = orjson.dumps(vm_document("a", callers=["10.1.0.4"]))
    protocol, transport = admin_connection(api, tcp=True)
    protocol.data_received(head("PUT", "/vms/a", BEARER, length=len(body)) + body)
    assert [r.status for r in split_responses(transport.output)] == [201]
    assert not transport.ended


# ---- item 5: the cap ----


def test_connections_over_the_cap_get_503_and_close(api: AdminApi) -> None:
    clock = Clock()
    tcp = listener(api, clock, cap=4)
    admitted = [admin_connection(api, listener=tcp) for _ in range(4)]
    assert all(not transport.output for _, transport in admitted)
    refused = [admin_connection(api, listener=tcp) for _ in range(MAX_ADMIN_LINGERING_REFUSALS + 3)]
    for _, transport in refused:
        [response] = split_responses(transport.output)
        assert (response.status, response.headers["connection"]) == (503, "close")
        assert response.json() == {"error": "too many admin connections"}
    # The first refusals linger (their write side shut) until the client reads the 503; past
    # MAX_ADMIN_LINGERING_REFUSALS they are closed at once, so refusals hold few descriptors.
    assert [t.eof_written and not t.closed for _, t in refused].count(True) == MAX_ADMIN_LINGERING_REFUSALS
    assert [t.closed for _, t in refused].count(True) == 3
    assert len(tcp.open) == 4
    assert len(tcp.refused) == MAX_ADMIN_LINGERING_REFUSALS
    clock.now = ADMIN_LINGER_S
    tcp.sweep(clock.now)
    assert all(t.closed for _, t in refused)
    for protocol, _ in refused:
        protocol.connection_lost(None)
    assert not tcp.refused
    # A slot freed is a slot taken again.
    admitted[0][0].connection_lost(None)
    _, again = admin_connection(api, listener=tcp)
    assert again.output == b"" and not again.ended


def test_a_refused_connection_never_reaches_the_api(api: AdminApi, plane: ControlPlane) -> None:
    tcp = listener(api, Clock(), cap=0)
    body = orjson.dumps(vm_document("a"))
    protocol, transport = admin_connection(api, listener=tcp)
    protocol.data_received(head("PUT", "/vms/a", BEARER, length=len(body)) + body)
    assert [r.status for r in split_responses(transport.output)] == [503]
    assert plane.control.live_ids() == []


# ---- item 5: deadlines ----


def test_an_idle_connection_is_closed_after_its_deadline(api: AdminApi) -> None:
    clock = Clock()
    tcp = listener(api, clock)
    _, idle = admin_connection(api, listener=tcp)
    protocol, used = admin_connection(api, listener=tcp)
    clock.now = ADMIN_IDLE_TIMEOUT_S - 1
    protocol.data_received(head("GET", "/healthz"))  # a request renews its deadline
    tcp.sweep(clock.now)
    assert not idle.ended and not used.ended
    clock.now = ADMIN_IDLE_TIMEOUT_S
    tcp.sweep(clock.now)
    assert idle.closed and idle.output == b""  # closed without a word: it asked nothing
    assert not used.ended
    clock.now = 2 * ADMIN_IDLE_TIMEOUT_S - 1
    tcp.sweep(clock.now)
    assert used.closed


def test_a_half_sent_request_gets_408_after_its_deadline_then_closes(api: AdminApi) -> None:
    clock = Clock()
    tcp = listener(api, clock)
    protocol, transport = admin_connection(api, listener=tcp)
    clock.now = 1.0
    protocol.data_received(b"PUT /vms/a HTTP/1.1\r\nHost: x\r\n")  # a slow client: the head never ends
    clock.now = 1.0 + ADMIN_REQUEST_TIMEOUT_S - 0.5
    protocol.data_received(b"X-Still: coming\r\n")  # trickling bytes does not move the deadline
    tcp.sweep(clock.now)
    assert transport.output == b""
    clock.now = 1.0 + ADMIN_REQUEST_TIMEOUT_S
    tcp.sweep(clock.now)
    [response] = split_responses(transport.output)
    assert (response.status, response.headers["connection"]) == (408, "close")
    assert transport.eof_written and not transport.closed
    clock.now += ADMIN_LINGER_S
    tcp.sweep(clock.now)
    assert transport.closed


def test_a_refused_token_lingers_then_closes(api: AdminApi) -> None:
    clock = Clock()
    tcp = listener(api, clock)
    protocol, transport = admin_connection(api, listener=tcp)
    protocol.data_received(head("GET", "/vms"))
    assert transport.eof_written and not transport.closed
    assert protocol in tcp.open  # a lingering connection still counts against the cap
    clock.now = ADMIN_LINGER_S
    tcp.sweep(clock.now)
    assert transport.closed


# ---- a client that does not read its replies stops being read ----


def test_a_client_that_does_not_read_stops_being_read(api: AdminApi) -> None:
    protocol, transport = admin_connection(api, tcp=True)
    request = head("GET", "/healthz")
    pipeline = request * (4 * ADMIN_FEED_SLICE_BYTES // len(request))
    protocol.pause_writing()  # the transport's buffer is over its high-water mark
    protocol.data_received(pipeline)
    answered = len(split_responses(transport.output))
    assert answered <= ADMIN_FEED_SLICE_BYTES // len(request) + 1  # one slice at most
    assert not transport.reading and protocol.backlog
    protocol.resume_writing()
    assert len(split_responses(transport.output)) == len(pipeline) // len(request)
    assert transport.reading and not protocol.backlog


def test_the_unix_listener_has_its_own_cap(api: AdminApi) -> None:
    clock = Clock()
    tcp, unix = listener(api, clock, cap=2), listener(api, clock, tcp=False, cap=2)
    for _ in range(5):
        admin_connection(api, listener=tcp)
    protocol, transport = admin_connection(api, listener=unix)
    protocol.data_received(head("GET", "/vms"))
    assert [r.status for r in split_responses(transport.output)] == [200]


def test_a_closed_transport_is_forgotten(api: AdminApi) -> None:
    tcp = listener(api, Clock())
    protocol, _ = admin_connection(api, listener=tcp)
    protocol.connection_lost(None)
    assert not tcp.open

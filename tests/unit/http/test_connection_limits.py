"""Connection limits per worker and per caller, without sockets (fastimds.http.connection)."""

from __future__ import annotations

import json

import pytest

from fastimds.config import ConfigError, Limits
from fastimds.http.connection import MAX_LINGERING_REFUSALS, REFUSED_LINGER_S, HttpProtocol, ServerState
from fastimds.ops.event_log import LOG_BURST
from fastimds.ops.telemetry import LAYOUT
from tests.support.fakes import PINNED_UNIX_TIME, FakeTransport, make_connection, request, split_responses

GET_VERSIONS = request("/metadata/versions")
CALLER_FULL = "This caller has too many connections open"
WORKER_FULL = "Too many connections are open"


def open_from(state: ServerState, peer: str) -> tuple[HttpProtocol, FakeTransport]:
    protocol = HttpProtocol(state)
    transport = FakeTransport(peer)
    protocol.connection_made(transport)
    return protocol, transport


def assert_refused(transport: FakeTransport, message: str) -> None:
    [response] = split_responses(transport.output)
    assert response.status == 503
    assert response.headers["connection"] == "close"
    assert response.headers["retry-after"] == "1"
    assert message in json.loads(response.body)["error"]
    assert transport.eof_written and not transport.closed  # lingers for the client to read it


def test_a_caller_over_its_limit_is_refused_while_others_are_served() -> None:
    _first, _, state = make_connection(Limits(max_connections_per_caller=2), peer="10.0.0.4")
    second, second_transport = open_from(state, "10.0.0.4")
    refused, refused_transport = open_from(state, "10.0.0.4")
    assert_refused(refused_transport, CALLER_FULL)
    refused.data_received(GET_VERSIONS)  # read and discarded: no reply to a refused connection
    assert len(refused_transport.writes) == 1
    other, other_transport = open_from(state, "10.0.0.5")
    other.data_received(GET_VERSIONS)
    assert [r.status for r in split_responses(other_transport.output)] == [200]
    assert state.callers == {"10.0.0.4": {_first, second}, "10.0.0.5": {other}}
    assert state.counters is not None
    assert state.counters[LAYOUT.reject_slot("caller_connection_limit")] == 1
    assert state.counters[LAYOUT.connections_opened] == 3  # a refusal is a reject, not a connection

    # Closing one admits the next; the refused one's close changes no count.
    refused.connection_lost(None)
    second.connection_lost(None)
    assert state.callers == {"10.0.0.4": {_first}, "10.0.0.5": {other}}
    assert state.counters[LAYOUT.connections_closed] == 1
    _again, again_transport = open_from(state, "10.0.0.4")
    assert again_transport.output == b""
    assert second_transport.output == b""


def test_a_full_worker_refuses_every_caller() -> None:
    _protocol, _, state = make_connection(Limits(max_connections_per_worker=3), peer="10.0.0.1")
    open_from(state, "10.0.0.2")
    last, _ = open_from(state, "10.0.0.3")
    _refused, refused_transport = open_from(state, "10.0.0.9")
    assert_refused(refused_transport, WORKER_FULL)
    assert state.counters is not None
    assert state.counters[LAYOUT.reject_slot("connection_limit")] == 1
    assert "10.0.0.9" not in state.callers
    last.connection_lost(None)
    _admitted, admitted_transport = open_from(state, "10.0.0.9")
    assert admitted_transport.output == b""


def test_the_callers_table_holds_only_callers_with_connections_open() -> None:
    protocol, _, state = make_connection(peer="10.0.0.4")
    others = [open_from(state, f"10.0.1.{n}")[0] for n in range(50)]
    for connection in [protocol, *others]:
        connection.connection_lost(None)
        connection.connection_lost(None)  # a second report changes nothing
    assert state.callers == {}
    assert state.connections == set()


def test_a_refusal_lingers_until_the_sweep_then_is_aborted() -> None:
    _protocol, _, state = make_connection(Limits(max_connections_per_caller=1))
    refused, transport = open_from(state, "127.0.0.1")
    assert refused in state.refused
    state.tick(REFUSED_LINGER_S / 2, PINNED_UNIX_TIME + 1)
    assert not transport.closed
    state.tick(REFUSED_LINGER_S, PINNED_UNIX_TIME + 2)
    assert transport.aborted
    assert state.refused == set()


def test_refusals_past_the_lingering_cap_close_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Each state has its own event log (state.event_log): a full bucket, whatever ran before.
    _protocol, _, state = make_connection(Limits(max_connections_per_caller=1))
    lingering = [open_from(state, "127.0.0.1")[1] for _ in range(MAX_LINGERING_REFUSALS)]
    assert not any(transport.closed for transport in lingering)
    _over, over_transport = open_from(state, "127.0.0.1")
    assert over_transport.closed and not over_transport.eof_written
    assert [r.status for r in split_responses(over_transport.output)] == [503]  # it still gets its answer
    assert len(state.refused) == MAX_LINGERING_REFUSALS
    assert state.counters is not None
    assert state.counters[LAYOUT.reject_slot("caller_connection_limit")] == MAX_LINGERING_REFUSALS + 1
    # Logged under the event log's rate limit, with who was refused and why.
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    refusals = [r for r in records if r["event"] == "connection_refused"]
    assert len(refusals) == LOG_BURST  # the clock is pinned: no refill
    assert (refusals[0]["caller"], refusals[0]["reason"], refusals[0]["limit"]) == (
        "127.0.0.1",
        "caller_connection_limit",
        1,
    )


@pytest.mark.parametrize("field", ["max_connections_per_worker", "max_connections_per_caller"])
def test_connection_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Limits(**{field: 0})

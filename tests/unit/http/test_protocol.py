"""The protocol without sockets: framing, pipelining, limits, flow control, deadlines."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from fastimds.bus.approvals import APPROVAL_BATCH_S, BusApprovals, take_approvals
from fastimds.config import Limits
from fastimds.http.connection import CLOSE_LINGER_S, FEED_SLICE_BYTES, HttpProtocol
from fastimds.http.phases import Hold, Phase
from fastimds.imds import events
from fastimds.imds.datafile import parse_vm
from fastimds.imds.render import ERRORS
from fastimds.imds.store import SnapshotStore
from fastimds.ops.event_log import EventLog
from tests.support.fakes import PINNED_DATE, PINNED_UNIX_TIME, make_connection, request, sample_vm, split_responses

GET_INSTANCE = request()
GET_VMID_TEXT = request("/metadata/instance/compute/vmId?api-version=2017-04-02&format=text")
GET_VERSIONS = request("/metadata/versions")
GET_NO_HEADER = request(headers=())
HEAD_INSTANCE = request(method="HEAD")
GET_CLOSE = request("/metadata/versions", headers=(("Metadata", "true"), ("Connection", "close")))
GARBAGE = b"\x00\x01\x02 not http at all\r\n\r\n"

VMID = sample_vm().instance["compute"]["vmId"].encode()

# Request sequences, each with the statuses and HEAD flags it must produce.
SEQUENCES: dict[str, tuple[bytes, list[int], tuple[bool, ...]]] = {
    "single": (GET_INSTANCE, [200], ()),
    "keep_alive_mix": (GET_INSTANCE + GET_NO_HEADER + GET_VMID_TEXT, [200, 400, 200], ()),
    "pipelined_16": (GET_VMID_TEXT * 16, [200] * 16, ()),
    "head_then_get": (HEAD_INSTANCE + GET_VERSIONS, [200, 200], (True, False)),
    "close_stops_pipeline": (GET_CLOSE + GET_INSTANCE, [200], ()),
    "garbage_after_request": (GET_VERSIONS + GARBAGE, [200, 400], ()),
}


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


SPLITS = {
    "whole": lambda data: [data],
    "byte_at_a_time": lambda data: chunked(data, 1),
    "chunks_of_3": lambda data: chunked(data, 3),
    "chunks_of_7": lambda data: chunked(data, 7),
    "chunks_of_64": lambda data: chunked(data, 64),
}


def feed(protocol: HttpProtocol, pieces: list[bytes]) -> None:
    for piece in pieces:
        protocol.data_received(piece)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("sequence", SEQUENCES)
def test_every_split_of_the_same_bytes_gives_the_same_responses(sequence: str, split: str) -> None:
    data, statuses, head_only = SEQUENCES[sequence]
    protocol, transport, _ = make_connection()
    feed(protocol, SPLITS[split](data))
    responses = split_responses(transport.output, head_only)
    assert [r.status for r in responses] == statuses

    reference, reference_transport, _ = make_connection()
    reference.data_received(data)
    assert transport.output == reference_transport.output


def test_every_two_piece_split_of_a_pipelined_pair() -> None:
    data = GET_VMID_TEXT + GET_INSTANCE
    expected = None
    for cut in range(len(data) + 1):
        protocol, transport, _ = make_connection()
        feed(protocol, [data[:cut], data[cut:]])
        if expected is None:
            expected = transport.output
        assert transport.output == expected, f"split at {cut}"
    assert expected is not None
    assert [r.status for r in split_responses(expected)] == [200, 200]


def test_pipelined_batch_is_answered_in_order_with_one_write() -> None:
    protocol, transport, _ = make_connection()
    protocol.data_received(GET_VMID_TEXT + GET_VERSIONS + GET_NO_HEADER + GET_VMID_TEXT)
    assert len(transport.writes) == 1
    responses = split_responses(transport.writes[0])
    assert [r.status for r in responses] == [200, 200, 400, 200]
    assert responses[0].body == VMID
    assert responses[1].json()["apiVersions"][0] == "2017-03-01"
    assert not transport.ended


def test_response_headers() -> None:
    protocol, transport, _ = make_connection()
    protocol.data_received(GET_INSTANCE + GET_VMID_TEXT)
    json_reply, text_reply = split_responses(transport.output)
    assert json_reply.headers["content-type"] == "application/json; charset=utf-8"
    assert text_reply.headers["content-type"] == "text/plain; charset=utf-8"
    for reply in (json_reply, text_reply):
        assert int(reply.headers["content-length"]) == len(reply.body)
        assert reply.headers["date"] == PINNED_DATE.decode()
        assert "IMDS/" in reply.headers["server"]
        assert "connection" not in reply.headers  # HTTP/1.1 keep-alive is implicit


def test_head_sends_get_headers_without_body() -> None:
    protocol, transport, _ = make_connection()
    protocol.data_received(HEAD_INSTANCE)
    raw = transport.output
    assert raw.endswith(b"\r\n\r\n")
    (head,) = split_responses(raw, (True,))
    get_protocol, get_transport, _ = make_connection()
    get_protocol.data_received(GET_INSTANCE)
    (get,) = split_responses(get_transport.output)
    assert head.headers == get.headers
    assert head.body == b""


def test_connection_close_closes_after_the_reply_and_ignores_the_rest() -> None:
    protocol, transport, _ = make_connection()
    protocol.data_received(GET_CLOSE + GET_INSTANCE)
    (response,) = split_responses(transport.output)
    assert response.headers["connection"] == "close"
    assert transport.ended
    protocol.data_received(GET_INSTANCE)  # after close: ignored, no write-after-close
    assert len(transport.writes) == 1


def test_http10_closes_unless_keep_alive_was_asked() -> None:
    protocol, transport, _ = make_connection()
    protocol.data_received(request("/metadata/versions", version="1.0"))
    assert split_responses(transport.output)[0].headers["connection"] == "close"
    assert transport.ended

    protocol, transport, _ = make_connection()
    keep = (("Metadata", "true"), ("Connection", "keep-alive"))
    protocol.data_received(request("/metadata/versions", version="1.0", headers=keep))
    assert split_responses(transport.output)[0].headers["connection"] == "keep-alive"
    assert not transport.ended


@pytest.mark.parametrize(
    "data",
    [
        GARBAGE,
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /metadata/versions HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"GET /metadata/versions HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"\r\n\r\n\r\n\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    ],
)
def test_unparseable_bytes_get_400_and_close(data: bytes) -> None:
    protocol, transport, _ = make_connection()
    protocol.data_received(data)
    (response,) = split_responses(transport.output)
    assert response.status == 400
    assert response.json() == {"error": "Bad request. Malformed HTTP request"}
    assert transport.ended


def test_url_over_the_limit_gets_414_and_close() -> None:
    limits = Limits(max_url_bytes=100)
    protocol, transport, _ = make_connection(limits)
    protocol.data_received(request("/metadata/instance?api-version=2021-02-01&pad=" + "x" * 100))
    (response,) = split_responses(transport.output)
    assert response.status == 414
    assert transport.ended
    # Exactly at the limit is fine.
    target = "/metadata/versions?pad="
    protocol, transport, _ = make_connection(limits)
    protocol.data_received(request(target + "x" * (100 - len(target))))
    assert split_responses(transport.output)[0].status == 200


def test_url_split_across_reads_is_reassembled_and_limited() -> None:
    protocol, transport, _ = make_connection(Limits(max_url_bytes=64))
    data = request("/metadata/versions?" + "a" * 80)
    feed(protocol, chunked(data, 5))
    assert split_responses(transport.output)[0].status == 414


def test_too_many_headers_gets_431() -> None:
    protocol, transport, _ = make_connection(Limits(max_header_count=5))
    headers = (("Metadata", "true"), *((f"X-Extra-{i}", "1") for i in range(5)))
    protocol.data_received(request(headers=headers))
    (response,) = split_responses(transport.output)
    assert response.status == 431
    assert transport.ended


def test_header_bytes_over_the_limit_get_431() -> None:
    protocol, transport, _ = make_connection(Limits(max_request_head_bytes=512))
    protocol.data_received(request(headers=(("Metadata", "true"), ("X-Big", "v" * 600))))
    assert split_responses(transport.output)[0].status == 431


def test_a_head_that_never_ends_is_capped_between_reads() -> None:
    # httptools buffers an unfinished header internally; the cap must hold
    # even though no on_header callback ever fires.
    limits = Limits(max_request_head_bytes=1024, max_url_bytes=1024)
    protocol, transport, _ = make_connection(limits)
    protocol.data_received(b"GET /metadata/versions HTTP/1.1\r\nX-Endless: ")
    for _ in range(100):
        if transport.ended:
            break
        protocol.data_received(b"v" * 100)
    assert transport.ended
    assert split_responses(transport.output)[0].status == 431


def test_pipelined_requests_are_not_charged_to_a_head_that_spans_reads() -> None:
    # Many complete requests in one read, ending mid-head, then the rest:
    # none of the earlier requests' bytes count against the unfinished head.
    limits = Limits(max_request_head_bytes=256, max_url_bytes=256)
    protocol, transport, _ = make_connection(limits)
    batch = GET_VMID_TEXT * 40
    protocol.data_received(batch + GET_VMID_TEXT[:30])
    protocol.data_received(GET_VMID_TEXT[30:] + GET_VMID_TEXT * 40)
    statuses = [r.status for r in split_responses(transport.output)]
    assert statuses == [200] * 81


def test_body_over_the_limit_gets_413_and_close() -> None:
    protocol, transport, _ = make_connection(Limits(max_body_bytes=100))
    protocol.data_received(request(method="POST", body=b"x" * 101))
    (response,) = split_responses(transport.output)
    assert response.status == 413
    assert transport.ended


def test_body_within_the_limit_is_read_and_the_method_refused() -> None:
    protocol, transport, _ = make_connection(Limits(max_body_bytes=100))
    protocol.data_received(request(method="POST", body=b"x" * 100) + GET_VMID_TEXT)
    post, get = split_responses(transport.output)
    assert post.status == 405
    assert post.headers["allow"] == "GET, HEAD"
    assert get.body == VMID


def test_paused_transport_stops_feeding_and_resumes_in_order() -> None:
    protocol, transport, _ = make_connection()
    count = 3 * FEED_SLICE_BYTES // len(GET_VMID_TEXT) + 5

    def pause_on_first_write(data: bytes | bytearray | memoryview) -> None:
        transport.writes.append(bytes(data))
        if len(transport.writes) == 1:
            protocol.pause_writing()

    protocol.write = pause_on_first_write
    protocol.data_received(GET_VMID_TEXT * count)
    assert not transport.reading
    assert len(transport.writes) == 1  # one slice answered, the rest held
    answered = len(split_responses(transport.output))
    assert 0 < answered < count

    protocol.resume_writing()
    assert transport.reading
    responses = split_responses(transport.output)
    assert len(responses) == count
    assert all(r.body == VMID for r in responses)


def test_idle_keep_alive_connection_is_closed_by_the_sweep() -> None:
    protocol, transport, state = make_connection(Limits(keep_alive_timeout_s=15))
    protocol.data_received(GET_VERSIONS)
    state.tick(14.0, PINNED_UNIX_TIME + 14)
    assert not transport.ended
    state.tick(15.5, PINNED_UNIX_TIME + 15.5)
    assert transport.ended
    assert len(split_responses(transport.output)) == 1  # closed without a reply


def test_unfinished_request_gets_408_at_its_deadline_even_if_it_trickles() -> None:
    protocol, transport, state = make_connection(Limits(request_timeout_s=10))
    protocol.data_received(b"GET /metadata/versions HTTP/1.1\r\n")
    for second in range(1, 10):
        state.tick(float(second), PINNED_UNIX_TIME + second)
        protocol.data_received(b"X")  # slow-loris: a byte a second
    assert not transport.ended
    state.tick(10.5, PINNED_UNIX_TIME + 10.5)
    (response,) = split_responses(transport.output)
    assert response.status == 408
    assert transport.ended


def test_client_that_stops_reading_is_aborted_after_the_stall_timeout() -> None:
    protocol, transport, state = make_connection(Limits(send_stall_timeout_s=30))
    protocol.pause_writing()
    state.tick(29.0, PINNED_UNIX_TIME + 29)
    assert not transport.aborted
    state.tick(31.0, PINNED_UNIX_TIME + 31)
    assert transport.aborted


def test_date_comes_from_the_tick() -> None:
    protocol, transport, state = make_connection()
    protocol.data_received(GET_VERSIONS)
    state.tick(1.0, PINNED_UNIX_TIME + 86400)
    protocol.data_received(GET_VERSIONS)
    first, second = split_responses(transport.output)
    assert first.headers["date"] == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert second.headers["date"] == "Wed, 15 Nov 2023 22:13:20 GMT"


def test_shutdown_closes_idle_connections_and_lets_a_started_request_finish() -> None:
    idle, idle_transport, state = make_connection()
    busy = HttpProtocol(state)
    from tests.support.fakes import FakeTransport

    busy_transport = FakeTransport()
    busy.connection_made(busy_transport)
    busy.data_received(GET_VERSIONS[:20])

    state.draining = True
    idle.shutdown()
    busy.shutdown()
    # The idle one is half-closed (a FIN), not closed: a request that crossed the
    # FIN is read and dropped, so the client sees an end of stream, not a reset.
    assert idle_transport.eof_written
    assert not idle_transport.closed
    idle.data_received(GET_VERSIONS)
    assert idle_transport.output == b""
    idle.finish_shutdown()
    assert idle_transport.closed
    assert not busy_transport.ended
    assert not busy_transport.eof_written
    busy.finish_shutdown()  # a started request keeps the grace to finish
    assert not busy_transport.ended
    busy.data_received(GET_VERSIONS[20:])
    (response,) = split_responses(busy_transport.output)
    assert response.status == 200
    assert response.headers["connection"] == "close"
    assert busy_transport.ended


def test_published_snapshot_is_seen_by_the_next_request_on_the_same_connection() -> None:
    store = SnapshotStore(sample_vm())
    protocol, transport, _ = make_connection(store=store)
    target = "/metadata/instance/compute/location?api-version=2021-02-01&format=text"
    protocol.data_received(request(target))
    changed = sample_vm().instance | {"compute": sample_vm().instance["compute"] | {"location": "eastus"}}
    store.publish(parse_vm(__import__("orjson").dumps({"instance": changed}), "test"))
    protocol.data_received(request(target))
    assert [r.body for r in split_responses(transport.output)] == [b"westeurope", b"eastus"]


@pytest.mark.parametrize(
    "data",
    [
        request(headers=(("Metadata", "true"), ("Connection", "Upgrade"), ("Upgrade", "websocket"))) + b"\x81\x05hi",
        request(headers=(("Metadata", "true"), ("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"))),
        request("127.0.0.1:443", method="CONNECT"),
    ],
)
def test_upgrade_requests_are_answered_and_the_close_announced(data: bytes) -> None:
    protocol, transport, _ = make_connection()
    protocol.data_received(data)
    (response,) = split_responses(transport.output)
    assert response.status != 101
    assert response.headers["connection"] == "close"
    assert transport.ended


def test_expect_100_continue_gets_an_interim_response() -> None:
    protocol, transport, _ = make_connection(Limits(max_body_bytes=100))
    head = request(method="POST", headers=(("Metadata", "true"), ("Expect", "100-continue"), ("Content-Length", "5")))
    protocol.data_received(head)
    assert transport.output == b"HTTP/1.1 100 Continue\r\n\r\n"
    protocol.data_received(b"hello")
    (final,) = split_responses(transport.output[len(b"HTTP/1.1 100 Continue\r\n\r\n") :])
    assert final.status == 405


def test_no_100_continue_follows_a_reply_that_closed() -> None:
    # Regression (found by tests/fuzz/test_fuzz_protocol.py): while draining, the parser reads on
    # past a reply that closes, and an Expect header behind it sent a 100 Continue after it.
    protocol, transport, state = make_connection()
    state.draining = True
    expect = request(method="POST", headers=(("Metadata", "true"), ("Expect", "100-continue")), body=b"hello")
    protocol.data_received(GET_VERSIONS + expect)
    (response,) = split_responses(transport.output)
    assert response.headers["connection"] == "close"
    assert transport.ended


def test_connection_lost_unregisters_and_ignores_late_data() -> None:
    protocol, transport, state = make_connection()
    assert protocol in state.connections
    protocol.connection_lost(None)
    assert protocol not in state.connections
    protocol.data_received(GET_VERSIONS)
    assert transport.writes == []


def test_errors_are_all_json() -> None:
    import orjson

    for name, reply in ERRORS.items():
        assert b"application/json; charset=utf-8" in reply.head, name
        assert "error" in orjson.loads(reply.body), name


# ---- closing: lingering when the server decides, at once when the client asks ----


def test_a_close_the_client_asked_for_is_immediate() -> None:
    protocol, transport, _ = make_connection()
    protocol.data_received(request("/metadata/versions", headers=(("Metadata", "true"), ("Connection", "close"))))
    assert split_responses(transport.output)[0].headers["connection"] == "close"
    assert transport.closed and not transport.eof_written


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x01 not http\r\n\r\n",  # a parse error
        request("/" + "a" * 5000),  # a limit
        request("/metadata/versions", headers=(("Metadata", "true"), ("Upgrade", "websocket"))),  # an upgrade
    ],
    ids=["parse_error", "uri_too_long", "upgrade"],
)
def test_a_close_the_server_decides_lingers_then_ends_at_the_tick(data: bytes) -> None:
    protocol, transport, state = make_connection()
    protocol.data_received(data)
    assert split_responses(transport.output)[0].headers["connection"] == "close"
    # A FIN, not a close: bytes the client sent meanwhile are read and dropped, so its
    # kernel never answers them with a reset that could destroy our reply.
    assert transport.eof_written and not transport.closed
    protocol.data_received(GET_VERSIONS + b"more garbage")
    assert len(split_responses(transport.output)) == 1
    state.tick(CLOSE_LINGER_S - 0.5, PINNED_UNIX_TIME)
    assert not transport.closed
    state.tick(CLOSE_LINGER_S, PINNED_UNIX_TIME)
    assert transport.closed


def test_the_idle_timeout_and_the_request_timeout_linger_too() -> None:
    limits = Limits(keep_alive_timeout_s=5, request_timeout_s=2)
    _idle, idle_transport, state = make_connection(limits=limits)
    slow = HttpProtocol(state)
    from tests.support.fakes import FakeTransport

    slow_transport = FakeTransport()
    slow.connection_made(slow_transport)
    slow.data_received(GET_VERSIONS[:10])
    state.tick(2.0, PINNED_UNIX_TIME)
    assert split_responses(slow_transport.output)[0].status == 408
    assert slow_transport.eof_written and not slow_transport.closed
    state.tick(5.0, PINNED_UNIX_TIME)
    assert idle_transport.eof_written and not idle_transport.closed  # a request may be on its way
    assert slow_transport.closed  # its linger is over
    state.tick(5.0 + CLOSE_LINGER_S, PINNED_UNIX_TIME)
    assert idle_transport.closed


def test_many_deadlines_at_once_are_handled_in_slices_with_io_between() -> None:
    import asyncio

    from fastimds.http.connection import EXPIRE_SLICE
    from tests.support.fakes import FakeTransport

    limits = Limits(keep_alive_timeout_s=5)
    _first, first_transport, state = make_connection(limits=limits)
    transports = [first_transport]
    for _ in range(EXPIRE_SLICE * 2 + 50 - 1):
        connection = HttpProtocol(state)
        transports.append(FakeTransport())
        connection.connection_made(transports[-1])

    def ended() -> int:
        return sum(transport.ended for transport in transports)

    async def scenario() -> list[int]:
        seen = []
        state.tick(5.0, PINNED_UNIX_TIME)
        seen.append(ended())  # one slice in the tick itself
        for _ in range(3):
            await asyncio.sleep(0)  # each loop iteration (pending I/O first) takes the next slice
            seen.append(ended())
        return seen

    assert asyncio.run(scenario()) == [EXPIRE_SLICE, 2 * EXPIRE_SLICE, 2 * EXPIRE_SLICE + 50, 2 * EXPIRE_SLICE + 50]
    # Without a running loop (a direct call), every due deadline is handled at once.
    _other, other_transport, other_state = make_connection(limits=limits)
    more = [FakeTransport() for _ in range(EXPIRE_SLICE + 1)]
    for transport in more:
        HttpProtocol(other_state).connection_made(transport)
    other_state.tick(5.0, PINNED_UNIX_TIME)
    assert other_transport.ended and all(transport.ended for transport in more)


def test_a_close_that_cannot_drain_is_aborted_after_the_send_stall_timeout() -> None:
    # Regression: a connection closed after its last reply (here one the client asked to close)
    # whose client stopped reading kept its buffered replies and its place for ever.
    protocol, transport, state = make_connection(limits=Limits(send_stall_timeout_s=3))
    protocol.data_received(request("/metadata/versions", headers=(("Metadata", "true"), ("Connection", "close"))))
    assert transport.closed and not transport.aborted
    state.tick(2.0, PINNED_UNIX_TIME)
    assert not transport.aborted  # still draining, within the stall timeout
    state.tick(3.0, PINNED_UNIX_TIME)
    assert transport.aborted  # in a real server connection_lost would have removed it had it drained


def test_a_lingering_close_reads_and_drops_even_if_reading_was_paused() -> None:
    protocol, transport, _ = make_connection()
    transport.reading = False  # paused, e.g. by a held long-poll or a full socket
    protocol.data_received(b"\x00 garbage\r\n\r\n")
    assert transport.eof_written and transport.reading  # the client's FIN and leftovers get read


def test_an_upgrade_answered_twice_lingers_both_times() -> None:
    # Regression: the request memo answered the second one and closed at once.
    upgrade = request("/metadata/versions", headers=(("Metadata", "true"), ("Upgrade", "websocket")))
    _, _, state = make_connection()
    results = []
    for _ in range(2):
        from tests.support.fakes import FakeTransport

        protocol, transport = HttpProtocol(state), FakeTransport()
        protocol.connection_made(transport)
        protocol.data_received(upgrade)
        results.append((transport.eof_written, transport.closed))
    assert results == [(True, False), (True, False)]


# ---- the connection's state (fastimds.http.phases) ----


def test_the_phase_follows_a_request_through_its_reads() -> None:
    protocol, transport, _ = make_connection()
    assert (protocol.phase, protocol.hold) == (Phase.IDLE, None)
    post = request("/metadata/versions", method="POST", body=b"12345")
    head, body = post[: post.index(b"\r\n\r\n") + 4], post[post.index(b"\r\n\r\n") + 4 :]
    protocol.data_received(head[:20])  # began in this read: charged from the next one on
    assert protocol.phase is Phase.IN_HEAD and protocol.head_pending == 0
    protocol.data_received(head[20:] + body[:2])  # the head is complete, the body is not
    assert protocol.phase is Phase.IN_BODY
    protocol.data_received(body[2:])
    assert protocol.phase is Phase.IDLE
    assert [r.status for r in split_responses(transport.output)] == [405]
    protocol.data_received(GET_VERSIONS)
    assert protocol.phase is Phase.IDLE and not transport.ended


def test_a_close_the_client_asks_for_is_closing_and_one_the_server_decides_lingers() -> None:
    asked, asked_transport, _ = make_connection()
    asked.data_received(GET_CLOSE)
    assert asked.phase is Phase.CLOSING and asked_transport.closed and not asked_transport.eof_written
    asked.data_received(GET_VERSIONS)  # read and dropped
    assert len(split_responses(asked_transport.output)) == 1

    decided, decided_transport, _ = make_connection()
    decided.data_received(GARBAGE)
    assert decided.phase is Phase.LINGERING and decided_transport.eof_written and not decided_transport.closed
    decided.connection_lost(None)
    assert decided.phase is Phase.CLOSED


def test_a_long_poll_holds_and_its_release_lets_go() -> None:
    store = SnapshotStore(sample_vm())
    protocol, transport, _ = make_connection(store=store)
    protocol.data_received(request("/metadata/instance?api-version=2021-02-01&wait_for_change=true"))
    assert (protocol.phase, protocol.hold) == (Phase.HELD, Hold.LONG_POLL) and protocol in store.watchers
    store.publish(dataclasses.replace(sample_vm(), instance={**sample_vm().instance, "compute": {"name": "other"}}))
    assert (protocol.phase, protocol.hold, protocol.wait) == (Phase.IDLE, None, None)
    assert protocol not in store.watchers and [r.status for r in split_responses(transport.output)] == [200]


# ---- effects leave the parser callback ----


class RecordingSink:
    def __init__(self, takes: bool = True) -> None:
        self.approved: list[tuple[str, frozenset[str]]] = []
        self.takes = takes

    def approve(self, vm_id: str, event_ids: frozenset[str]) -> bool:
        self.approved.append((vm_id, event_ids))
        return self.takes


APPROVE_E1 = request(
    "/metadata/scheduledevents?api-version=2020-07-01", method="POST", body=b'{"StartRequests":[{"EventId":"E1"}]}'
)


def _store_with_e1() -> SnapshotStore:
    event = events.make_event({"EventType": "Reboot", "EventId": "E1"}, PINNED_UNIX_TIME, ["vm-name"])
    return SnapshotStore(dataclasses.replace(sample_vm(), scheduled=events.add(None, event)))


def test_an_approval_names_its_vm_and_its_file_and_publish_come_after_data_received(tmp_path: Path) -> None:
    written: list[int] = []
    sink = BusApprovals(tmp_path, durable=False, written=lambda: written.append(1))
    folder = tmp_path / "approvals"

    async def scenario() -> None:
        protocol, transport, _ = make_connection(store=_store_with_e1(), approvals=sink)
        protocol.data_received(APPROVE_E1)
        assert [r.status for r in split_responses(transport.output)] == [200]  # answered at once...
        assert sink.pending == {protocol.vm.vm_id: {"E1"}}  # ...noted with the approving VM...
        assert (list(folder.iterdir()), written) == ([], [])  # ...written and applied only after the callback
        await asyncio.sleep(APPROVAL_BATCH_S * 4)
        for _ in range(100):
            if written:
                break
            await asyncio.sleep(0.01)
        assert written == [1]

    asyncio.run(scenario())
    assert take_approvals(folder, EventLog()) == {"default": frozenset({"E1"})}


def test_an_approval_the_sink_refuses_is_azures_429() -> None:
    sink = RecordingSink(takes=False)
    protocol, transport, _ = make_connection(store=_store_with_e1(), approvals=sink)
    protocol.data_received(APPROVE_E1)
    [reply] = split_responses(transport.output)
    assert reply.status == 429 and reply.headers["retry-after"] == "1"
    assert sink.approved == [(protocol.vm.vm_id, frozenset({"E1"}))]

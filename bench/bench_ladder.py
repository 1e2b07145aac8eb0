"""The micro ladder: one layer per rung, so a regression points at its layer.

Run with `make bench` (pytest-benchmark; results saved under .benchmarks/ and
comparable with `pytest-benchmark compare`). Under `make test` each rung runs
once as a smoke test (benchmarks are disabled there).

Rungs, cheapest first:
  1. constant write     - append a finished Reply to the out list and flush it
  2. snapshot lookup    - resolve() of a repeated target (memo hit)
  3. resolve, cold      - resolve() that walks the tree (memo miss)
  4. parse + resolve    - one request through the protocol and httptools
                          (request memo emptied each time), fake transport
  5. request memo       - the same request, answered from the request memo
                          (a text leaf; the whole document)
  6. pipelined x16      - 16 requests in one read, one write (parsed; memo)
  7. build + publish    - a new snapshot of the sample VM, swapped in (views
                          are rendered on first use, so this renders nothing)
     + first requests   - the same, then the whole document and a text leaf
                          asked once each: the rendering a build defers
  8. connection life    - accept, one `Connection: close` request answered
                          from the memo, close: what wrk's connection-close
                          scenario costs in Python, per connection
"""

from __future__ import annotations

from typing import Any

from fastimds.http.connection import HttpProtocol
from fastimds.http.memo import known_requests
from fastimds.imds.render import VERSIONS_REPLY
from fastimds.imds.routing import resolve
from fastimds.imds.snapshot import build_snapshot
from fastimds.imds.store import SnapshotStore
from tests.support.fakes import FakeTransport, make_connection, request, sample_vm

TEXT_LEAF = "/metadata/instance/compute/vmId?api-version=2017-04-02&format=text"
WHOLE_DOCUMENT = "/metadata/instance?api-version=2021-02-01"


def _discarding_connection() -> Any:
    protocol, _transport, _state = make_connection()
    protocol.write = lambda _data: None  # measure the server, not the recorder
    return protocol


def test_rung1_constant_write(benchmark: Any) -> None:
    protocol = _discarding_connection()

    def write_constant() -> None:
        protocol._respond(VERSIONS_REPLY, head_only=False, keep_alive=True)
        protocol._flush()

    benchmark(write_constant)


def test_rung2_snapshot_lookup(benchmark: Any) -> None:
    snapshot = build_snapshot(sample_vm(), generation=1)
    target = TEXT_LEAF.encode()
    resolve(snapshot, b"GET", target, True, False)
    reply = benchmark(resolve, snapshot, b"GET", target, True, False)
    assert reply.status == 200


def test_rung3_resolve_cold(benchmark: Any) -> None:
    snapshot = build_snapshot(sample_vm(), generation=1)
    target = b"/metadata/instance/network/interface/1/ipv4/ipAddress/0/privateIpAddress"
    target += b"?api-version=2021-02-01&format=text"

    def cold() -> Any:
        snapshot.url_replies.clear()
        return resolve(snapshot, b"GET", target, True, False)

    assert benchmark(cold).body == b"10.0.1.4"


def _parsed_every_time(protocol: Any, data: bytes) -> Any:
    snapshot = protocol.vm.current

    def feed() -> None:
        snapshot.http_cache = None  # forget the request memo: parse every time
        protocol.data_received(data)

    return feed


def test_rung4_parse_and_resolve_text_leaf(benchmark: Any) -> None:
    protocol = _discarding_connection()
    benchmark(_parsed_every_time(protocol, request(TEXT_LEAF)))


def test_rung4_parse_and_resolve_whole_document(benchmark: Any) -> None:
    protocol = _discarding_connection()
    benchmark(_parsed_every_time(protocol, request(WHOLE_DOCUMENT)))


def test_rung5_request_memo_text_leaf(benchmark: Any) -> None:
    protocol = _discarding_connection()
    data = request(TEXT_LEAF)
    protocol.data_received(data)
    benchmark(protocol.data_received, data)
    assert known_requests(protocol.vm.current)


def test_rung5_request_memo_whole_document(benchmark: Any) -> None:
    protocol = _discarding_connection()
    data = request(WHOLE_DOCUMENT)
    protocol.data_received(data)
    benchmark(protocol.data_received, data)
    assert known_requests(protocol.vm.current)


def test_rung6_pipelined_16_parsed(benchmark: Any) -> None:
    protocol = _discarding_connection()
    benchmark(_parsed_every_time(protocol, request(TEXT_LEAF) * 16))


def test_rung6_pipelined_16_memo(benchmark: Any) -> None:
    protocol = _discarding_connection()
    data = request(TEXT_LEAF) * 16
    protocol.data_received(data)
    benchmark(protocol.data_received, data)


def test_rung7_build_and_publish(benchmark: Any) -> None:
    store = SnapshotStore(sample_vm())
    vm = sample_vm()
    snapshot = benchmark(store.publish, vm)
    assert store.current is snapshot


def test_rung7_build_publish_and_first_requests(benchmark: Any) -> None:
    store = SnapshotStore(sample_vm())
    vm = sample_vm()
    targets = [WHOLE_DOCUMENT.encode(), TEXT_LEAF.encode()]

    def publish_and_ask() -> list[Any]:
        snapshot = store.publish(vm)
        return [resolve(snapshot, b"GET", target, True, False) for target in targets]

    replies = benchmark(publish_and_ask)
    assert [reply.status for reply in replies] == [200, 200]


def test_rung8_connection_life_with_close(benchmark: Any) -> None:
    _first, _transport, state = make_connection()
    data = request(TEXT_LEAF, headers=(("Metadata", "true"), ("Connection", "close")))

    def life() -> FakeTransport:
        protocol = HttpProtocol(state)
        transport = FakeTransport()
        protocol.connection_made(transport)
        protocol.data_received(data)
        protocol.connection_lost(None)
        return transport

    life()  # the memo learns the request
    transport = benchmark(life)
    assert transport.closed and transport.writes[0].startswith(b"HTTP/1.1 200 OK")

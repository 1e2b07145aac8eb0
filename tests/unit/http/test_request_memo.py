"""The request memo: known request heads are answered without parsing.

The memo may only change speed, never bytes: every test here compares
against the parser's own answer, or proves what must never be remembered.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from fastimds.http.connection import HttpProtocol
from fastimds.http.memo import MAX_REQUEST_MEMO_ENTRIES, MAX_REQUEST_MEMO_KEY_BYTES
from fastimds.imds.faults import make_fault
from fastimds.imds.store import SnapshotStore
from tests.support.fakes import FakeTransport, make_connection, remembered, request, sample_vm, split_responses

LEAF = request("/metadata/instance/compute/vmId?api-version=2021-02-01&format=text")
DOCUMENT = request("/metadata/instance?api-version=2021-02-01")
HEAD = request("/metadata/instance?api-version=2021-02-01", method="HEAD")
NO_HEADER = request(headers=())
HTTP10 = request("/metadata/versions", version="1.0")
CLOSE = request("/metadata/versions", headers=(("Metadata", "true"), ("Connection", "close")))

READS = {
    "leaf": LEAF,
    "document": DOCUMENT,
    "head": HEAD,
    "error": NO_HEADER,
    "http10": HTTP10,
    "close": CLOSE,
    "pipelined": LEAF + DOCUMENT + NO_HEADER + HEAD + LEAF,
    "pipelined_then_close": LEAF + CLOSE,
}


class ExplodingParser:
    """Stands in for httptools after warm-up: any parse is a test failure."""

    def feed_data(self, data: bytes) -> None:
        raise AssertionError(f"parsed {data[:60]!r} although it was remembered")

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"parser.{name} used although the request was remembered")


def answers(protocol: HttpProtocol, transport: FakeTransport, data: bytes) -> bytes:
    before = len(transport.writes)
    protocol.data_received(data)
    return b"".join(transport.writes[before:])


@pytest.mark.parametrize("name", READS)
def test_remembered_answers_are_byte_identical_and_skip_the_parser(name: str) -> None:
    data = READS[name]
    store = SnapshotStore(sample_vm())
    first, first_transport, _ = make_connection(store=store)
    parsed = answers(first, first_transport, data)
    assert remembered(store.current), "nothing was remembered"

    second, second_transport, _ = make_connection(store=store)
    second.parser = ExplodingParser()
    assert answers(second, second_transport, data) == parsed
    assert second_transport.ended == (name in ("http10", "close", "pipelined_then_close"))


def test_keep_alive_connection_reuses_the_memo_across_reads() -> None:
    protocol, transport, state = make_connection()
    for _ in range(3):
        protocol.data_received(LEAF)
    assert len(remembered(state.registry.default.current)) == 1
    bodies = [r.body for r in split_responses(transport.output)]
    assert bodies == [sample_vm().instance["compute"]["vmId"].encode()] * 3


def test_pipelined_read_with_an_unknown_head_is_parsed_whole() -> None:
    store = SnapshotStore(sample_vm())
    warm, _, _ = make_connection(store=store)
    warm.data_received(LEAF)
    protocol, transport, _ = make_connection(store=store)
    protocol.data_received(LEAF + DOCUMENT)  # DOCUMENT is new: the whole read is parsed
    assert [r.status for r in split_responses(transport.output)] == [200, 200]
    assert len(remembered(store.current)) == 2  # and now both are known


@pytest.mark.parametrize(
    "data",
    [
        request(method="POST", body=b"12345"),
        request(headers=(("Metadata", "true"), ("Content-Length", "0"))),
        request(headers=(("Metadata", "true"), ("Transfer-Encoding", "chunked"))) + b"0\r\n\r\n",
        request(headers=(("Metadata", "true"), ("Expect", "100-continue"))),
        request("127.0.0.1:443", method="CONNECT"),
        b"\x00garbage\r\n\r\n",
        LEAF + b"\x00garbage\r\n\r\n",
        CLOSE + LEAF,  # the second request is never answered, so the read is not one-to-one
        LEAF[:-2],  # does not end between requests
    ],
)
def test_what_is_never_remembered(data: bytes) -> None:
    protocol, _, state = make_connection()
    protocol.data_received(data)
    assert remembered(state.registry.default.current) == {}


def test_a_request_split_across_reads_is_not_remembered_or_mistaken() -> None:
    store = SnapshotStore(sample_vm())
    warm, _, _ = make_connection(store=store)
    warm.data_received(LEAF)
    protocol, transport, _ = make_connection(store=store)
    # The second read ends like a known head but starts mid-request.
    protocol.data_received(DOCUMENT[:10])
    protocol.data_received(DOCUMENT[10:])
    (response,) = split_responses(transport.output)
    assert response.json()["compute"]["vmId"] == sample_vm().instance["compute"]["vmId"]


def test_draining_bypasses_the_memo_so_replies_announce_the_close() -> None:
    protocol, transport, state = make_connection()
    protocol.data_received(LEAF)
    state.draining = True
    protocol.data_received(LEAF)
    first, second = split_responses(transport.output)
    assert "connection" not in first.headers
    assert second.headers["connection"] == "close"
    assert transport.ended


def test_memo_is_bounded_in_entries_and_key_size() -> None:
    protocol, _, state = make_connection()
    for i in range(MAX_REQUEST_MEMO_ENTRIES + 100):
        protocol.data_received(request(f"/metadata/instance?api-version=2021-02-01&n={i}"))
    assert len(remembered(state.registry.default.current)) == MAX_REQUEST_MEMO_ENTRIES

    protocol, transport, state = make_connection()
    long_head = request(headers=(("Metadata", "true"), ("X-Pad", "p" * MAX_REQUEST_MEMO_KEY_BYTES)))
    protocol.data_received(long_head)
    assert remembered(state.registry.default.current) == {}
    assert split_responses(transport.output)[0].status == 200


def test_a_published_snapshot_starts_with_an_empty_memo() -> None:
    store = SnapshotStore(sample_vm())
    protocol, _, _ = make_connection(store=store)
    protocol.data_received(LEAF)
    old = store.current
    store.publish(sample_vm())
    assert remembered(old) and not remembered(store.current)


def test_a_fault_load_alone_makes_remembered_replies_unusable() -> None:
    protocol, transport, state = make_connection()
    protocol.data_received(LEAF)
    protocol.data_received(LEAF)  # from the memo
    assert remembered(state.registry.default.current, state.faults)
    now = time.time()
    # What Control and Follower do, and nothing more: no one is told to forget.
    state.faults.load([make_fault({"status": 503}, None, now, 0, state.faults.budgets)], now)
    protocol.data_received(LEAF)
    assert [r.status for r in split_responses(transport.output)] == [200, 200, 503]
    assert remembered(state.registry.default.current, state.faults) == {}  # the faulted reply is not remembered

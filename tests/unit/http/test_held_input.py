"""A held long-poll keeps reading, so a client that leaves is seen at once (issue 16, Medium 4), without sockets.

Reading paused while a long-poll was held, so the client's FIN was never
seen: the connection stayed in CLOSE-WAIT, counted against its caller's
connection limit, until timeout_sec. Now reading goes on while held, input
is kept unparsed (bounded), and an end of file drops the hold.
"""

from __future__ import annotations

import dataclasses

from fastimds.config import Limits
from fastimds.http.connection import HttpProtocol
from fastimds.http.holds import MAX_HELD_INPUT_BYTES
from fastimds.http.phases import Hold, Phase
from fastimds.imds.store import SnapshotStore
from tests.support.fakes import FakeTransport, make_connection, request, sample_vm, split_responses

WAIT = request("/metadata/instance/compute/location?api-version=2021-02-01&format=text&wait_for_change=true")
GET_LOCATION = request("/metadata/instance/compute/location?api-version=2021-02-01&format=text")
GET_VERSIONS = request("/metadata/versions")


def publish_location(store: SnapshotStore, location: str) -> None:
    vm = sample_vm()
    store.publish(
        dataclasses.replace(vm, instance={**vm.instance, "compute": {**vm.instance["compute"], "location": location}})
    )


def test_a_held_long_poll_whose_client_closes_is_released_and_its_slot_freed() -> None:
    # Regression: reading paused while held, so the FIN went unseen and the slot stayed taken until timeout_sec.
    store = SnapshotStore(sample_vm())
    protocol, transport, state = make_connection(Limits(max_connections_per_caller=1), store=store, peer="10.0.0.4")
    protocol.data_received(WAIT)
    assert protocol.hold is Hold.LONG_POLL and protocol in store.watchers
    assert transport.reading  # the client's FIN can be read

    assert protocol.eof_received() is None  # None: the transport closes itself
    assert protocol.hold is None and protocol not in store.watchers
    protocol.connection_lost(None)  # what the closing transport reports next
    assert state.callers == {}
    publish_location(store, "eastus")  # nothing is written to the gone client
    assert transport.output == b""


def test_input_behind_a_held_long_poll_is_kept_unparsed_and_answered_after_it_in_order() -> None:
    store = SnapshotStore(sample_vm())
    protocol, transport, _ = make_connection(store=store)
    protocol.data_received(GET_LOCATION)  # remembered: the memo would answer the same bytes at once
    before = len(transport.output)
    protocol.data_received(WAIT)
    assert protocol.phase is Phase.HELD
    protocol.data_received(GET_LOCATION)
    protocol.data_received(GET_VERSIONS)
    assert len(transport.output) == before  # neither the memo nor the parser answered them
    publish_location(store, "eastus")
    replies = split_responses(transport.output[before:])
    assert [(r.status, r.body) for r in replies[:2]] == [(200, b"eastus"), (200, b"eastus")]
    assert [r.status for r in replies] == [200, 200, 200]
    assert protocol.phase is Phase.IDLE and protocol.backlog == b""


def test_input_behind_a_held_long_poll_is_bounded_then_reading_pauses() -> None:
    store = SnapshotStore(sample_vm())
    protocol, transport, _ = make_connection(store=store)
    protocol.data_received(WAIT)
    sent = 0
    while transport.reading:
        protocol.data_received(GET_VERSIONS)
        sent += 1
        assert sent * len(GET_VERSIONS) <= MAX_HELD_INPUT_BYTES + len(GET_VERSIONS)
    assert len(protocol.backlog) <= MAX_HELD_INPUT_BYTES + len(GET_VERSIONS)
    publish_location(store, "eastus")
    assert transport.reading
    assert len(split_responses(transport.output)) == 1 + sent


# ---- Low 7: the worker's budget for connections whose client stopped reading ----


def test_past_the_stalled_budget_the_longest_stalled_connections_are_aborted() -> None:
    limits = Limits(max_stalled_buffer_bytes_per_worker=250_000)
    first, first_transport, state = make_connection(limits, peer="10.0.0.4")
    others = []
    for n in range(3):
        protocol = HttpProtocol(state)
        transport = FakeTransport(f"10.0.0.{5 + n}")
        protocol.connection_made(transport)
        others.append((protocol, transport))
    first_transport.buffered = 100_000
    first.pause_writing()
    second, second_transport = others[0]
    second_transport.buffered = 100_000
    second.pause_writing()
    assert state.stalled_bytes == 200_000 and not first_transport.aborted
    second.resume_writing()  # it read: out of the budget
    assert state.stalled_bytes == 100_000
    third, third_transport = others[1]
    third_transport.buffered = 120_000
    third.pause_writing()
    fourth, fourth_transport = others[2]
    fourth_transport.buffered = 90_000
    fourth.pause_writing()  # 310,000 > 250,000: the one stalled longest goes
    assert first_transport.aborted and not third_transport.aborted and not fourth_transport.aborted
    assert state.stalled_bytes == 210_000
    first.connection_lost(None)
    assert list(state.stalled) == [third, fourth]
    fourth.connection_lost(None)
    assert state.stalled_bytes == 120_000


def test_a_hold_released_while_the_client_is_not_reading_leaves_reading_paused() -> None:
    # Regression (review): the release resumed reading even with writing paused, so a client
    # that stopped reading could push input into the backlog without bound until its deadline.
    store = SnapshotStore(sample_vm())
    protocol, transport, state = make_connection(store=store)
    protocol.data_received(WAIT)
    protocol.pause_writing()  # the client stopped reading
    assert not transport.reading
    publish_location(store, "eastus")  # the hold is answered into a full buffer
    assert protocol.hold is None and protocol.write_paused
    assert not transport.reading  # still paused: nothing more is read from it
    assert protocol.deadline == state.now + state.limits.send_stall_timeout_s
    protocol.resume_writing()
    assert transport.reading

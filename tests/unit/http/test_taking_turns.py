"""Taking turns (fastimds.http.turns): a large pipelined backlog gives way to other connections.

Each test runs the connections on a real event loop (a turn is a loop turn)
with fake transports. The flood end to end, against a real server, is in
tests/e2e/test_tenant_fairness_e2e.py.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from typing import Any

import pytest

from fastimds.http import turns
from fastimds.http.connection import FEED_SLICE_BYTES, HttpProtocol
from fastimds.imds.datafile import describe_vm
from fastimds.imds.faults import FaultTable, make_fault
from fastimds.imds.registry import VmRegistry
from fastimds.imds.store import DEFAULT_VM_ID, SnapshotStore
from tests.support.fakes import FakeTransport, make_connection, request, sample_vm, split_responses

# Five leaves with five different bodies, cycled: a reply out of order shows.
FIELDS = ("name", "vmId", "location", "vmSize", "osType")
LEAVES = [request(f"/metadata/instance/compute/{field}?api-version=2021-02-01&format=text") for field in FIELDS]
BODIES = [sample_vm().instance["compute"][field].encode() for field in FIELDS]
VERSIONS = request("/metadata/versions")
CLOSE = request("/metadata/versions", headers=(("Metadata", "true"), ("Connection", "close")))
LONG_POLL = request("/metadata/instance/compute/location?api-version=2021-02-01&format=text&wait_for_change=true")

# About 2 MB of pipelined requests: ~250 slices, ~100 ms of work, far over one turn.
FLOOD_REQUESTS = 20_000


def flood(count: int = FLOOD_REQUESTS) -> bytes:
    return b"".join(LEAVES[i % len(LEAVES)] for i in range(count))


def assert_in_order(transport: FakeTransport, count: int) -> None:
    responses = split_responses(transport.output)
    assert len(responses) == count
    for i, response in enumerate(responses):
        assert (response.status, response.body) == (200, BODIES[i % len(BODIES)]), f"reply {i}"


def two_connections() -> tuple[HttpProtocol, FakeTransport, HttpProtocol, FakeTransport]:
    """Two VMs' connections to one worker."""
    registry = VmRegistry(default_vm_id=DEFAULT_VM_ID)
    registry.stores[DEFAULT_VM_ID] = SnapshotStore(sample_vm())
    flooder, flood_transport, state = make_connection(registry=registry, peer="10.0.0.4")
    other = HttpProtocol(state)
    other_transport = FakeTransport("10.0.0.5")
    other.connection_made(other_transport)
    return flooder, flood_transport, other, other_transport


async def until_fed(protocol: HttpProtocol, limit_turns: int = 100_000) -> int:
    """Let the loop run until `protocol` has no backlog left; the turns it took."""
    for turn in range(limit_turns):
        await asyncio.sleep(0)  # first: callbacks already due run (a read scheduled with call_soon)
        if not protocol.backlog and not protocol.giving_way:
            return turn + 1
    raise AssertionError("the backlog was never fed")


def run(body: Callable[[], Any]) -> None:
    asyncio.run(body())


def test_a_flood_gives_way_and_another_connections_request_is_answered_first() -> None:
    flooder, flood_transport, other, other_transport = two_connections()
    seen: dict[str, int] = {}

    def other_reads() -> None:
        other.data_received(VERSIONS)
        seen["backlog_when_answered"] = len(flooder.backlog)
        seen["flood_replies_before"] = len(split_responses(flood_transport.output))

    async def body() -> None:
        loop = asyncio.get_running_loop()
        loop.call_soon(flooder.data_received, flood())  # one read of ~2 MB
        loop.call_soon(other_reads)  # another VM's request, due just after it
        await until_fed(flooder)

    run(body)
    assert len(split_responses(other_transport.output)) == 1
    assert seen["backlog_when_answered"] > 0  # answered before the flood's backlog was finished
    assert 0 < seen["flood_replies_before"] < FLOOD_REQUESTS
    assert flood_transport.pause_count >= 1 and flood_transport.reading  # paused while giving way, reading again
    assert_in_order(flood_transport, FLOOD_REQUESTS)


def test_each_turn_is_bounded_in_time_and_feeds_at_least_one_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns, "MAX_WORK_PER_TURN_NS", 0)  # give way after every slice
    protocol, transport, _ = make_connection()
    data = flood(2_000)
    slices = -(-len(data) // FEED_SLICE_BYTES)

    async def body() -> int:
        protocol.data_received(data)
        assert len(transport.writes) == 1  # one slice, one write, then the loop's turn
        assert not transport.reading
        return await until_fed(protocol)

    turns_taken = asyncio.run(body())
    assert turns_taken == slices - 1  # the read's own turn fed one slice
    assert len(transport.writes) == slices
    assert transport.reading
    assert_in_order(transport, 2_000)


def test_a_paused_transport_while_giving_way_resumes_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns, "MAX_WORK_PER_TURN_NS", 0)
    protocol, transport, _ = make_connection()
    count = 1_000

    async def body() -> None:
        protocol.data_received(flood(count))
        protocol.pause_writing()  # the client stopped reading while the rest waited for its turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(transport.writes) == 1 and protocol.backlog  # the turn found it paused: nothing fed
        protocol.resume_writing()
        await until_fed(protocol)

    run(body)
    assert transport.reading
    assert_in_order(transport, count)


def test_a_long_poll_in_the_backlog_holds_the_rest_until_released(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns, "MAX_WORK_PER_TURN_NS", 0)
    store = SnapshotStore(sample_vm())
    protocol, transport, _ = make_connection(store=store)
    before = 3 * FEED_SLICE_BYTES // len(VERSIONS)
    after = 2 * FEED_SLICE_BYTES // len(VERSIONS)

    async def body() -> None:
        protocol.data_received(VERSIONS * before + LONG_POLL + VERSIONS * after)
        await until_fed_or_held(protocol)
        assert len(split_responses(transport.output)) == before  # the ones before it, then the hold
        assert not transport.reading
        document = copy.deepcopy(sample_vm().document)
        document["instance"]["compute"]["location"] = "eastus"
        store.publish(describe_vm(document, "test"))
        await until_fed(protocol)

    run(body)
    responses = split_responses(transport.output)
    assert len(responses) == before + 1 + after
    assert responses[before].body == b"eastus"
    assert all(r.status == 200 for r in responses)
    assert transport.reading


async def until_fed_or_held(protocol: HttpProtocol) -> None:
    while protocol.hold is None and (protocol.backlog or protocol.giving_way):
        await asyncio.sleep(0)
    assert protocol.hold is not None


def test_injected_latency_in_the_backlog_holds_the_rest_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns, "MAX_WORK_PER_TURN_NS", 0)
    faults = FaultTable()
    now = time.time()
    spec = {"latencyMs": 20, "path": "/metadata/versions", "count": 1}
    faults.load([make_fault(spec, None, now, 0, faults.budgets)], now)
    protocol, transport, _ = make_connection(faults=faults)
    before = 3 * FEED_SLICE_BYTES // len(LEAVES[0]) // len(LEAVES) * len(LEAVES)  # whole cycles of the leaves

    async def body() -> None:
        protocol.data_received(flood(before) + VERSIONS + flood(1_000))
        await until_fed_or_held(protocol)
        # Held for 20 ms: nothing from it on (replies of its own slice before it wait with it).
        assert len(split_responses(transport.output)) <= before and not transport.reading
        while protocol.hold is not None:
            await asyncio.sleep(0.005)
        await until_fed(protocol)

    run(body)
    responses = split_responses(transport.output)
    assert len(responses) == before + 1 + 1_000
    assert "apiVersions" in responses[before].json()
    rest = responses[:before] + responses[before + 1 :]
    assert [r.body for r in rest] == [BODIES[i % len(BODIES)] for i in range(before)] + [
        BODIES[i % len(BODIES)] for i in range(1_000)
    ]
    assert transport.reading


def test_a_close_in_the_backlog_ends_it_and_later_turns_write_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns, "MAX_WORK_PER_TURN_NS", 0)
    protocol, transport, _ = make_connection()
    before = 2 * FEED_SLICE_BYTES // len(VERSIONS)

    async def body() -> None:
        protocol.data_received(VERSIONS * before + CLOSE + VERSIONS * 500)
        await until_fed(protocol)

    run(body)
    responses = split_responses(transport.output)
    assert len(responses) == before + 1
    assert responses[-1].headers["connection"] == "close"
    assert transport.closed


def test_a_connection_lost_while_giving_way_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns, "MAX_WORK_PER_TURN_NS", 0)
    protocol, transport, state = make_connection()

    async def body() -> None:
        protocol.data_received(flood(1_000))
        written = len(transport.writes)
        protocol.connection_lost(None)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(transport.writes) == written and not protocol.backlog

    run(body)
    assert protocol not in state.connections


def test_without_a_loop_a_large_read_is_fed_at_once() -> None:
    protocol, transport, _ = make_connection()
    protocol.data_received(flood(2_000))
    assert not protocol.backlog and not protocol.giving_way and transport.reading
    assert_in_order(transport, 2_000)

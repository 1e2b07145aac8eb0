"""Per-caller throttling: off by default, Azure's limits with --throttle azure.

A throttled real server is in tests/e2e/test_throttle_e2e.py.
"""

from __future__ import annotations

from fastimds.http.connection import HttpProtocol, ServerState
from fastimds.http.throttle import Throttle, ThrottleLimits
from fastimds.imds.registry import VmRegistry
from fastimds.imds.store import DEFAULT_VM_ID, SnapshotStore
from fastimds.ops.telemetry import LAYOUT
from tests.support.fakes import PINNED_UNIX_TIME, FakeTransport, make_connection, request, sample_vm, split_responses

LEAF = request("/metadata/instance/compute/vmId?api-version=2021-02-01&format=text")
TOKEN = request("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net")


def throttled_connection(
    peer: str = "10.0.0.4", limits: ThrottleLimits | None = None
) -> tuple[HttpProtocol, FakeTransport, ServerState]:
    registry = VmRegistry(default_vm_id=DEFAULT_VM_ID)
    registry.stores[DEFAULT_VM_ID] = SnapshotStore(sample_vm())
    protocol, transport, state = make_connection(
        registry=registry, peer=peer, throttle=Throttle(limits or ThrottleLimits())
    )
    return protocol, transport, state


def statuses(transport: FakeTransport) -> list[int]:
    return [r.status for r in split_responses(transport.output)]


def test_off_by_default() -> None:
    protocol, transport, state = make_connection()
    assert state.throttle is None and protocol.window is None
    for _ in range(50):
        protocol.data_received(LEAF)
    assert set(statuses(transport)) == {200}


def test_five_a_second_then_429_with_retry_after_then_a_new_second() -> None:
    protocol, transport, state = throttled_connection()
    for _ in range(7):
        protocol.data_received(LEAF)
    assert statuses(transport) == [200] * 5 + [429] * 2
    throttled = split_responses(transport.output)[-1]
    assert throttled.headers["retry-after"] == "1"
    assert "Too many requests" in throttled.json()["error"]
    state.tick(1.0, PINNED_UNIX_TIME + 1)
    protocol.data_received(LEAF)
    assert statuses(transport)[-1] == 200
    assert state.counters is not None and state.counters[LAYOUT.reject_slot("throttled")] == 2


def test_every_tick_starts_a_new_window_whatever_the_loop_clock_reads() -> None:
    # Ticks fire just after each wall-clock second; the loop's monotonic clock is offset
    # from it by an arbitrary fraction, so two ticks a second apart can read the same
    # whole loop second (1.0001, then 1.9999). A window keyed by that lasted two
    # ticks, and callers within the limit got 429s.
    protocol, transport, state = throttled_connection()
    state.tick(1.0001, PINNED_UNIX_TIME + 1.001)
    for _ in range(5):
        protocol.data_received(LEAF)
    state.tick(1.9999, PINNED_UNIX_TIME + 2.001)
    protocol.data_received(LEAF)
    assert statuses(transport) == [200] * 6


def test_identity_has_its_own_budget_of_twenty() -> None:
    protocol, transport, _ = throttled_connection()
    for _ in range(5):
        protocol.data_received(LEAF)
    for _ in range(21):
        protocol.data_received(TOKEN)
    codes = statuses(transport)
    assert codes[:5] == [200] * 5
    assert codes[5:25].count(429) == 0  # 20 identity requests (the sample has no identity: 400s, not 429s)
    assert codes[25] == 429


def test_callers_are_throttled_independently_and_pipelined_requests_count() -> None:
    first, first_transport, state = throttled_connection("10.0.0.4", ThrottleLimits(instance_rps=2))
    throttle = state.throttle
    assert throttle is not None
    first.data_received(LEAF * 3)  # pipelined: each request counts
    assert statuses(first_transport) == [200, 200, 429]
    other = HttpProtocol(state)
    other_transport = FakeTransport("10.0.0.5")
    other.connection_made(other_transport)
    assert other.window is throttle.callers["10.0.0.5"]
    other.data_received(LEAF)
    assert statuses(other_transport) == [200]

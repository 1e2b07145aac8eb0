"""What 10,000 parked long-polls cost everyone else (pytest-benchmark).

A long-poll parks its connection in its VM store's watcher set: no task, no
timer. These rungs measure a keep-alive request's cost with no waiters and
with 10,000 parked on the same VM, the once-a-second deadline sweep over
10,000 connections, and a publish that wakes none of 10,000 waiters (their
view did not change). Run with `make bench`; `make test` runs each once.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from fastimds.config import Limits
from fastimds.http.connection import HttpProtocol, ServerState
from fastimds.imds.datafile import parse_vm
from fastimds.imds.store import SnapshotStore
from tests.support.fakes import PINNED_UNIX_TIME, FakeTransport, make_connection, request, sample_vm

WAITERS = 10_000
LEAF = request("/metadata/instance/compute/vmId?api-version=2021-02-01&format=text")
# Every waiter here comes from one fake address: let it hold them all.
ONE_CALLER_LIMITS = Limits(max_connections_per_caller=WAITERS + 1)
LONG_POLL = request("/metadata/instance/compute/location?api-version=2021-02-01&format=text&wait_for_change=true")


def park_waiters(state: ServerState, count: int) -> list[HttpProtocol]:
    parked = []
    for _ in range(count):
        protocol = HttpProtocol(state)
        protocol.connection_made(FakeTransport())
        protocol.data_received(LONG_POLL)
        parked.append(protocol)
    return parked


@pytest.mark.parametrize("waiters", [0, WAITERS])
def test_keep_alive_request_beside_parked_waiters(benchmark: Any, waiters: int) -> None:
    store = SnapshotStore(sample_vm())
    protocol, _transport, state = make_connection(ONE_CALLER_LIMITS, store=store)
    protocol.write = lambda _data: None
    parked = park_waiters(state, waiters)
    protocol.data_received(LEAF)
    benchmark(protocol.data_received, LEAF)
    assert len(store.watchers) == waiters
    assert all(p.hold is not None for p in parked)


def test_deadline_sweep_over_parked_waiters(benchmark: Any) -> None:
    _protocol, _transport, state = make_connection(ONE_CALLER_LIMITS)
    park_waiters(state, WAITERS)
    now = [1.0]

    def sweep() -> None:
        now[0] += 1.0  # well inside their 60 s timeout: nobody is answered
        state.tick(now[0], PINNED_UNIX_TIME + now[0])

    benchmark(sweep)
    assert len(state.connections) == WAITERS + 1


def test_publish_that_wakes_no_waiter(benchmark: Any) -> None:
    store = SnapshotStore(sample_vm())
    _protocol, _transport, state = make_connection(ONE_CALLER_LIMITS, store=store)
    park_waiters(state, WAITERS)
    document = copy.deepcopy(sample_vm().document)
    document["instance"]["compute"]["name"] = "renamed"  # not the location the waiters watch
    renamed = parse_vm(orjson.dumps(document), "bench")
    benchmark(store.publish, renamed)
    assert len(store.watchers) == WAITERS

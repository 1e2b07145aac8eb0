"""The hot core allocates nothing that outlives a request.

A repeated request goes through the whole protocol (parse, resolve from the
snapshot's memo, respond into the out list, one write) many thousand times;
the number of live heap blocks must not grow with the count.
"""

from __future__ import annotations

import gc
import sys

from fastimds.http.connection import HttpProtocol
from tests.support.fakes import make_connection, request

REPEATS = 20_000
# Blocks that may legitimately appear once (interned ints, a resized list)
# but nowhere near one per request.
ALLOWED_GROWTH_BLOCKS = 50

REQUESTS = {
    "text leaf": request("/metadata/instance/compute/vmId?api-version=2017-04-02&format=text"),
    "whole document": request("/metadata/instance?api-version=2021-02-01"),
    "error": request(headers=()),
    "pipelined 4": request("/metadata/versions") * 4,
}


def live_blocks_after(protocol: HttpProtocol, data: bytes, repeats: int) -> int:
    for _ in range(repeats):
        protocol.data_received(data)
    gc.collect()
    return sys.getallocatedblocks()


def test_repeated_requests_leave_no_net_allocations() -> None:
    for name, data in REQUESTS.items():
        protocol, transport, _ = make_connection()
        # Drop what the transport records: only the server's own heap counts.
        protocol.write = lambda _data: None
        live_blocks_after(protocol, data, 1_000)  # warm the memo and the caches
        before = live_blocks_after(protocol, b"", 0)
        after = live_blocks_after(protocol, data, REPEATS)
        assert after - before < ALLOWED_GROWTH_BLOCKS, f"{name}: {after - before} blocks for {REPEATS} requests"
        assert not transport.ended

"""What every connection of one worker shares, and its once-a-second sweep.

Rules of this module:
- One `ServerState` per worker, built at start with everything the
  connections need (the registry, limits, clocks, counters, request log,
  throttle, fault table, approval sink, signing keys, event log) and passed
  to each connection: no module-level state. Every argument but the
  registry has a default fit for tests (telemetry off, nothing logged to a
  file, keys made on first use).
- Deadlines, not timers (house rule 6): each connection stores when it must
  next make progress; `tick` sweeps them once a second and also refreshes
  the Date block and `keep_alive_deadline`, so no request reads the wall
  clock for them.
- `now` is as of the last tick, up to a sweep interval stale: fine for the
  server's own limits, but a client's wait (a long-poll's timeout_sec) must
  never end early (issue 15). Its deadline is taken from `clock`, a fresh
  read of the loop's clock, when the hold starts (not per request). The
  default, time.monotonic, is what the loop's clock reads: asyncio's
  loop.time() is time.monotonic(), and uvloop's is the same CLOCK_MONOTONIC
  in whole milliseconds, never ahead of it, so a deadline from it is reached
  on the loop's clock no sooner than it is in fact.
- Connection limits are counted here (`connections`, `callers`); refused
  connections linger in `refused` until the sweep aborts them
  (fastimds.http.connection).
- Connections whose client stopped reading (writing paused) are kept in
  `stalled`, oldest first, with the bytes they buffer (unsent replies and
  unread input) counted when they pause. Past the worker's budget
  (`max_stalled_buffer_bytes_per_worker`) the oldest are aborted (issue 16,
  Low 7): they cost a dict update per pause and resume, nothing per request.
- `callers` holds each caller address's open connections, so when the
  registry says an address changed owner (`owners_changed`, issue 16) just
  those connections are re-mapped, before their next request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Set
from typing import TYPE_CHECKING, Final, Protocol

from fastimds.config import Limits
from fastimds.http.throttle import Throttle
from fastimds.imds.faults import FaultTable
from fastimds.imds.keys import Keys
from fastimds.imds.registry import VmRegistry
from fastimds.imds.render import date_block
from fastimds.imds.signing import SigningBudgets
from fastimds.ops.event_log import EventLog
from fastimds.ops.request_log import RequestLog

if TYPE_CHECKING:
    from fastimds.http.connection import HttpProtocol

# Connections whose deadline passed handled per loop iteration (see ServerState._expire).
EXPIRE_SLICE: Final = 100


class ApprovalSink(Protocol):
    """Where a worker's scheduled-event approvals go: in a server, the bus (fastimds.bus.approvals).

    `approve` notes VM `vm_id`'s approval without I/O (it runs inside a
    parser callback) and answers whether it was taken: False when the VM is
    past its approval rate (the request gets a 429).
    """

    def approve(self, vm_id: str, event_ids: frozenset[str]) -> bool: ...


class DroppedApprovals:
    """The default sink, for a state no server wired up (unit tests): approvals are logged and dropped."""

    def __init__(self, event_log: EventLog) -> None:
        self.event_log = event_log

    def approve(self, vm_id: str, event_ids: frozenset[str]) -> bool:
        self.event_log.event("approval_dropped", vm=vm_id, events=sorted(event_ids))
        return True


class ServerState:
    """What every connection of one worker shares."""

    __slots__ = (
        "registry",
        "limits",
        "connections",
        "date_block",
        "now",
        "now_unix",
        "keep_alive_deadline",
        "draining",
        "counters",
        "request_log",
        "throttle",
        "callers",
        "refused",
        "faults",
        "approvals",
        "keys",
        "signing",
        "event_log",
        "stalled",
        "stalled_bytes",
        "clock",
    )

    def __init__(
        self,
        registry: VmRegistry,
        limits: Limits | None = None,
        *,
        now: float = 0.0,
        unix_time: float | None = None,
        counters: list[int] | None = None,
        request_log: RequestLog | None = None,
        throttle: Throttle | None = None,
        faults: FaultTable | None = None,
        approvals: ApprovalSink | None = None,
        keys: Keys | None = None,
        event_log: EventLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.clock = clock  # the loop's clock, read fresh (see the module rules); tests pin it with `now`
        self.limits = limits if limits is not None else Limits()
        # This worker's hot-path counters (fastimds.ops.telemetry.LAYOUT); None turns telemetry off.
        self.counters = counters
        self.request_log = request_log  # the cold path, when --request-log is on
        self.throttle = throttle  # per-caller limits, when --throttle is on
        self.faults = faults if faults is not None else FaultTable()  # injected faults (admin API), loaded in place
        self.event_log = event_log if event_log is not None else EventLog()
        self.approvals: ApprovalSink = approvals if approvals is not None else DroppedApprovals(self.event_log)
        self.keys = keys if keys is not None else Keys()  # made on first use unless the server made them
        self.signing = SigningBudgets(self.limits.signatures_per_vm_per_s)  # each VM's fresh signatures, this worker
        self.connections: set[HttpProtocol] = set()
        self.callers: dict[str, set[HttpProtocol]] = {}  # caller address -> its admitted connections open now
        self.refused: set[HttpProtocol] = set()  # refused connections lingering until their 503 is read
        self.draining = False  # set by shutdown: every reply closes its connection
        self.stalled: dict[HttpProtocol, int] = {}  # writing paused, oldest first -> the bytes counted for it
        self.stalled_bytes = 0  # their sum
        self._set_clocks(now, unix_time if unix_time is not None else time.time())
        registry.owner_watchers.append(self)

    def owners_changed(self, addresses: Set[str]) -> None:
        """These caller addresses changed owner: their open connections answer as the new one from now on."""
        callers = self.callers
        for address in addresses:
            for connection in list(callers.get(address, ())):
                connection.remap()

    def _set_clocks(self, now: float, unix_time: float) -> None:
        self.now = now  # loop.time() as of the last tick
        self.now_unix = unix_time  # time.time() as of the last tick
        self.date_block = date_block(unix_time)
        # now + keep-alive timeout, once per tick: the memo path stores it as is (no load of limits, no add).
        self.keep_alive_deadline = now + self.limits.keep_alive_timeout_s

    def note_stalled(self, connection: HttpProtocol, buffered: int) -> None:
        """`connection` paused writing with `buffered` bytes kept; over the budget, drop the longest stalled."""
        self.note_resumed(connection)  # counted once, whatever the transport reports twice
        self.stalled[connection] = buffered
        self.stalled_bytes += buffered
        budget = self.limits.max_stalled_buffer_bytes_per_worker
        while self.stalled_bytes > budget and self.stalled:
            oldest = next(iter(self.stalled))
            self.note_resumed(oldest)
            if self.event_log.allow("stalled_connection_aborted", self.now_unix):
                self.event_log.write(
                    "stalled_connection_aborted",
                    self.now_unix,
                    {"caller": oldest.peer, "stalled_bytes": self.stalled_bytes, "budget": budget},
                )
            oldest.transport.abort()  # its client is not reading: what it did not take is dropped

    def note_resumed(self, connection: HttpProtocol) -> None:
        """`connection` writes again (or is gone): its bytes leave the budget."""
        buffered = self.stalled.pop(connection, None)
        if buffered is not None:
            self.stalled_bytes -= buffered

    def tick(self, now: float, unix_time: float) -> None:
        """Once a second: refresh the clocks and the Date block, enforce deadlines."""
        self._set_clocks(now, unix_time)
        self._expire([connection for connection in self.connections if now >= connection.deadline], now)
        for connection in [c for c in self.refused if now >= c.deadline]:
            self.refused.discard(connection)
            connection.transport.abort()

    def _expire(self, due: list[HttpProtocol], now: float) -> None:
        """Deadlines in slices of EXPIRE_SLICE, with pending I/O served between them.

        Expiring a connection costs 18-39 µs (a close or a 408), so 1,000 at
        once stalled the worker ~18-39 ms (reliability.md); a slice is ~2-4 ms.
        """
        for connection in due[:EXPIRE_SLICE]:
            connection.check_deadlines(now)
        if len(due) > EXPIRE_SLICE:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a direct call): the rest now
                self._expire(due[EXPIRE_SLICE:], now)
                return
            loop.call_soon(self._expire, due[EXPIRE_SLICE:], now)

"""What serves VMs in one process: the listener, the follower, the connections, the request log.

Rules of this module:
- A worker never writes VM data. Its registry is filled by its Follower
  (fastimds.bus.follower) alone, in every topology: in a single process the
  in-process control hands each write to that same follower at once.
- Scheduled-event approvals leave through the bus's approvals folder
  (fastimds.bus.approvals), whichever process the control plane is in.
- The signing keys (fastimds.imds.keys) are made before it starts and passed
  in: every worker of a server signs with the same ones.
- On stop it drains: no new connections, in-flight replies finish with
  `Connection: close`, idle keep-alive connections get a moment to send the
  request already on its way, are half-closed and read from, then aborted
  at the grace limit.
"""

from __future__ import annotations

import asyncio
import socket
import time

from fastimds.bus.approvals import BusApprovals
from fastimds.bus.follower import Follower
from fastimds.config import Settings
from fastimds.http.connection import HttpProtocol, ServerState
from fastimds.http.throttle import Throttle, ThrottleLimits
from fastimds.imds.keys import Keys
from fastimds.ops.event_log import EventLog
from fastimds.ops.request_log import RequestLog
from fastimds.ops.scrape import Telemetry

# The request log is written this often, at most this many records at a time
# (~0.75 µs each: a slice is a ~4 ms pause at most), so that at 130k req/s
# the buffer never nears its cap.
REQUEST_LOG_FLUSH_S = 0.25
REQUEST_LOG_SLICE_RECORDS = 5000
# On SIGTERM an idle keep-alive connection is kept this long, so that a client
# mid-burst (its next request within milliseconds, or a thread descheduled on
# a busy host) gets that request answered, with Connection: close. It ends as
# soon as no connection is left, so an idle server stops at once.
DRAIN_ANSWER_S = 0.25
# Then idle connections are half-closed (a FIN) and read from for this long,
# so a request sent as the FIN crossed it meets a clean end of stream rather
# than a reset (Go's net/http waits 500 ms for the same reason).
DRAIN_LINGER_S = 0.5


class Worker:
    def __init__(
        self,
        settings: Settings,
        follower: Follower,
        sock: socket.socket,
        *,
        telemetry: Telemetry,
        keys: Keys,
        log: EventLog,
        approvals: BusApprovals,
        watch_bus: bool,
    ) -> None:
        self.settings = settings
        self.follower = follower
        self.registry = follower.registry
        self.sock = sock
        self.telemetry = telemetry
        self.keys = keys
        self.log = log
        self.approvals = approvals
        # A worker of a group watches the bus; a single process is handed every write by its own control.
        self.watch_bus = watch_bus
        self.request_log: RequestLog | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.state: ServerState | None = None
        self.server: asyncio.Server | None = None

    def vms_served(self) -> int:
        return sum(1 for store in self.registry.stores.values() if store.current is not None)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.watch_bus:
            self.tasks.append(await self.follower.start())
        else:
            self.follower.rescan()  # what the bus held before this process's control wrote anything
        if self.settings.request_log_dir is not None:
            retain_files, retain_age_s = self.settings.request_log_retain
            self.request_log = RequestLog(
                self.settings.request_log_dir,
                self.telemetry.region,
                retain_files=retain_files,
                retain_age_s=retain_age_s,
            )
            loop.call_later(REQUEST_LOG_FLUSH_S, self._flush_request_log)
        throttle = self.settings.throttle
        state = self.state = ServerState(
            self.registry,
            self.settings.limits,
            now=loop.time(),
            unix_time=time.time(),
            counters=self.telemetry.counters,
            request_log=self.request_log,
            throttle=Throttle(ThrottleLimits(*throttle)) if throttle is not None else None,
            faults=self.follower.fault_table,
            approvals=self.approvals,
            keys=self.keys,
            event_log=self.log,
        )
        self.server = await loop.create_server(
            lambda: HttpProtocol(state), sock=self.sock, backlog=self.settings.backlog
        )

    def _flush_request_log(self) -> None:
        """The cold path, in slices so that a busy second's records never stall requests for long."""
        request_log = self.request_log
        assert request_log is not None
        loop = asyncio.get_running_loop()
        request_log.flush(time.time(), max_records=REQUEST_LOG_SLICE_RECORDS)
        for event, fields in request_log.take_events():
            self.log.event(event, **fields)
        if request_log.buffered:
            loop.call_soon(self._flush_request_log)  # more than a slice: the rest after pending I/O
        else:
            loop.call_later(REQUEST_LOG_FLUSH_S, self._flush_request_log)

    def tick(self, loop_time: float, unix_time: float) -> None:
        assert self.state is not None
        self.state.tick(loop_time, unix_time)

    def reload(self) -> None:
        pass  # a worker follows the bus; the control plane reloads the sources

    def announce(self) -> None:
        self.log.event("worker_ready", vms=self.vms_served())

    async def stop(self) -> None:
        state, server = self.state, self.server
        assert state is not None and server is not None
        loop = asyncio.get_running_loop()
        for task in self.tasks:
            task.cancel()
        state.draining = True  # from here every reply says Connection: close and closes
        server.close()
        give_up_at = loop.time() + self.settings.shutdown_grace_s
        # Idle keep-alive connections stay open a moment: a request already on its
        # way is answered (and its connection closed) instead of meeting a close.
        answer_until = loop.time() + DRAIN_ANSWER_S
        while state.connections and loop.time() < answer_until:
            await asyncio.sleep(0.02)
        for connection in list(state.connections):
            connection.shutdown()  # idle ones are half-closed: a FIN, reading on
        linger_until = loop.time() + DRAIN_LINGER_S
        while state.connections and loop.time() < give_up_at:
            if loop.time() >= linger_until:
                for connection in list(state.connections):
                    connection.finish_shutdown()
            await asyncio.sleep(0.02)
        for connection in list(state.connections):
            connection.transport.abort()
        if self.request_log is not None:
            self.request_log.close(time.time())
        self.approvals.flush()  # approvals noted since the last batch: written, not lost
        self.log.event("worker_stopped", aborted=len(state.connections))

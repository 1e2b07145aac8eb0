"""The control plane on a running loop: the admin listeners, the sources, the event clock, approvals.

Rules of this module:
- It runs in the control process of a multi-worker server, or beside the
  Worker in a single process; either way the same parts start: the admin
  listeners, the event clock, approvals from the bus, and every source's
  follow (a --data-dir watch). Approvals come through the bus's approvals
  folder either way; only the control process watches it: in a single
  process the worker's sink tells the clock itself as it writes a file
  (a watch is a thread that wakes every few ms: measured, ~5% more CPU
  per request, tuning.md).
- SIGHUP reloads every source: --data is re-read, --data-dir rescanned.
- Its tick sweeps the admin connections' deadlines (idle, half-sent
  requests, lingering closes: fastimds.control.admin_connection), once a
  second like the VM port's sweep; no timer per connection.
"""

from __future__ import annotations

import asyncio

from fastimds.control.admin_api import AdminApi
from fastimds.control.plane import ControlPlane
from fastimds.ops.event_log import EventLog
from fastimds.process.sockets import AdminSockets
from fastimds.sources.base import Source


class ControlPart:
    def __init__(
        self,
        plane: ControlPlane,
        sources: list[Source],
        *,
        admin: AdminSockets | None,
        api: AdminApi,
        backlog: int,
        log: EventLog,
        watch_approvals: bool,
    ) -> None:
        self.plane = plane
        self.sources = sources
        self.admin = admin
        self.api = api
        self.backlog = backlog
        self.log = log
        self.watch_approvals = watch_approvals
        self.servers: list[asyncio.Server] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.servers = await self.admin.serve(self.api, self.backlog, self.log) if self.admin is not None else []
        self.tasks.append(asyncio.ensure_future(self.plane.clock.run()))
        for source in self.sources:
            await source.start()
        if self.watch_approvals:
            self.tasks.append(await self.plane.clock.start_approvals_watch())
        else:
            self.plane.clock.apply_approvals()  # any left from before a restart

    def tick(self, loop_time: float, unix_time: float) -> None:
        # The event clock keeps its own time; the admin connections' deadlines are swept here.
        if self.admin is not None:
            self.admin.sweep(loop_time)

    def reload(self) -> None:
        for source in self.sources:
            source.reload()

    def announce(self) -> None:
        self.log.event("control_ready", vms=len(self.plane.control.live_ids()))

    async def stop(self) -> None:
        for source in self.sources:
            source.stop()
        for task in self.tasks:
            task.cancel()
        for server in self.servers:
            server.close()
        if self.admin is not None:
            self.admin.close_connections()

"""One process's event loop: its parts started in order, the once-a-second tick, signals, stop.

Rules of this module:
- A process runs a list of parts (fastimds.process.worker.Worker, what
  serves VMs; fastimds.process.control_part.ControlPart, the control plane):
  a worker runs one, the control process the other, a single process both,
  on one loop. The loop never asks which: every part starts, ticks, reloads
  and stops the same way.
- The tick fires just after each wall-clock second, so a Date header is
  never stale by more than a tick; it also ticks the event log and publishes
  this process's telemetry region.
- SIGHUP reloads every part (a worker has nothing to reload: it follows the
  bus); SIGTERM and SIGINT stop them, in reverse order.
- Everything built before serving lives as long as the process: it is frozen
  out of the collector's generations so collections stay cheap (tuning.md).
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Callable
from typing import Protocol

from fastimds.ops.event_log import EventLog
from fastimds.ops.scrape import Telemetry

TICK_INTERVAL_S = 1.0


class Part(Protocol):
    async def start(self) -> None: ...

    def tick(self, loop_time: float, unix_time: float) -> None: ...

    def reload(self) -> None: ...

    def announce(self) -> None:
        """Log that this part is ready (its `*_ready` event)."""

    async def stop(self) -> None: ...


async def run_process(
    parts: list[Part],
    log: EventLog,
    telemetry: Telemetry,
    vms_served: Callable[[], int],
    on_ready: Callable[[], None],
) -> None:
    """Start `parts` in order, tick them until SIGTERM, then stop them in reverse order."""
    loop = asyncio.get_running_loop()
    for part in parts:
        await part.start()

    def tick() -> None:
        unix_time = time.time()
        for part in parts:
            part.tick(loop.time(), unix_time)
        log.tick()
        telemetry.publish(vms_served())
        # Fire just after the next wall-clock second, so Date is never stale by more than a tick.
        loop.call_later(TICK_INTERVAL_S - unix_time % TICK_INTERVAL_S + 0.001, tick)

    tick()
    stopping = asyncio.Event()

    def reload() -> None:
        for part in parts:
            part.reload()

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    gc.freeze()
    for part in parts:
        part.announce()
    on_ready()
    await stopping.wait()
    for part in reversed(parts):
        await part.stop()

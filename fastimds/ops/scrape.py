"""One process's telemetry glue: its counters, its region of the shared area, the scrape, readiness.

Rules of this module:
- Workers use regions 0..N-1; the control process (or the single process)
  uses its own. The scrape sums every region; readiness reads each worker's.
- It knows no control plane and no registry: whoever builds it says what to
  read (the control's model for per-VM state, the serving count a worker
  publishes each tick).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastimds.ops.source_status import SourceStatus
from fastimds.ops.telemetry import LAYOUT, ScrapeSources, TelemetryArea, VmState, render_metrics

# A worker whose region has not been published for this long counts as down.
WORKER_STALE_S = 3.0


class Telemetry:
    def __init__(self, area: TelemetryArea, region: int, enabled: bool, workers: int) -> None:
        self.area = area
        self.region = region
        self.workers = workers
        self.counters: list[int] | None = area.read(region) if enabled else None  # a restart continues

    def publish(self, vms_served: int) -> None:
        if self.counters is not None:
            self.counters[LAYOUT.vms_served] = vms_served
            self.counters[LAYOUT.tick_unix] = int(time.time())
            self.area.publish(self.region, self.counters)

    def metrics(
        self,
        vms: Callable[[], list[VmState]],
        updates: Callable[[], dict[tuple[str, str], int]],
        vms_served: Callable[[], int],
        sources: Callable[[], list[SourceStatus]] = list,
    ) -> bytes:
        self.publish(vms_served())  # this process's own counts, fresh

        def workers() -> int:
            now = time.time()
            return sum(
                1 for index in range(self.workers) if now - self.area.read(index)[LAYOUT.tick_unix] <= WORKER_STALE_S
            )

        return render_metrics(
            ScrapeSources(totals=self.area.total, vms=vms, updates=updates, workers=workers, sources=sources)
        )

    def workers_serving(self) -> list[int | None]:
        """Each worker's count of VMs served, None for one that has not ticked lately."""
        now = time.time()
        serving: list[int | None] = []
        for index in range(self.workers):
            region = self.area.read(index)
            fresh = now - region[LAYOUT.tick_unix] <= WORKER_STALE_S
            serving.append(region[LAYOUT.vms_served] if fresh else None)
        return serving

    def readiness(self, expected_vms: int) -> tuple[bool, dict[str, Any]]:
        """Ready when every worker ticked lately and serves as many VMs as the control plane has."""
        serving = self.workers_serving()
        return all(count == expected_vms for count in serving), {
            "workers_serving": serving,
            "expected_vms": expected_vms,
        }

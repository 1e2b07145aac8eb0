"""Hot-path telemetry: flat integer counters per worker, exposed at scrape time.

Rules of this module:
- On the hot path a worker only does `counters[slot] += 1` (and `+= n`) on a
  plain Python list of ints: no locks, no strings, no dicts, nothing
  allocated. Every slot index is computed ahead of time (`Layout`); a reply
  remembered by the request memo carries its slots with it.
- Once a second the worker's tick copies its list into its own region of a
  shared memory area (`TelemetryArea`, an anonymous shared mmap made before
  the workers fork). Counts are therefore at most a second old, which is
  what the hot path of the design promises ("seconds old").
- A scrape (the admin listener's `/metrics`) sums every worker's region and
  renders Prometheus text with `prometheus_client`, from a custom collector
  that reads the area at scrape time. Nothing is formatted per request.
- A replaced worker takes over its predecessor's region and continues from
  its counts, so every counter stays monotonic for Prometheus.
- Latency buckets are powers of two in nanoseconds (`int.bit_length`), so a
  request finds its bucket with one C call; exposition converts them to the
  seconds Prometheus expects.
"""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# Imported here, not at the first scrape: that import alone took ~85 ms.
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from fastimds.ops.source_status import SourceStatus

# ---- what is counted ----

CATEGORIES: tuple[str, ...] = (
    "instance",
    "versions",
    "identity",
    "scheduledevents",
    "attested",
    "loadbalancer",
    "admin",
    "other",
)
# Status codes with their own counter; any other code counts as "other".
CODES: tuple[int, ...] = (200, 304, 400, 404, 405, 408, 410, 413, 414, 429, 431, 500, 503)
REJECT_REASONS: tuple[str, ...] = (
    "missing_header",
    "forwarded",
    "bad_version",
    "throttled",
    "signing_budget",  # a 429: the VM is past its fresh signatures per second (fastimds.imds.signing)
    "too_large",
    "parse_error",
    "connection_limit",  # a connection refused: the worker holds its maximum
    "caller_connection_limit",  # a connection refused: its caller holds its maximum
)
# Injected faults (fastimds.imds.faults), by kind: the status answered, or what was done.
FAULT_KINDS: tuple[str, ...] = ("410", "429", "500", "503", "latency", "reset")
# Latency bucket upper bounds: 2**k nanoseconds for k in this range
# (1.0 µs .. 8.6 s); slower requests land in the last bucket.
LATENCY_BUCKET_BITS = range(10, 34)

# Every metric family /metrics exports (histograms also as _bucket/_sum/_count).
EXPORTED_METRICS: frozenset[str] = frozenset(
    {
        "fastimds_requests_total",
        "fastimds_response_bytes_total",
        "fastimds_request_duration_seconds",
        "fastimds_connections_opened_total",
        "fastimds_connections_closed_total",
        "fastimds_connections",
        "fastimds_rejects_total",
        "fastimds_snapshot_generation",
        "fastimds_snapshot_age_seconds",
        "fastimds_vms",
        "fastimds_vms_ready",
        "fastimds_updates_total",
        "fastimds_workers",
        "fastimds_log_lines_suppressed_total",
        "fastimds_faults_injected_total",
    }
)


class Layout:
    """Where each counter lives in a worker's list (and its shared region).

    Offsets are plain attributes computed once: the hot path reads them as
    module constants (a property chain here cost ~0.9 µs per request).
    """

    def __init__(
        self,
        categories: tuple[str, ...] = CATEGORIES,
        codes: tuple[int, ...] = CODES,
        reasons: tuple[str, ...] = REJECT_REASONS,
    ) -> None:
        self.categories = categories
        self.codes = codes
        self.reasons = reasons
        self.buckets = len(LATENCY_BUCKET_BITS) + 1  # the last is "slower than every bound"
        self.codes_per_category = len(codes) + 1  # the last column is "any other code"
        self.requests = 0  # [category][code or other]
        self.bytes = self.requests + len(categories) * self.codes_per_category  # [category]
        self.latency = self.bytes + len(categories)  # [bucket]
        self.latency_sum_ns = self.latency + self.buckets
        self.connections_opened = self.latency_sum_ns + 1
        self.connections_closed = self.connections_opened + 1
        self.rejects = self.connections_closed + 1  # [reason]
        self.log_suppressed = self.rejects + len(reasons)
        self.faults = self.log_suppressed + 1  # [fault kind]
        # Per-region gauges, set at each tick and read per region, never summed.
        self.vms_served = self.faults + len(FAULT_KINDS)
        self.tick_unix = self.vms_served + 1
        self.size = self.tick_unix + 1

    def request_slot(self, category: str, code: int) -> int:
        column = self.codes.index(code) if code in self.codes else len(self.codes)
        return self.requests + self.categories.index(category) * self.codes_per_category + column

    def bytes_slot(self, category: str) -> int:
        return self.bytes + self.categories.index(category)

    def reject_slot(self, reason: str) -> int:
        return self.rejects + self.reasons.index(reason)

    def fault_slot(self, kind: str) -> int:
        return self.faults + FAULT_KINDS.index(kind)


LAYOUT = Layout()
LATENCY_FIRST_BIT = LATENCY_BUCKET_BITS.start
LATENCY_LAST_BUCKET = LAYOUT.buckets - 1


def latency_bucket(nanoseconds: int) -> int:
    """The histogram bucket of a latency: one `bit_length`, no search."""
    bucket = nanoseconds.bit_length() - LATENCY_FIRST_BIT
    if bucket < 0:
        return 0
    return bucket if bucket < LATENCY_LAST_BUCKET else LATENCY_LAST_BUCKET


def new_counters() -> list[int]:
    return [0] * LAYOUT.size


class TelemetryArea:
    """Counter regions in memory shared across fork(): one per worker, and one
    for the control process (the last), which counts admin requests."""

    _ITEM = struct.Struct("<q")

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.region_bytes = LAYOUT.size * self._ITEM.size
        self.memory = mmap.mmap(-1, self.region_bytes * workers)  # anonymous, MAP_SHARED: children see writes
        self._format = struct.Struct(f"<{LAYOUT.size}q")

    def publish(self, worker: int, counters: list[int]) -> None:
        """A worker's tick: copy its counters into its region (one pack_into)."""
        self._format.pack_into(self.memory, worker * self.region_bytes, *counters)

    def read(self, worker: int) -> list[int]:
        return list(self._format.unpack_from(self.memory, worker * self.region_bytes))

    def total(self) -> list[int]:
        """Every region's counts, summed slot by slot (the per-region gauges are meaningless here)."""
        totals = [0] * LAYOUT.size
        for worker in range(self.workers):
            for index, value in enumerate(self._format.unpack_from(self.memory, worker * self.region_bytes)):
                totals[index] += value
        return totals

    def live_regions(self, now: float, within_s: float = 3.0) -> list[list[int]]:
        """The regions whose process ticked within `within_s` seconds."""
        regions = [self.read(worker) for worker in range(self.workers)]
        return [region for region in regions if now - region[LAYOUT.tick_unix] <= within_s]


# ---- exposition ----


@dataclass(frozen=True)
class VmState:
    vm_id: str
    generation: int
    age_s: float
    ready: bool


@dataclass
class ScrapeSources:
    """What /metrics reads besides the counters: supplied by the process that serves it."""

    totals: Callable[[], list[int]]
    vms: Callable[[], list[VmState]]
    updates: Callable[[], dict[tuple[str, str], int]]  # (result, source kind) -> count
    workers: Callable[[], int]
    sources: Callable[[], list[SourceStatus]] = list  # where each source of VM data stands


class Collector:
    """A prometheus_client collector that reads everything at scrape time."""

    def __init__(self, sources: ScrapeSources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[object]:
        totals = self.sources.totals()
        layout = LAYOUT
        requests = CounterMetricFamily(
            "fastimds_requests", "Requests answered, by category and status code.", labels=["category", "code"]
        )
        for category in layout.categories:
            for column, code in enumerate((*layout.codes, "other")):
                value = totals[layout.requests + layout.categories.index(category) * layout.codes_per_category + column]
                if value:
                    requests.add_metric([category, str(code)], value)
        yield requests

        response_bytes = CounterMetricFamily(
            "fastimds_response_bytes", "Bytes of response bodies sent, by category.", labels=["category"]
        )
        for category in layout.categories:
            response_bytes.add_metric([category], totals[layout.bytes_slot(category)])
        yield response_bytes

        buckets = []
        cumulative = 0
        for index in range(layout.buckets):
            cumulative += totals[layout.latency + index]
            bound = "+Inf" if index == layout.buckets - 1 else repr(2 ** (LATENCY_FIRST_BIT + index) / 1e9)
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "fastimds_request_duration_seconds",
            "Time from a request's bytes arriving to its reply being written.",
            buckets=buckets,
            sum_value=totals[layout.latency_sum_ns] / 1e9,
        )

        yield CounterMetricFamily(
            "fastimds_connections_opened", "Connections accepted.", value=totals[layout.connections_opened]
        )
        yield CounterMetricFamily(
            "fastimds_connections_closed", "Connections closed.", value=totals[layout.connections_closed]
        )
        open_now = totals[layout.connections_opened] - totals[layout.connections_closed]
        yield GaugeMetricFamily("fastimds_connections", "Connections open now (a second old at most).", value=open_now)

        rejects = CounterMetricFamily(
            "fastimds_rejects", "Requests (and connections) refused, by reason.", labels=["reason"]
        )
        for reason in layout.reasons:
            rejects.add_metric([reason], totals[layout.reject_slot(reason)])
        yield rejects

        vms = self.sources.vms()
        generation = GaugeMetricFamily("fastimds_snapshot_generation", "The served generation per VM.", labels=["vm"])
        age = GaugeMetricFamily(
            "fastimds_snapshot_age_seconds", "Seconds since a VM's data last changed.", labels=["vm"]
        )
        for vm in vms:
            generation.add_metric([vm.vm_id], vm.generation)
            age.add_metric([vm.vm_id], vm.age_s)
        yield generation
        yield age
        yield GaugeMetricFamily("fastimds_vms", "VMs configured.", value=len(vms))
        yield GaugeMetricFamily(
            "fastimds_vms_ready", "VMs with a snapshot to serve.", value=sum(vm.ready for vm in vms)
        )

        updates = CounterMetricFamily(
            "fastimds_updates", "VM updates, by result and source.", labels=["result", "source"]
        )
        for (result, source), value in sorted(self.sources.updates().items()):
            updates.add_metric([result, source], value)
        yield updates

        yield GaugeMetricFamily("fastimds_workers", "Worker processes serving VMs.", value=self.sources.workers())
        yield from self._source_metrics(time.time())
        yield CounterMetricFamily(
            "fastimds_log_lines_suppressed",
            "Event log lines dropped by the log rate limit.",
            value=totals[layout.log_suppressed],
        )
        faults = CounterMetricFamily(
            "fastimds_faults_injected", "Faults injected on purpose (admin API /faults), by kind.", labels=["kind"]
        )
        for kind in FAULT_KINDS:
            faults.add_metric([kind], totals[layout.fault_slot(kind)])
        yield faults

    def _source_metrics(self, now: float) -> Iterator[object]:
        labels = ["kind", "where"]
        connected = GaugeMetricFamily(
            "fastimds_source_connected", "1 while a source reaches its store (etcd); files always do.", labels=labels
        )
        synced = GaugeMetricFamily(
            "fastimds_source_synced", "1 when a source has a whole view of its store to serve.", labels=labels
        )
        revision = GaugeMetricFamily(
            "fastimds_source_revision", "The store revision a source applied last (etcd).", labels=labels
        )
        contact = GaugeMetricFamily(
            "fastimds_source_seconds_since_contact", "Seconds since a source last heard from its store.", labels=labels
        )
        resyncs = CounterMetricFamily(
            "fastimds_source_resyncs", "Full re-reads after the store compacted what a watch needed.", labels=labels
        )
        for status in self.sources.sources():
            names = [status.kind, status.where]
            connected.add_metric(names, int(status.connected))
            synced.add_metric(names, int(status.synced))
            if status.revision is not None:
                revision.add_metric(names, status.revision)
            if status.last_contact is not None:
                contact.add_metric(names, max(0.0, now - status.last_contact))
            resyncs.add_metric(names, status.resyncs)
        yield from (connected, synced, revision, contact, resyncs)


def render_metrics(sources: ScrapeSources) -> bytes:
    """The Prometheus text exposition of everything, read now."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(sources))  # type: ignore[arg-type]
    return generate_latest(registry)

"""Hot-path counters: what is counted, where, and how a scrape sums it."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastimds.http.connection import HttpProtocol
from fastimds.ops.telemetry import (
    EXPORTED_METRICS,
    FAULT_KINDS,
    LATENCY_BUCKET_BITS,
    LAYOUT,
    ScrapeSources,
    TelemetryArea,
    VmState,
    latency_bucket,
    new_counters,
    render_metrics,
)
from tests.support.fakes import FakeTransport, make_connection, request

LEAF = request("/metadata/instance/compute/vmId?api-version=2021-02-01&format=text")
DOCUMENT = request("/metadata/instance?api-version=2021-02-01")
NO_HEADER = request(headers=())
BAD_VERSION = request("/metadata/instance?api-version=1999-01-01")
VERSIONS = request("/metadata/versions")


def scrape(counters: list[int], vms: list[VmState] | None = None) -> dict[str, Any]:
    """Render /metrics from one counter list and parse it back with prometheus_client's own parser."""
    area = TelemetryArea(1)
    area.publish(0, counters)
    text = render_metrics(
        ScrapeSources(
            totals=area.total,
            vms=lambda: vms or [],
            updates=lambda: {("accepted", "admin"): 3},
            workers=lambda: 1,
        )
    ).decode()
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[key] = sample.value
    return samples


def test_slots_are_distinct_and_inside_the_layout() -> None:
    slots = [LAYOUT.request_slot(c, code) for c in LAYOUT.categories for code in (*LAYOUT.codes, 999)]
    slots += [LAYOUT.bytes_slot(c) for c in LAYOUT.categories]
    slots += [LAYOUT.latency + i for i in range(LAYOUT.buckets)]
    slots += [LAYOUT.latency_sum_ns, LAYOUT.connections_opened, LAYOUT.connections_closed]
    slots += [LAYOUT.reject_slot(r) for r in LAYOUT.reasons]
    slots += [LAYOUT.log_suppressed, LAYOUT.vms_served, LAYOUT.tick_unix]
    slots += [LAYOUT.fault_slot(kind) for kind in FAULT_KINDS]
    assert len(slots) == len(set(slots)) == LAYOUT.size
    assert min(slots) == 0
    # The request memo stores 0 for "no reject", so no reject slot may be 0.
    assert min(LAYOUT.reject_slot(reason) for reason in LAYOUT.reasons) > 0


@pytest.mark.parametrize(
    ("nanoseconds", "bucket"),
    [(0, 0), (1, 0), (1023, 0), (1024, 1), (2047, 1), (2048, 2), (10**6, 10), (2**33, 24), (10**12, 24)],
)
def test_latency_bucket_is_log2_of_nanoseconds(nanoseconds: int, bucket: int) -> None:
    assert latency_bucket(nanoseconds) == min(bucket, LAYOUT.buckets - 1)
    if bucket < LAYOUT.buckets - 1:
        assert nanoseconds < 2 ** (LATENCY_BUCKET_BITS.start + bucket)


def test_requests_are_counted_by_category_code_reject_and_bytes() -> None:
    protocol, transport, state = make_connection()
    counters = state.counters
    assert counters is not None
    for data in (LEAF, LEAF, DOCUMENT, NO_HEADER, BAD_VERSION, VERSIONS, request("/nowhere")):
        protocol.data_received(data)
    samples = scrape(counters)
    assert samples["fastimds_requests_total|category=instance|code=200"] == 3
    assert samples["fastimds_requests_total|category=instance|code=400"] == 2
    assert samples["fastimds_requests_total|category=versions|code=200"] == 1
    assert samples["fastimds_requests_total|category=other|code=404"] == 1
    assert samples["fastimds_rejects_total|reason=missing_header"] == 1
    assert samples["fastimds_rejects_total|reason=bad_version"] == 1
    assert samples["fastimds_request_duration_seconds_count"] == 7
    assert 0 < samples["fastimds_request_duration_seconds_sum"] < 1
    assert samples["fastimds_connections_opened_total"] == 1
    assert samples["fastimds_connections"] == 1
    bodies = transport.output.split(b"\r\n\r\n")
    assert samples["fastimds_response_bytes_total|category=instance"] > len(bodies[3])  # at least the document


def test_the_request_memo_counts_exactly_like_the_parser() -> None:
    parsed, _, parsed_state = make_connection()
    remembered, _, remembered_state = make_connection()
    for data in (LEAF, NO_HEADER, LEAF + DOCUMENT + NO_HEADER):
        remembered.data_received(data)  # first pass fills the memo; counted from here on too
    for counters in (parsed_state.counters, remembered_state.counters):
        assert counters is not None
        counters[:] = new_counters()
    for data in (LEAF, NO_HEADER, LEAF + DOCUMENT + NO_HEADER):
        parsed.vm.current.http_cache = None  # type: ignore[union-attr]  # forget: parse every time
        parsed.data_received(data)
        remembered.data_received(data)  # answered from the memo
    assert parsed_state.counters is not None and remembered_state.counters is not None
    skip = {LAYOUT.latency_sum_ns, *range(LAYOUT.latency, LAYOUT.latency + LAYOUT.buckets)}
    same = [i for i in range(LAYOUT.size) if i not in skip]
    assert [parsed_state.counters[i] for i in same] == [remembered_state.counters[i] for i in same]
    assert sum(remembered_state.counters[LAYOUT.latency : LAYOUT.latency + LAYOUT.buckets]) == 5


def test_protocol_errors_are_counted_as_rejects() -> None:
    protocol, _, state = make_connection()
    protocol.data_received(b"\x00garbage\r\n\r\n")
    assert state.counters is not None
    samples = scrape(state.counters)
    assert samples["fastimds_rejects_total|reason=parse_error"] == 1
    assert samples["fastimds_requests_total|category=other|code=400"] == 1


def test_connections_are_counted_open_and_closed() -> None:
    protocol, _, state = make_connection()
    other = HttpProtocol(state)
    other.connection_made(FakeTransport())
    other.connection_lost(None)
    assert state.counters is not None
    samples = scrape(state.counters)
    assert samples["fastimds_connections_opened_total"] == 2
    assert samples["fastimds_connections_closed_total"] == 1
    assert samples["fastimds_connections"] == 1
    assert protocol in state.connections


def test_telemetry_off_counts_nothing() -> None:
    protocol, transport, state = make_connection()
    state.counters = None
    off = HttpProtocol(state)
    off.connection_made(FakeTransport())
    off.data_received(LEAF)
    off.data_received(LEAF)
    assert off.counters is None and off.replies_in_read == 0
    assert protocol.counters is not None  # made before telemetry was switched off
    assert transport.output == b""


def test_scrape_reports_vms_updates_and_only_exported_names() -> None:
    vms = [VmState("a", 3, 12.5, True), VmState("b", 1, 1.0, True)]
    samples = scrape(new_counters(), vms)
    assert samples["fastimds_snapshot_generation|vm=a"] == 3
    assert samples["fastimds_snapshot_age_seconds|vm=a"] == 12.5
    assert samples["fastimds_vms"] == 2
    assert samples["fastimds_vms_ready"] == 2
    assert samples["fastimds_updates_total|result=accepted|source=admin"] == 3
    assert samples["fastimds_workers"] == 1
    families = {key.split("|")[0] for key in samples}
    for suffix in ("_bucket", "_count", "_sum", "_created"):
        families = {name.removesuffix(suffix) if name.endswith(suffix) else name for name in families}
    assert families <= EXPORTED_METRICS


def test_regions_are_shared_across_fork_and_summed() -> None:
    area = TelemetryArea(3)
    mine = new_counters()
    mine[LAYOUT.request_slot("instance", 200)] = 5
    area.publish(0, mine)
    pid = os.fork()
    if pid == 0:  # a child writes its own region, as a worker does
        theirs = new_counters()
        theirs[LAYOUT.request_slot("instance", 200)] = 7
        theirs[LAYOUT.tick_unix] = int(time.time())
        area.publish(1, theirs)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert area.read(1)[LAYOUT.request_slot("instance", 200)] == 7
    assert area.total()[LAYOUT.request_slot("instance", 200)] == 12
    assert len(area.live_regions(time.time())) == 1  # only the child ticked

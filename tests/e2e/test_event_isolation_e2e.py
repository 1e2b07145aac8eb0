"""End-to-end: one tenant's scheduled-event approvals never reach, or stall, another's (issue 16, Medium 2 and 3).

Real `fastimds serve` processes, VMs in a --data-dir, approvals POSTed from
the VMs' loopback addresses, events added through the admin API's Unix
socket. With --workers 2 --state-dir an approval crosses the bus (a file in
the approvals folder, taken by the control process), the path the flood
attacked. Every wait is bounded.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.file_arrivals import FileArrivals
from tests.support.server_process import (
    RawReader,
    admin_unix,
    get_from,
    http_from,
    poll_until,
    running_server,
)
from tests.support.server_process import vm_document as base_document

EVENTS = "/metadata/scheduledevents?api-version=2020-07-01"
INSTANCE = "/metadata/instance?api-version=2021-02-01"
LATER = {"EventType": "Reboot", "NotBeforeSeconds": 600}
# The approval flood: this many approvals from one VM, pipelined on a few connections.
FLOOD_APPROVALS = 2000
FLOOD_CONNECTIONS = 4
FLOOD_BATCH = 100  # sent, then read, at a time
# Another VM's request during the flood, on a loaded two-core machine: generous on purpose
# (before the fix, 12,000 approvals gave p99 1 s and max 5.8 s).
OTHER_VM_MAX_S = 2.0
# Approval files the flood may cause: it approves an event already Started, so none are due.
FLOOD_FILES_BOUND = 2


def approval(*event_ids: str) -> bytes:
    body = json.dumps({"StartRequests": [{"EventId": event_id} for event_id in event_ids]}).encode()
    return (
        f"POST {EVENTS} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def approve_from(source: str, port: int, *event_ids: str) -> int:
    connection = http_from(source, port)
    try:
        body = json.dumps({"StartRequests": [{"EventId": event_id} for event_id in event_ids]})
        connection.request("POST", EVENTS, body=body, headers={"Metadata": "true"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def statuses(source: str, port: int) -> dict[str, str]:
    status, body = get_from(source, port, EVENTS)
    assert status == 200, body
    return {event["EventId"]: event["EventStatus"] for event in json.loads(body)["Events"]}


def resources(source: str, port: int) -> list[list[str]]:
    status, body = get_from(source, port, EVENTS)
    assert status == 200, body
    return [event["Resources"] for event in json.loads(body)["Events"]]


def write_vm(data_dir: Path, vm_id: str, caller: str, **compute: str) -> None:
    document: dict[str, Any] = base_document(vm_id, callers=[caller])
    document["instance"]["compute"].update(compute)
    (data_dir / f"{vm_id}.json").write_text(json.dumps(document))


def write_vm_with_events(data_dir: Path, vm_id: str, caller: str, scheduled: list[dict[str, Any]]) -> None:
    document: dict[str, Any] = base_document(vm_id, callers=[caller])
    document["scheduledEvents"] = scheduled
    (data_dir / f"{vm_id}.json").write_text(json.dumps(document))


# ---- Medium 2: an approval acts only within its event's own group ----


def test_same_eventid_on_two_vms_approving_one_leaves_the_other_scheduled(tmp_path: Path) -> None:
    data_dir, state_dir, admin = tmp_path / "data", tmp_path / "state", tmp_path / "admin.sock"
    data_dir.mkdir()
    write_vm_with_events(data_dir, "vm1", "127.0.0.2", [{**LATER, "EventId": "SAME"}])
    write_vm_with_events(data_dir, "vm2", "127.0.0.3", [{**LATER, "EventId": "SAME"}])
    args = ("--data-dir", str(data_dir), "--state-dir", str(state_dir), "--admin-socket", str(admin))
    with running_server(*args, "--workers", "2") as server:
        assert statuses("127.0.0.2", server.port) == statuses("127.0.0.3", server.port) == {"SAME": "Scheduled"}
        assert approve_from("127.0.0.2", server.port, "SAME") == 200
        assert poll_until(lambda: statuses("127.0.0.2", server.port) == {"SAME": "Started"}, timeout=10)
        time.sleep(0.3)  # what the control would have done with vm2 is done by now (one approval, one pass)
        assert statuses("127.0.0.3", server.port) == {"SAME": "Scheduled"}

        # An EventId reused for an unrelated VM through the admin API is refused.
        status, body = admin_unix(admin, "POST", "/vms/vm1/scheduledevents", {**LATER, "EventId": "MINE"})
        assert status == 201, body
        status, body = admin_unix(admin, "POST", "/vms/vm2/scheduledevents", {**LATER, "EventId": "MINE"})
        assert status == 409 and "outside this group" in body["error"], body
        assert "MINE" not in statuses("127.0.0.3", server.port)


def test_two_tenants_web_scale_sets_stay_apart(tmp_path: Path) -> None:
    data_dir, admin = tmp_path / "data", tmp_path / "admin.sock"
    data_dir.mkdir()
    tenants = {
        "a": ("rg-a", "sub-a", {"a1": "127.0.0.2", "a2": "127.0.0.3"}),
        "b": ("rg-b", "sub-b", {"b1": "127.0.0.4", "b2": "127.0.0.5"}),
    }
    for group, subscription, vms in tenants.values():
        for vm_id, caller in vms.items():
            write_vm(
                data_dir, vm_id, caller, vmScaleSetName="web", resourceGroupName=group, subscriptionId=subscription
            )
    with running_server("--data-dir", str(data_dir), "--admin-socket", str(admin)) as server:
        status, body = admin_unix(admin, "POST", "/scheduledevents", {**LATER, "vmScaleSetName": "web"})
        assert status == 409, body  # two scale sets are named "web": never merged
        assert all(statuses(caller, server.port) == {} for caller in ("127.0.0.2", "127.0.0.4"))

        scope = {"vmScaleSetName": "web", "resourceGroupName": "rg-a", "subscriptionId": "sub-a"}
        status, body = admin_unix(admin, "POST", "/scheduledevents", {**LATER, **scope})
        assert status == 201 and sorted(body["generations"]) == ["a1", "a2"], body
        event_id = body["EventId"]
        assert resources("127.0.0.2", server.port) == [["a1-name", "a2-name"]]  # never the other tenant's names
        assert statuses("127.0.0.4", server.port) == statuses("127.0.0.5", server.port) == {}

        assert approve_from("127.0.0.3", server.port, event_id) == 200  # from a2: starts a1 and a2
        assert poll_until(lambda: statuses("127.0.0.2", server.port) == {event_id: "Started"}, timeout=10)
        assert statuses("127.0.0.4", server.port) == {}
        assert approve_from("127.0.0.4", server.port, event_id) == 400  # b1 does not hold it


# ---- Medium 3: an approval flood neither writes per request nor stalls other VMs ----


def _flood(port: int, source: str, per_connection: int, statuses_seen: list[int]) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    reader = RawReader(sock)
    request = approval("GONE")
    try:
        for sent in range(0, per_connection, FLOOD_BATCH):
            count = min(FLOOD_BATCH, per_connection - sent)
            sock.sendall(request * count)
            statuses_seen.extend(reader.read_response().status for _ in range(count))
    finally:
        sock.close()


def test_an_approval_flood_writes_no_file_per_request_and_others_are_answered(tmp_path: Path) -> None:
    data_dir, state_dir = tmp_path / "data", tmp_path / "state"
    data_dir.mkdir()
    write_vm_with_events(data_dir, "vm1", "127.0.0.2", [{**LATER, "EventId": "GONE", "EventStatus": "Started"}])
    write_vm(data_dir, "vm2", "127.0.0.3")
    args = ("--data-dir", str(data_dir), "--state-dir", str(state_dir), "--workers", "2")
    with running_server(*args) as server:
        assert statuses("127.0.0.2", server.port) == {"GONE": "Started"}
        latencies: list[float] = []
        other_statuses: list[int] = []
        flooding = threading.Event()
        flooding.set()

        def other_vm() -> None:
            connection = http_from("127.0.0.3", server.port)
            try:
                while flooding.is_set():
                    started = time.perf_counter()
                    connection.request("GET", INSTANCE, headers={"Metadata": "true"})
                    response = connection.getresponse()
                    response.read()
                    latencies.append(time.perf_counter() - started)
                    other_statuses.append(response.status)
            finally:
                connection.close()

        flood_statuses: list[int] = []
        with FileArrivals(state_dir / "approvals") as arrivals:
            watcher = threading.Thread(target=other_vm)
            watcher.start()
            floods = [
                threading.Thread(
                    target=_flood,
                    args=(server.port, "127.0.0.2", FLOOD_APPROVALS // FLOOD_CONNECTIONS, flood_statuses),
                )
                for _ in range(FLOOD_CONNECTIONS)
            ]
            flood_started = time.perf_counter()
            for flood in floods:
                flood.start()
            for flood in floods:
                flood.join(timeout=60)
            flood_s = time.perf_counter() - flood_started
            time.sleep(0.2)  # a batch due after the flood would be written by now
            flooding.clear()
            watcher.join(timeout=10)
        files = arrivals.count

    assert flood_statuses == [200] * FLOOD_APPROVALS  # every approval answered, 200 (spec §8)
    assert latencies and set(other_statuses) == {200}
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(
        f"\napproval flood: {FLOOD_APPROVALS} approvals in {flood_s:.2f} s, approval files written: {files};"
        f" other VM: {len(latencies)} requests, median {statistics.median(latencies) * 1000:.2f} ms,"
        f" p99 {p99 * 1000:.2f} ms, max {ordered[-1] * 1000:.2f} ms"
    )
    assert files <= FLOOD_FILES_BOUND, f"{files} approval files for {FLOOD_APPROVALS} approvals of a Started event"
    assert ordered[-1] < OTHER_VM_MAX_S

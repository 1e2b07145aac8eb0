"""End-to-end: fleet mode, real `fastimds serve --etcd` processes fed by real etcd processes.

Each test starts its own etcd (tests/support/etcd.py: Debian's etcd-server on
loopback ports, temporary data) and servers on port 0. A VM is told apart by
its caller address (127.0.0.N bound as the source). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from etcd3aio import Etcd3Client

from tests.support.etcd import EtcdCluster, make_tls, require_etcd
from tests.support.server_process import (
    ServerProcess,
    UnixHTTPConnection,
    admin_unix,
    get_from,
    log_events,
    poll_until,
    running_server,
    vm_document,
    vm_uuid,
)

API = "2021-02-01"
VMID_TEXT = f"/metadata/instance/compute/vmId?api-version={API}&format=text"
LOCATION_TEXT = f"/metadata/instance/compute/location?api-version={API}&format=text"
CALLERS = {"a": "127.0.1.1", "b": "127.0.1.2", "c": "127.0.1.3"}
SERVE = [sys.executable, "-m", "fastimds", "serve", "--port", "0"]
# A change in etcd is served within this (the fleet simulation measures the real figure: tuning.md).
APPLY_WITHIN_S = 5.0
# etcd back: served again within this (the contact interval, a retry at the capped backoff, a sync).
RECONNECT_WITHIN_S = 10.0


def key(host: str, vm: str, prefix: str = "/fastimds") -> str:
    return f"{prefix}/hosts/{host}/vms/{vm}"


def document(vm: str, location: str = "westeurope", **extra: Any) -> str:
    return json.dumps({**vm_document(vm, callers=[CALLERS[vm]], location=location), **extra})


def vmid_seen(server: ServerProcess, vm: str) -> str | None:
    status, body = get_from(CALLERS[vm], server.port, VMID_TEXT)
    return body.decode() if status == 200 else None


def location_seen(server: ServerProcess, vm: str) -> str | None:
    status, body = get_from(CALLERS[vm], server.port, LOCATION_TEXT)
    return body.decode() if status == 200 else None


def served_within(server: ServerProcess, vm: str, location: str | None, timeout: float = APPLY_WITHIN_S) -> bool:
    """True once `vm` is served with `location` (None: once it is not served at all)."""
    return poll_until(lambda: location_seen(server, vm) == location, timeout=timeout)


def status(socket_path: Path) -> tuple[int, dict[str, Any]]:
    code, body = admin_unix(socket_path, "GET", "/readyz")
    return code, body


def etcd_status(socket_path: Path) -> dict[str, Any]:
    sources = [source for source in status(socket_path)[1]["sources"] if source["kind"] == "etcd"]
    assert len(sources) == 1
    return sources[0]


@contextmanager
def cluster(tmp_path: Path, size: int = 1, **options: Any) -> Iterator[EtcdCluster]:
    require_etcd()
    started = EtcdCluster(tmp_path / "etcd", size, **options)
    try:
        yield started.start()
    finally:
        started.remove_data()  # kills the members; each data dir preallocates 128 MB of WAL


@contextmanager
def fleet_server(
    etcd: EtcdCluster | str, host: str, tmp_path: Path, *extra: str, name: str = "server"
) -> Iterator[tuple[ServerProcess, Path]]:
    admin = tmp_path / f"{name}-{host}.sock"
    endpoints = etcd if isinstance(etcd, str) else etcd.endpoints
    with running_server("--etcd", endpoints, "--host-id", host, "--admin-socket", str(admin), *extra) as server:
        yield server, admin


# ---- load, watch, delete, refused values ----


def test_a_host_serves_its_own_vms_from_etcd_and_follows_puts_and_deletes(tmp_path: Path) -> None:
    with cluster(tmp_path) as etcd:
        etcd.put(key("h1", "a"), document("a"))
        etcd.put(key("h2", "b"), document("b"))  # another host's VM: not served here
        with fleet_server(etcd, "h1", tmp_path) as (server, admin):
            # Loaded before the ready line: served at once.
            assert vmid_seen(server, "a") == vm_uuid("a")
            assert vmid_seen(server, "b") is None
            assert "vms=1" in server.ready_line
            # A new VM, a change, a removal: each followed by the watch.
            etcd.put(key("h1", "c"), document("c", location="eastus"))
            assert served_within(server, "c", "eastus")
            etcd.put(key("h1", "a"), document("a", location="northeurope"))
            assert served_within(server, "a", "northeurope")
            etcd.delete(key("h1", "c"))
            assert served_within(server, "c", None)
            source = etcd_status(admin)
            assert source["connected"] is True and source["synced"] is True
            assert source["revision"] == etcd.revision()
            assert source["seconds_since_contact"] < 3


def test_with_workers_the_control_process_follows_etcd_and_every_worker_serves_it(tmp_path: Path) -> None:
    with cluster(tmp_path) as etcd:
        etcd.put(key("h1", "a"), document("a"))
        with fleet_server(etcd, "h1", tmp_path, "--workers", "2") as (server, admin):
            assert poll_until(lambda: status(admin)[0] == 200, timeout=APPLY_WITHIN_S)
            etcd.put(key("h1", "a"), document("a", location="eastus"))
            # Every worker: each new connection lands on either one (SO_REUSEPORT), so ask many times.
            assert served_within(server, "a", "eastus")
            assert all(location_seen(server, "a") == "eastus" for _ in range(20))
            assert status(admin)[1]["workers_serving"] == [1, 1]


def test_a_bad_value_is_refused_logged_and_counted_and_the_vm_keeps_its_last_good_description(
    tmp_path: Path,
) -> None:
    with cluster(tmp_path) as etcd:
        etcd.put(key("h1", "a"), document("a", location="westeurope"))
        with fleet_server(etcd, "h1", tmp_path) as (server, admin):
            etcd.put(key("h1", "a"), '{"instance": {"compute": "not an object"}, "surprise": 1}')
            etcd.put(key("h1", "a"), "not json at all")
            etcd.put(key("h1", "c"), document("a"))  # "a"'s caller under another id: an address conflict
            etcd.put(key("h1", "a"), document("a", location="westus"))  # then a good one again lands
            assert served_within(server, "a", "westus")
            refused = log_events(server, "update_refused")
            by_error = {record["error"]: record for record in refused}
            assert all(record["source"].startswith("etcd:/fastimds/hosts/h1/vms/") for record in refused)
            invalid = [record for record in refused if record["error"] == "invalid VM description"]
            assert any("$.surprise" in " ".join(record["problems"]) for record in invalid)
            assert any("not JSON" in " ".join(record["problems"]) for record in invalid)
            conflict = next(error for error in by_error if "claimed by both" in error)
            assert "'a'" in conflict and "'c'" in conflict
            metrics = admin_unix_text(admin, "/metrics")
            assert 'fastimds_updates_total{result="refused",source="etcd"} 3.0' in metrics
            assert vmid_seen(server, "a") == vm_uuid("a")


def test_refused_while_running_keeps_serving_the_last_good_one(tmp_path: Path) -> None:
    with cluster(tmp_path) as etcd:
        etcd.put(key("h1", "a"), document("a", location="westeurope"))
        with fleet_server(etcd, "h1", tmp_path) as (server, _admin):
            etcd.put(key("h1", "a"), '{"instance": 5}')
            assert poll_until(lambda: len(log_events(server, "update_refused")) == 1, timeout=APPLY_WITHIN_S)
            assert location_seen(server, "a") == "westeurope"


def admin_unix_text(socket_path: Path, target: str) -> str:
    conn = UnixHTTPConnection(socket_path)
    try:
        conn.request("GET", target)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


# ---- two hosts: a move ----


def test_a_move_between_two_hosts_is_served_by_the_new_host_only(tmp_path: Path) -> None:
    with cluster(tmp_path) as etcd:
        etcd.put(key("h1", "a"), document("a"))
        with (
            fleet_server(etcd, "h1", tmp_path, name="one") as (one, _),
            fleet_server(etcd, "h2", tmp_path, name="two") as (two, _),
        ):
            assert vmid_seen(one, "a") == vm_uuid("a") and vmid_seen(two, "a") is None
            move(etcd, key("h1", "a"), key("h2", "a"), document("a"))
            assert poll_until(lambda: vmid_seen(two, "a") == vm_uuid("a"), timeout=APPLY_WITHIN_S)
            assert poll_until(lambda: vmid_seen(one, "a") is None, timeout=APPLY_WITHIN_S)


def move(etcd: EtcdCluster, old: str, new: str, value: str) -> None:
    """The migration transaction: delete under the old host and put under the new one, at one revision."""

    async def run() -> None:
        client = Etcd3Client(etcd.client_addresses())
        await client.connect()
        try:
            assert client.kv is not None
            kv = client.kv
            await kv.txn(compare=[], success=[kv.txn_op_delete(old), kv.txn_op_put(new, value)], failure=[])
        finally:
            await client.close()

    asyncio.run(run())


# ---- local sources beside etcd ----


def test_local_writes_to_an_etcd_vm_are_refused_naming_etcd_and_other_vms_still_work(tmp_path: Path) -> None:
    data_dir = tmp_path / "vms"
    data_dir.mkdir()
    (data_dir / "b.json").write_text(document("b"))
    with cluster(tmp_path) as etcd:
        etcd.put(key("h1", "a"), document("a"))
        with fleet_server(etcd, "h1", tmp_path, "--data-dir", str(data_dir)) as (server, admin):
            assert vmid_seen(server, "a") == vm_uuid("a") and vmid_seen(server, "b") == vm_uuid("b")
            code, body = admin_unix(admin, "PUT", "/vms/a", json.loads(document("a", location="eastus")))
            assert code == 409 and "owned by etcd" in body["error"] and key("h1", "a") in body["error"]
            code, body = admin_unix(admin, "DELETE", "/vms/a")
            assert code == 409 and "owned by etcd" in body["error"]
            code, body = admin_unix(admin, "PATCH", "/vms/a", {"instance": {"compute": {"location": "x"}}})
            assert code == 409
            assert location_seen(server, "a") == "westeurope"
            # A VM etcd does not hold is the admin API's to write.
            code, _ = admin_unix(admin, "PUT", "/vms/c", json.loads(document("c")))
            assert code == 201 and vmid_seen(server, "c") == vm_uuid("c")
            # A caller address claimed across sources: refused, both VMs named.
            etcd.put(key("h1", "d"), json.dumps(vm_document("d", callers=[CALLERS["b"]])))
            assert poll_until(lambda: bool(log_events(server, "update_refused")), timeout=APPLY_WITHIN_S)
            error = log_events(server, "update_refused")[-1]["error"]
            assert "'b'" in error and "'d'" in error
            assert vmid_seen(server, "b") == vm_uuid("b")


# ---- availability: etcd away ----


def test_a_restart_with_etcd_down_serves_the_state_dir_and_catches_up_when_etcd_returns(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with cluster(tmp_path) as etcd:
        etcd.put(key("h1", "a"), document("a", location="westeurope"))
        etcd.put(key("h1", "b"), document("b"))
        with fleet_server(etcd, "h1", tmp_path, "--state-dir", str(state)) as (server, _):
            assert vmid_seen(server, "b") == vm_uuid("b")
        etcd.stop_all()
        with fleet_server(etcd, "h1", tmp_path, "--state-dir", str(state)) as (server, admin):
            assert location_seen(server, "a") == "westeurope" and vmid_seen(server, "b") == vm_uuid("b")
            code, _ = status(admin)
            source = etcd_status(admin)
            assert code == 200 and source["connected"] is False and source["synced"] is True
            assert source["error"]
            assert poll_until(lambda: bool(log_events(server, "etcd_unreachable")), timeout=10)
            shown = subprocess.run(
                [sys.executable, "-m", "fastimds", "admin", "--socket", str(admin), "status"],
                check=False,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert shown.returncode == 0 and '"connected": false' in shown.stdout and '"synced": true' in shown.stdout
            # Back: the saved view is brought up to date; a VM deleted meanwhile goes.
            etcd.start_all()
            etcd.put(key("h1", "a"), document("a", location="eastus"))
            etcd.delete(key("h1", "b"))
            assert served_within(server, "a", "eastus", timeout=RECONNECT_WITHIN_S)
            assert served_within(server, "b", None)
            assert etcd_status(admin)["connected"] is True


def test_without_a_state_dir_the_cost_is_said_and_it_is_not_ready_until_etcd_answers(tmp_path: Path) -> None:
    with cluster(tmp_path) as etcd:
        etcd.put(key("h1", "a"), document("a"))
        etcd.stop_all()
        with fleet_server(etcd, "h1", tmp_path) as (server, admin):
            assert "without --state-dir" in server.stderr_text()
            code, _ = status(admin)
            assert code == 503 and etcd_status(admin)["synced"] is False
            assert vmid_seen(server, "a") is None
            etcd.start_all()
            assert poll_until(lambda: vmid_seen(server, "a") == vm_uuid("a"), timeout=RECONNECT_WITHIN_S)
            assert status(admin)[0] == 200


def three_members(tmp_path: Path) -> Any:
    return cluster(tmp_path, 3)


def change_while_away(etcd: EtcdCluster, away: Any) -> str:
    """With member `away` stopped: a's location changed and b deleted through the others; returns their endpoints."""
    away.stop()
    elsewhere = ",".join(member.endpoint for member in etcd.members if member is not away)
    etcd.etcdctl("put", key("h1", "a"), document("a", location="eastus"), endpoints=elsewhere)
    etcd.etcdctl("del", key("h1", "b"), endpoints=elsewhere)
    return elsewhere


def test_a_lost_member_is_followed_again_from_the_revision_after_the_last_applied(tmp_path: Path) -> None:
    """The server talks to one member; it dies, the others take writes; it returns; nothing is missed."""
    with three_members(tmp_path) as etcd:
        only = etcd.members[0]
        etcd.put(key("h1", "a"), document("a", location="westeurope"))
        etcd.put(key("h1", "b"), document("b"))
        with fleet_server(only.endpoint, "h1", tmp_path) as (server, admin):
            change_while_away(etcd, only)
            assert poll_until(lambda: etcd_status(admin)["connected"] is False, timeout=10)
            assert location_seen(server, "a") == "westeurope"  # served all along, as it was
            only.start()
            assert served_within(server, "a", "eastus", timeout=RECONNECT_WITHIN_S)
            assert served_within(server, "b", None)
            assert etcd_status(admin)["resyncs"] == 0  # resumed, not re-read
            assert log_events(server, "etcd_synced") and len(log_events(server, "etcd_synced")) == 1


def test_a_revision_compacted_while_away_forces_a_resync_that_removes_vms_deleted_meanwhile(tmp_path: Path) -> None:
    with three_members(tmp_path) as etcd:
        only = etcd.members[0]
        etcd.put(key("h1", "a"), document("a", location="westeurope"))
        etcd.put(key("h1", "b"), document("b"))
        with fleet_server(only.endpoint, "h1", tmp_path) as (server, admin):
            elsewhere = change_while_away(etcd, only)
            etcd.etcdctl("put", "/unrelated", "x", endpoints=elsewhere)
            revision = int(
                json.loads(etcd.etcdctl("get", "/unrelated", "-w", "json", endpoints=elsewhere).stdout)["header"][
                    "revision"
                ]
            )
            etcd.etcdctl("compaction", "--physical", str(revision), endpoints=elsewhere)
            only.start()
            assert served_within(server, "a", "eastus", timeout=RECONNECT_WITHIN_S)
            assert served_within(server, "b", None)
            assert etcd_status(admin)["resyncs"] == 1
            assert log_events(server, "etcd_resync")


def put_through_an_election(etcd: EtcdCluster, etcd_key: str, value: str, endpoints: str) -> None:
    """A put to `endpoints`, retried while they elect a leader (etcd's own clients retry it too)."""
    assert poll_until(
        lambda: etcd.etcdctl("put", etcd_key, value, endpoints=endpoints, check=False).returncode == 0,
        timeout=10,
        interval=0.2,
    )


def test_the_leader_killed_during_updates_fails_over_with_no_failed_read(tmp_path: Path) -> None:
    with three_members(tmp_path) as etcd:
        etcd.put(key("h1", "a"), document("a", location="westeurope"))
        with fleet_server(etcd, "h1", tmp_path) as (server, admin):
            leader = etcd.leader()
            leader.kill()
            survivors = ",".join(member.endpoint for member in etcd.members if member is not leader)
            failed = 0
            for location in ("eastus", "westus", "northeurope"):
                put_through_an_election(etcd, key("h1", "a"), document("a", location=location), survivors)
                deadline = time.monotonic() + RECONNECT_WITHIN_S
                while time.monotonic() < deadline:
                    seen = location_seen(server, "a")
                    failed += seen is None
                    if seen == location:
                        break
                    time.sleep(0.02)
                assert location_seen(server, "a") == location
            assert failed == 0
            assert poll_until(lambda: etcd_status(admin)["connected"] is True, timeout=RECONNECT_WITHIN_S)


# ---- TLS and auth ----


def test_tls_with_a_client_certificate_and_user_password_auth(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    password = tmp_path / "password"
    password.write_text("s3cret-pass\n")
    os.chmod(password, 0o600)
    with cluster(tmp_path, 3, tls=tls, client_cert_auth=True) as etcd:  # three: one channel checks every member
        etcd.enable_auth("fleet", "s3cret-pass")
        etcd.put(key("h1", "a"), document("a"))
        flags = ("--etcd-ca", str(tls.ca), "--etcd-cert", str(tls.client_cert), "--etcd-key", str(tls.client_key))
        auth = ("--etcd-user", "fleet", "--etcd-password-file", str(password))
        with fleet_server(etcd, "h1", tmp_path, *flags, *auth) as (server, _admin):
            assert vmid_seen(server, "a") == vm_uuid("a")
            etcd.put(key("h1", "a"), document("a", location="eastus"))
            assert served_within(server, "a", "eastus")
        # A wrong password: the start goes on (availability first), says why, and serves nothing of etcd's.
        password.write_text("wrong\n")
        with fleet_server(etcd, "h1", tmp_path, *flags, *auth, name="wrong") as (server, admin):
            source = etcd_status(admin)
            assert source["connected"] is False and "authentication failed" in source["error"].lower()
            assert vmid_seen(server, "a") is None


def test_a_password_file_others_can_read_is_refused_at_start(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret-pass\n")
    os.chmod(password, 0o644)
    result = subprocess.run(
        [*SERVE, "--etcd", "http://127.0.0.1:1", "--etcd-user", "u", "--etcd-password-file", str(password)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "chmod 600" in result.stderr


def test_sighup_resyncs_from_etcd(tmp_path: Path) -> None:
    with cluster(tmp_path) as etcd:
        etcd.put(key("h1", "a"), document("a"))
        with fleet_server(etcd, "h1", tmp_path) as (server, _admin):
            server.send_signal(signal.SIGHUP)
            assert poll_until(lambda: len(log_events(server, "etcd_synced")) == 2, timeout=APPLY_WITHIN_S)
            assert vmid_seen(server, "a") == vm_uuid("a")

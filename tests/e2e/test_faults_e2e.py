"""Fault injection against real server processes: what clients see, and what the admin API allows.

Most tests share one single-process server (faults apply at once there) and
remove every fault after themselves; the ones about several workers start
their own `--workers 2` server, where faults reach the workers through the
bus (so they poll until a fault shows).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import jwt
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.admin_token import write_token_file
from tests.support.identities import IDENTITIES, SYSTEM
from tests.support.server_process import (
    RawReader,
    admin_unix,
    connect,
    get_from,
    get_request,
    poll_until,
    running_server,
    vm_document,
)

INSTANCE = "/metadata/instance?api-version=2021-02-01"
LEAF = "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text"
TOKEN = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net"
ADMIN_TOKEN = "f4ults-t0ken-00112233445566778899"  # at least 32 characters, as the server requires
MESSAGES = {
    410: "Retry after some time for a max of 70 seconds",
    429: "Too many requests",
    500: "Internal server error. Retry later",
    503: "Internal service unavailable. Retry later",
}


@dataclass
class Served:
    port: int
    socket: Path
    admin_url: str

    def url(self, target: str) -> str:
        return f"http://127.0.0.1:{self.port}{target}"

    def admin(self, method: str, target: str, body: Any = None) -> tuple[int, Any]:
        return admin_unix(self.socket, method, target, body)

    def add(self, body: dict[str, Any], target: str = "/faults") -> dict[str, Any]:
        status, record = self.admin("POST", target, body)
        assert status == 201, record
        return dict(record)

    def live(self) -> list[dict[str, Any]]:
        status, body = self.admin("GET", "/faults")
        assert status == 200
        return list(body["faults"])

    def injected(self) -> dict[str, float]:
        """fastimds_faults_injected_total by kind, from /metrics."""
        text = requests.get(f"{self.admin_url}/metrics", headers=BEARER, timeout=5).text
        return {
            sample.labels["kind"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "fastimds_faults_injected_total"
        }


BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # /metrics names VM ids: on TCP it needs the token


def data_dir(root: Path) -> Path:
    directory = root / "data"
    directory.mkdir()
    first = vm_document("vm1", callers=["127.0.0.1"])
    first["identities"] = IDENTITIES
    (directory / "vm1.json").write_text(json.dumps(first))
    (directory / "vm2.json").write_text(json.dumps(vm_document("vm2", callers=["127.0.0.2"])))
    return directory


def serve(root: Path, workers: int) -> Any:
    token = root / "token"
    write_token_file(token, ADMIN_TOKEN)
    return running_server(
        "--workers",
        str(workers),
        "--data-dir",
        str(data_dir(root)),
        "--admin-socket",
        str(root / "a.sock"),
        "--admin-port",
        "0",
        "--admin-token-file",
        str(token),
    )


def served(server: Any, root: Path) -> Served:
    [admin_url] = [name for name in server.admin if name.startswith("http")]
    return Served(server.port, root / "a.sock", admin_url)


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("faults")
    with serve(root, workers=1) as server:
        yield served(server, root)


@pytest.fixture
def imds(one_worker: Served) -> Iterator[Served]:
    """The shared single-process server, with no fault before or after the test."""
    assert one_worker.live() == []
    yield one_worker
    assert one_worker.admin("DELETE", "/faults")[0] == 200


def get(target: str, imds: Served) -> requests.Response:
    return requests.get(imds.url(target), headers={"Metadata": "true"}, timeout=10)


# ---- what a client sees ----


@pytest.mark.parametrize(
    ("fault", "retry_after"),
    [
        ({"status": 410}, None),
        ({"status": 429}, "1"),  # 429 always says when
        ({"status": 429, "retryAfter": 0}, "0"),
        ({"status": 500}, None),
        ({"status": 503}, None),
        ({"status": 503, "retryAfter": 5}, "5"),
    ],
)
def test_each_status_with_its_body_and_retry_after(
    imds: Served, fault: dict[str, Any], retry_after: str | None
) -> None:
    for _ in range(2):  # the second is answered from the request memo
        assert get(LEAF, imds).status_code == 200
    imds.add(fault)
    response = get(LEAF, imds)
    assert response.status_code == fault["status"]
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {"error": MESSAGES[fault["status"]]}
    assert response.headers.get("Retry-After") == retry_after
    assert imds.admin("DELETE", "/faults")[0] == 200
    served_again = get(LEAF, imds)
    assert (served_again.status_code, served_again.headers.get("Retry-After")) == (200, None)


def test_identity_requests_get_the_identity_error_shape(imds: Served) -> None:
    imds.add({"status": 503, "retryAfter": 2, "path": "/METADATA/identity"})
    response = get(TOKEN, imds)
    assert (response.status_code, response.headers["Retry-After"]) == (503, "2")
    assert response.json() == {"error": "service_unavailable", "error_description": MESSAGES[503]}
    assert get(INSTANCE, imds).status_code == 200  # outside the fault's path


def test_a_duration_ends_the_fault(imds: Served) -> None:
    record = imds.add({"status": 500, "durationSeconds": 1.0})
    assert get(LEAF, imds).status_code == 500
    assert poll_until(lambda: get(LEAF, imds).status_code == 200, timeout=10)
    assert time.time() >= record["until"]  # not served before the fault's end
    assert imds.live() == []
    assert get(LEAF, imds).status_code == 200


def test_latency_delays_the_real_reply_and_those_pipelined_behind_it(imds: Served) -> None:
    latency = 0.5
    at_least = latency - 0.01  # the event loop's timers have millisecond steps and a cached clock
    imds.add({"latencyMs": int(latency * 1000), "path": "/metadata/instance"})
    started = time.monotonic()
    response = get(LEAF, imds)
    assert time.monotonic() - started >= at_least
    assert response.status_code == 200 and response.text == vm_document("vm1")["instance"]["compute"]["vmId"]

    with connect(imds.port) as sock:
        started = time.monotonic()
        sock.sendall(get_request(LEAF, "Metadata: true") + get_request("/metadata/versions", "Metadata: true"))
        reader = RawReader(sock)
        first, second = reader.read_response(), reader.read_response()
        assert time.monotonic() - started >= at_least
    assert (first.status, second.status) == (200, 200)
    assert b"apiVersions" not in first.body and b"apiVersions" in second.body  # in order

    assert imds.admin("DELETE", "/faults")[0] == 200
    started = time.monotonic()
    assert get(LEAF, imds).status_code == 200
    assert time.monotonic() - started < latency  # loose: undelayed replies take milliseconds


def test_a_reset_resets_and_the_next_connection_works(imds: Served) -> None:
    imds.add({"reset": True, "count": 2})
    with connect(imds.port) as sock:
        sock.sendall(get_request(LEAF, "Metadata: true"))
        with pytest.raises(ConnectionResetError):
            RawReader(sock).read_response()
    with pytest.raises(requests.ConnectionError) as caught:
        get(LEAF, imds)
    assert "ConnectionResetError" in repr(caught.value) or "Connection reset" in str(caught.value)
    assert get(LEAF, imds).status_code == 200
    assert imds.live() == []


def test_a_vm_fault_affects_only_that_vms_callers(imds: Served) -> None:
    assert get_from("127.0.0.1", imds.port, LEAF)[0] == 200
    assert get_from("127.0.0.2", imds.port, LEAF)[0] == 200
    own = imds.add({"status": 500}, target="/vms/vm1/faults")
    assert own["vms"] == ["vm1"]
    assert get_from("127.0.0.1", imds.port, LEAF)[0] == 500
    assert get_from("127.0.0.2", imds.port, LEAF)[0] == 200
    other = imds.add({"status": 410, "vms": ["vm2"]})
    assert get_from("127.0.0.2", imds.port, LEAF)[0] == 410

    status, body = imds.admin("DELETE", "/vms/vm1/faults")
    assert (status, body) == (200, {"removed": [own["id"]]})
    assert get_from("127.0.0.1", imds.port, LEAF)[0] == 200
    assert get_from("127.0.0.2", imds.port, LEAF)[0] == 410
    assert imds.admin("DELETE", f"/faults/{other['id']}") == (200, {"removed": [other["id"]]})
    assert get_from("127.0.0.2", imds.port, LEAF)[0] == 200


@pytest.mark.parametrize("status", [503, 500])
def test_azure_identity_retries_through_a_short_outage(imds: Served, status: int) -> None:
    from azure.identity import ManagedIdentityCredential

    before = imds.injected().get(str(status), 0.0)
    imds.add({"status": status, "count": 2, "path": "/metadata/identity/oauth2/token"})
    with mock.patch.dict(os.environ, {"AZURE_POD_IDENTITY_AUTHORITY_HOST": f"http://127.0.0.1:{imds.port}"}):
        token = ManagedIdentityCredential().get_token("https://vault.azure.net/.default")
    assert jwt.decode(token.token, options={"verify_signature": False})["oid"] == SYSTEM["objectId"]
    assert imds.live() == []  # both failures were used
    assert poll_until(lambda: imds.injected().get(str(status), 0.0) == before + 2, timeout=5)


def test_metrics_count_each_kind(imds: Served) -> None:
    before = imds.injected()
    assert set(before) == {"410", "429", "500", "503", "latency", "reset"}
    for fault in ({"status": 410}, {"status": 429}, {"latencyMs": 20}, {"reset": True}):
        imds.add({**fault, "count": 1})
        try:
            get(LEAF, imds)
        except requests.ConnectionError:
            assert "reset" in fault
    expected = {kind: before[kind] + (1 if kind in ("410", "429", "latency", "reset") else 0) for kind in before}
    assert poll_until(lambda: imds.injected() == expected, timeout=5), (imds.injected(), expected)


# ---- the admin API ----


def test_invalid_faults_are_refused_and_change_nothing(imds: Served) -> None:
    kept = imds.add({"status": 503, "count": 5})
    status, body = imds.admin("POST", "/faults", {"status": 404, "count": 0, "path": "x", "bogus": 1})
    assert status == 400
    assert [problem.split(":")[0] for problem in body["problems"]] == ["$.bogus", "$.status", "$.path", "$.count"]
    for target, bad in [
        ("/faults", {}),
        ("/faults", {"status": 503, "reset": True}),
        ("/faults", {"latencyMs": 0}),
        ("/faults", {"status": 500, "retryAfter": 3}),
        ("/faults", {"status": 503, "vms": []}),
        ("/faults", b"not json"),
        ("/vms/vm1/faults", {"reset": False}),
    ]:
        status, body = imds.admin("POST", target, bad)
        assert status == 400, (bad, body)
        assert body["error"]
    assert imds.admin("POST", "/faults", {"status": 503, "vms": ["nope"]})[0] == 404
    assert imds.admin("DELETE", "/faults/000000000000")[0] == 404
    assert imds.live() == [kept]
    assert get(LEAF, imds).status_code == 503  # the kept fault still applies, and only it


def test_the_tcp_admin_needs_the_token_for_faults(imds: Served) -> None:
    kept = imds.add({"status": 410})
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, target, body in [
            ("GET", "/faults", None),
            ("POST", "/faults", {"status": 503}),
            ("DELETE", "/faults", None),
            ("DELETE", f"/faults/{kept['id']}", None),
            ("POST", "/vms/vm1/faults", {"status": 503}),
            ("DELETE", "/vms/vm1/faults", None),
        ]:
            response = requests.request(method, f"{imds.admin_url}{target}", json=body, headers=headers, timeout=5)
            assert response.status_code == 401, (method, target, headers)
    assert imds.live() == [kept]
    authorized = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    listed = requests.get(f"{imds.admin_url}/faults", headers=authorized, timeout=5)
    assert (listed.status_code, listed.json()) == (200, {"faults": [kept]})
    added = requests.post(f"{imds.admin_url}/faults", json={"status": 500}, headers=authorized, timeout=5)
    assert added.status_code == 201


# ---- several workers ----


def test_a_count_is_shared_by_every_worker(tmp_path: Path) -> None:
    failures = 12
    with serve(tmp_path, workers=2) as server:
        imds = served(server, tmp_path)
        for _ in range(10):  # warm both workers' request memos
            assert get(LEAF, imds).status_code == 200
        imds.add({"status": 503, "count": failures})
        seen: list[int] = []
        deadline = time.monotonic() + 15
        while seen.count(503) < failures and time.monotonic() < deadline:
            seen.append(get(LEAF, imds).status_code)  # a new connection each: both workers take part
        assert seen.count(503) == failures, seen
        after = [get(LEAF, imds).status_code for _ in range(60)]
        assert after == [200] * 60  # not one failure more, from either worker
        assert set(seen) <= {200, 503}
        assert imds.live() == []
        assert poll_until(lambda: imds.injected()["503"] == failures, timeout=5)


def test_a_fault_reaches_every_worker_and_leaves_them(tmp_path: Path) -> None:
    with serve(tmp_path, workers=2) as server:
        imds = served(server, tmp_path)
        for _ in range(10):
            assert get(LEAF, imds).status_code == 200
        imds.add({"status": 429, "path": "/metadata/instance/compute"})
        # Every fresh connection, whichever worker takes it, fails once the workers have loaded it.
        assert poll_until(lambda: all(get(LEAF, imds).status_code == 429 for _ in range(20)), timeout=10)
        assert get(INSTANCE, imds).status_code == 200
        assert imds.admin("DELETE", "/faults")[0] == 200
        assert poll_until(lambda: all(get(LEAF, imds).status_code == 200 for _ in range(20)), timeout=10)

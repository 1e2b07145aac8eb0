"""End-to-end: the real `fastimds serve` process, real clients, loopback only.

Clients are used unmodified: http.client, requests, the curl binary (through
bash, as the seed's shell snippet does) and raw sockets for what no client
will send (pipelining, garbage, oversized heads, half-sent requests).
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

import fastimds
from fastimds.imds.datafile import load_vm
from tests.support.server_process import (
    RawReader,
    RawResponse,
    ServerProcess,
    ServerStartError,
    connect,
    exchange,
    fresh_get,
    get_request,
    log_events,
    poll_until,
    running_server,
    serve_command,
    worker_pids,
)

API = "2021-02-01"
SAMPLE_PATH = Path(fastimds.__file__).parent / "sample_vm.json"
SAMPLE_VM = load_vm(None)
VM_ID: str = SAMPLE_VM.instance["compute"]["vmId"]
LOCATION: str = SAMPLE_VM.instance["compute"]["location"]
JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"
MISSING_HEADER_BODY = {"error": "Bad request. Required metadata header not specified"}
NEWEST_VERSIONS = ["2025-04-07", "2024-07-17", "2024-03-15"]
LOCATION_TEXT = f"/metadata/instance/compute/location?api-version={API}&format=text"
INSTANCE_JSON = f"/metadata/instance?api-version={API}"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def client_env() -> dict[str, str]:
    """The environment for client subprocesses: no proxy may sit in front of loopback."""
    env = {key: value for key, value in os.environ.items() if key not in PROXY_VARIABLES}
    env["NO_PROXY"] = env["no_proxy"] = "*"
    return env


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastimds", *args],
        capture_output=True,
        text=True,
        timeout=15,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server() as process:
        yield process


@pytest.fixture(scope="module")
def limits_server() -> Iterator[ServerProcess]:
    with running_server("--max-body-bytes", "100", "--keep-alive-timeout", "1", "--request-timeout", "1") as process:
        yield process


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as client:
        client.trust_env = False  # never route loopback through an environment proxy
        yield client


def imds(session: requests.Session, server: ServerProcess, target: str, **headers: str) -> requests.Response:
    return session.get(server.url(target), headers={"Metadata": "true", **headers}, timeout=5)


# ---- startup ----


def test_ready_line_names_the_sample(server: ServerProcess) -> None:
    assert server.port > 0
    assert server.workers == 1
    assert server.vm_id == VM_ID
    assert server.ready_line.endswith("data=<embedded sample_vm.json>")
    assert server.proc.poll() is None


# ---- http.client ----


def test_http_client_instance_document(server: ServerProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", INSTANCE_JSON, headers={"Metadata": "true"})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200
        assert response.version == 11
        assert response.getheader("Content-Type") == JSON_TYPE
        assert response.getheader("Content-Length") == str(len(body))
        assert "IMDS/" in (response.getheader("Server") or "")
        date = response.getheader("Date")
        assert date is not None
        assert abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()) < 5
        document = json.loads(body)
        assert document["compute"]["vmId"] == VM_ID
        assert document["network"]["interface"][0]["macAddress"] == "6045BD8E1A2B"
        assert body == json.dumps(document, separators=(",", ":"), sort_keys=True).encode()  # compact, sorted
    finally:
        conn.close()


def test_http_client_keep_alive_reuses_one_socket(server: ServerProcess) -> None:
    targets = [
        (INSTANCE_JSON, JSON_TYPE),
        (LOCATION_TEXT, TEXT_TYPE),
        ("/metadata/versions", JSON_TYPE),
        (f"/metadata/instance/compute/vmId?api-version={API}&format=text", TEXT_TYPE),
        (f"/metadata/instance/network?api-version={API}", JSON_TYPE),
    ]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        first_socket = None
        for target, content_type in targets:
            conn.request("GET", target, headers={"Metadata": "true"})
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, (target, body)
            assert response.getheader("Content-Type") == content_type
            assert not response.will_close
            assert conn.sock is not None
            if first_socket is None:
                first_socket = conn.sock
            assert conn.sock is first_socket
        assert first_socket is not None
    finally:
        conn.close()


# ---- requests: the request rules ----


def test_missing_metadata_header_is_json_400(session: requests.Session, server: ServerProcess) -> None:
    response = session.get(server.url(INSTANCE_JSON), timeout=5)
    assert response.status_code == 400
    assert response.headers["Content-Type"] == JSON_TYPE
    assert "IMDS/" in response.headers["Server"]
    assert response.json() == MISSING_HEADER_BODY


def test_metadata_header_with_other_value_is_400(session: requests.Session, server: ServerProcess) -> None:
    response = imds(session, server, INSTANCE_JSON, Metadata="false")
    assert response.status_code == 400
    assert response.json() == MISSING_HEADER_BODY


def test_metadata_true_capitalised_is_accepted(session: requests.Session, server: ServerProcess) -> None:
    response = imds(session, server, INSTANCE_JSON, Metadata="True")
    assert response.status_code == 200
    assert response.json()["compute"]["vmId"] == VM_ID


def test_x_forwarded_for_is_json_400(session: requests.Session, server: ServerProcess) -> None:
    response = imds(session, server, INSTANCE_JSON, **{"X-Forwarded-For": "10.1.2.3"})
    assert response.status_code == 400
    assert response.headers["Content-Type"] == JSON_TYPE
    assert "X-Forwarded-For" in response.json()["error"]


def test_leaf_without_format_text_is_400(session: requests.Session, server: ServerProcess) -> None:
    for target in (
        f"/metadata/instance/compute/location?api-version={API}",
        f"/metadata/instance/compute/location?api-version={API}&format=json",
    ):
        response = imds(session, server, target)
        assert response.status_code == 400, target
        assert response.headers["Content-Type"] == JSON_TYPE
        assert "format=text" in response.json()["error"]


def test_leaf_without_api_version_lists_newest_versions(session: requests.Session, server: ServerProcess) -> None:
    # MSAL region discovery: a leaf, format=json, no api-version → the api-version 400.
    response = imds(session, server, "/metadata/instance/compute/location?format=json")
    assert response.status_code == 400
    body = response.json()
    assert body["newest-versions"] == NEWEST_VERSIONS
    assert "api-version" in body["error"]


def test_unknown_api_version_is_400(session: requests.Session, server: ServerProcess) -> None:
    response = imds(session, server, "/metadata/instance?api-version=2017-07-01")
    assert response.status_code == 400
    assert response.json()["newest-versions"] == NEWEST_VERSIONS


def test_versions_list(session: requests.Session, server: ServerProcess) -> None:
    response = imds(session, server, "/metadata/versions")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == JSON_TYPE
    versions = response.json()["apiVersions"]
    assert len(versions) == 35
    assert versions[0] == "2017-03-01"
    assert versions[-1] == "2025-04-07"
    assert versions == sorted(versions)


def test_unknown_paths_are_json_404(session: requests.Session, server: ServerProcess) -> None:
    for target in (
        f"/metadata/nothing?api-version={API}",
        f"/metadata/instance/compute/nothing?api-version={API}&format=text",
        f"/metadata/instance/location?api-version={API}&format=text",  # compute/ missing (Scylla)
        f"/metadata/instance/network/interface/7?api-version={API}",
        "/other",
    ):
        response = imds(session, server, target)
        assert response.status_code == 404, target
        assert response.headers["Content-Type"] == JSON_TYPE
        assert "error" in response.json()


def test_post_is_405_with_allow(session: requests.Session, server: ServerProcess) -> None:
    response = session.post(server.url(INSTANCE_JSON), headers={"Metadata": "true"}, data=b"{}", timeout=5)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD"
    assert response.headers["Content-Type"] == JSON_TYPE
    assert "POST" in response.json()["error"]


def test_head_has_get_headers_and_no_body(session: requests.Session, server: ServerProcess) -> None:
    get = imds(session, server, INSTANCE_JSON)
    head = session.head(server.url(INSTANCE_JSON), headers={"Metadata": "true"}, timeout=5)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["Content-Length"] == str(len(get.content))

    def without_date(response: requests.Response) -> dict[str, str]:
        return {key.lower(): value for key, value in response.headers.items() if key.lower() != "date"}

    assert without_date(head) == without_date(get)
    assert "Date" in head.headers


def test_text_listing_of_a_container(session: requests.Session, server: ServerProcess) -> None:
    response = imds(session, server, f"/metadata/instance?api-version={API}&format=text")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == TEXT_TYPE
    assert response.text == "compute/\nnetwork/"


def test_duplicate_query_parameter_is_400(session: requests.Session, server: ServerProcess) -> None:
    response = imds(session, server, f"/metadata/instance?api-version={API}&api-version={API}")
    assert response.status_code == 400
    assert response.headers["Content-Type"] == JSON_TYPE
    assert "error" in response.json()


def test_version_gating(session: requests.Session, server: ServerProcess) -> None:
    old = imds(session, server, f"/metadata/instance/compute/physicalZone?api-version={API}&format=text")
    assert old.status_code == 404
    new = imds(session, server, "/metadata/instance/compute/physicalZone?api-version=2023-11-15&format=text")
    assert new.status_code == 200
    assert new.text == "westeurope-AZ02"
    assert "physicalZone" not in imds(session, server, INSTANCE_JSON).json()["compute"]
    newest = imds(session, server, "/metadata/instance?api-version=2025-04-07").json()
    assert newest["compute"]["physicalZone"] == "westeurope-AZ02"


def test_extended_true(session: requests.Session, server: ServerProcess) -> None:
    # cloud-init's first request.
    response = imds(session, server, "/metadata/instance?api-version=2021-08-01&extended=true")
    assert response.status_code == 200
    # hasCustomData is a JSON boolean: cloud-init tests it for truth, and "false" would be true (spec §3.7).
    assert b'"extended":{"compute":{"hasCustomData":false,"ppsType":"None"}}' in response.content
    document = response.json()
    assert document["extended"] == {"compute": {"hasCustomData": False, "ppsType": "None"}}
    assert not document["extended"]["compute"]["hasCustomData"]
    assert document["compute"]["vmId"] == VM_ID
    plain = imds(session, server, "/metadata/instance?api-version=2021-08-01").json()
    assert "extended" not in plain


def test_route_parameters_into_arrays(session: requests.Session, server: ServerProcess) -> None:
    target = f"/metadata/instance/network/interface/1/ipv4/ipAddress/0/privateIpAddress?api-version={API}&format=text"
    response = imds(session, server, target)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == TEXT_TYPE
    assert response.text == "10.0.1.4"


# ---- curl ----


def test_curl_shell_usage(server: ServerProcess) -> None:
    # The seed blog post's bash snippet, verbatim but for the host.
    url = f"http://127.0.0.1:{server.port}/metadata/instance/compute/vmId?api-version=2017-04-02&format=text"
    script = f'vmid=$(curl -s -H Metadata:True "{url}" 2>/dev/null); echo "$vmid"'
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=15, env=client_env(), check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == VM_ID + "\n"


def test_curl_http_1_0_gets_connection_close(server: ServerProcess) -> None:
    result = subprocess.run(
        [
            "/usr/bin/curl",
            "-s",
            "-i",
            "--http1.0",
            "--max-time",
            "10",
            "-H",
            "Metadata: true",
            server.url(LOCATION_TEXT),
        ],
        capture_output=True,
        timeout=15,
        env=client_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].split(" ", 2)[1] == "200"
    assert "Connection: close" in lines[1:]
    assert body == LOCATION.encode()


# ---- raw sockets ----


def test_pipelined_requests_answered_in_order(server: ServerProcess) -> None:
    vm_id_target = f"/metadata/instance/compute/vmId?api-version={API}&format=text"
    with connect(server.port) as sock:
        sock.sendall(get_request(LOCATION_TEXT, "Metadata: true") + get_request(vm_id_target, "Metadata: true"))
        reader = RawReader(sock)
        first = reader.read_response()
        second = reader.read_response()
        assert (first.status, first.body) == (200, LOCATION.encode())
        assert (second.status, second.body) == (200, VM_ID.encode())
        assert first.header("Connection") is None
        # Still open: a third request on the same connection works.
        sock.sendall(get_request(LOCATION_TEXT, "Metadata: true"))
        assert reader.read_response().body == LOCATION.encode()


def test_pipelined_head_sends_no_body(server: ServerProcess) -> None:
    with connect(server.port) as sock:
        sock.sendall(
            get_request(LOCATION_TEXT, "Metadata: true", method="HEAD") + get_request(LOCATION_TEXT, "Metadata: true")
        )
        reader = RawReader(sock)
        head = reader.read_response(head_only=True)
        assert head.status == 200
        assert head.header("Content-Length") == str(len(LOCATION))
        get = reader.read_response()  # would fail to parse if the HEAD reply carried a body
        assert (get.status, get.body) == (200, LOCATION.encode())


def test_connection_close_request_closes(server: ServerProcess) -> None:
    with connect(server.port) as sock:
        sock.sendall(get_request(LOCATION_TEXT, "Metadata: true", "Connection: close"))
        reader = RawReader(sock)
        response = reader.read_response()
        assert (response.status, response.body) == (200, LOCATION.encode())
        assert response.header("Connection") == "close"
        assert reader.at_eof()


def assert_error_and_close(port: int, request: bytes, status: int) -> RawResponse:
    """Send `request` raw; the reply must be `status` with a JSON error, then the server closes."""
    with connect(port) as sock:
        sock.sendall(request)
        reader = RawReader(sock)
        response = reader.read_response()
        assert response.status == status
        assert response.header("Connection") == "close"
        assert "error" in json.loads(response.body)
        assert reader.at_eof()
    return response


def test_garbage_gets_400_and_close(server: ServerProcess) -> None:
    response = assert_error_and_close(server.port, b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n", 400)
    assert response.header("Content-Type") == JSON_TYPE


def test_url_over_limit_is_414(server: ServerProcess) -> None:
    target = f"/metadata/instance?api-version={API}&pad=" + "a" * 3000
    assert_error_and_close(server.port, get_request(target, "Metadata: true"), 414)


def test_too_many_headers_is_431(server: ServerProcess) -> None:
    headers = [f"X-Filler-{index}: {index}" for index in range(70)]
    assert_error_and_close(server.port, get_request(INSTANCE_JSON, "Metadata: true", *headers), 431)


# What curl --http2 sends on plain http:// (an h2c upgrade offer).
H2C_UPGRADE_HEADERS = (
    "Connection: Upgrade, HTTP2-Settings",
    "Upgrade: h2c",
    "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
)


def test_h2c_upgrade_offer_gets_an_announced_close_or_a_usable_connection(server: ServerProcess) -> None:
    # The server may ignore the offer (RFC 9110 §7.8) and keep the connection, or
    # close it; but a close right after a reply that promised keep-alive makes a
    # client reuse a dead connection (curl logs "Connection 0 seems to be dead").
    with connect(server.port) as sock:
        sock.sendall(get_request(LOCATION_TEXT, "Metadata: true", *H2C_UPGRADE_HEADERS))
        reader = RawReader(sock)
        response = reader.read_response()
        assert (response.status, response.body) == (200, LOCATION.encode())
        sock.settimeout(1)
        try:
            closed = reader.at_eof()
        except TimeoutError:
            closed = False
        if closed:
            assert response.header("Connection") == "close", (
                f"the server closed the connection after a reply without Connection: close: {response.raw_head!r}"
            )
        else:
            sock.sendall(get_request(LOCATION_TEXT, "Metadata: true"))
            assert reader.read_response().body == LOCATION.encode()


def test_body_over_limit_is_413(limits_server: ServerProcess) -> None:
    body = b"x" * 200
    request = get_request(INSTANCE_JSON, "Metadata: true", f"Content-Length: {len(body)}", method="POST") + body
    assert_error_and_close(limits_server.port, request, 413)


def test_body_under_limit_is_not_413(limits_server: ServerProcess) -> None:
    body = b"x" * 50
    request = get_request(INSTANCE_JSON, "Metadata: true", f"Content-Length: {len(body)}", method="POST") + body
    response = exchange(limits_server.port, request)
    assert response.status == 405


def test_idle_keep_alive_connection_is_closed(limits_server: ServerProcess) -> None:
    with connect(limits_server.port) as sock:
        sock.sendall(get_request(LOCATION_TEXT, "Metadata: true"))
        reader = RawReader(sock)
        assert reader.read_response().status == 200
        answered = time.monotonic()
        assert reader.at_eof()  # blocks until the server closes (socket timeout 5 s)
        assert time.monotonic() - answered < 3.0


def test_unfinished_request_gets_408(limits_server: ServerProcess) -> None:
    with connect(limits_server.port) as sock:
        sent = time.monotonic()
        sock.sendall(b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: t")
        reader = RawReader(sock)
        response = reader.read_response()
        assert time.monotonic() - sent < 3.0
        assert response.status == 408
        assert response.header("Connection") == "close"
        assert "error" in json.loads(response.body)
        assert reader.at_eof()


# ---- workers ----


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "0A":  # 0A = LISTEN
                inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def control_pid(server: ServerProcess) -> int:
    [pid] = {record["pid"] for record in log_events(server, "control_ready")} & set(server.child_pids())
    return int(pid)


def test_two_workers_share_the_port() -> None:
    with running_server("--workers", "2") as server:
        assert server.workers == 2
        children = worker_pids(server)
        assert len(children) == 2
        assert set(server.child_pids()) == children | {control_pid(server)}
        listening = _listening_inodes(server.port)
        assert len(listening) == 2  # one SO_REUSEPORT socket per worker, none left in the supervisor
        for child in children:
            assert _socket_inodes(child) & listening, f"worker {child} does not listen on {server.port}"
        assert not _socket_inodes(server.pid) & listening
        assert not _socket_inodes(control_pid(server)) & listening  # the control process serves no VM
        for _ in range(50):
            assert fresh_get(server.port, LOCATION_TEXT) == (200, LOCATION.encode())
        assert server.stop() == 0
        assert all(_is_zombie_or_gone(child) for child in children)


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _kill_worker_and_wait_for_replacement(server: ServerProcess) -> tuple[int, int]:
    """SIGKILL one worker; wait until the supervisor has a ready replacement. Returns (killed, replacement)."""
    before = worker_pids(server)
    killed = min(before)
    os.kill(killed, signal.SIGKILL)

    def replaced() -> bool:
        workers = worker_pids(server)
        return len(workers) == len(before) and killed not in workers

    assert poll_until(replaced), f"worker {killed} was not replaced: {server.child_pids()}"
    [replacement] = worker_pids(server) - before
    return killed, replacement


def test_killed_worker_is_replaced() -> None:
    with running_server("--workers", "2") as server:
        assert len(worker_pids(server)) == 2
        killed, _ = _kill_worker_and_wait_for_replacement(server)
        [exited] = log_events(server, "worker_exited")
        assert (exited["child_pid"], exited["status"]) == (killed, -signal.SIGKILL)
        for _ in range(40):
            assert fresh_get(server.port, LOCATION_TEXT) == (200, LOCATION.encode())
        assert server.stop() == 0


def test_second_server_cannot_share_a_port_in_use(tmp_path: Path) -> None:
    # SO_REUSEPORT lets any socket of the same user join the port; a second
    # fastimds must still refuse a port that another server is serving.
    other = tmp_path / "other.json"
    _write_vm(other, "northeurope")
    with (
        running_server("--workers", "2") as first,
        running_server("--workers", "2", "--port", str(first.port), "--data", str(other), wait_ready=False) as second,
    ):
        try:
            second.wait_ready()
        except ServerStartError:
            assert second.proc.poll() not in (None, 0)
            return
        served = Counter(fresh_get(first.port, LOCATION_TEXT)[1] for _ in range(40))
        pytest.fail(
            f"a second server started on port {first.port}, which the first is serving; "
            f"40 connections to it were split between the two servers' data: {dict(served)}"
        )


def _full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is already full, so the next write to it blocks until it is read."""
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(write_fd, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_fd, b"#" * 4096)
    os.set_blocking(write_fd, True)
    return read_fd, write_fd


def _drain(read_fd: int) -> None:
    """Read what a pipe holds now, without blocking."""
    os.set_blocking(read_fd, False)
    with contextlib.suppress(BlockingIOError):
        while os.read(read_fd, 65536):
            pass


def test_sigterm_before_the_ready_line_leaves_no_worker(tmp_path: Path) -> None:
    # The supervisor's stdout is a full pipe (a backed-up log collector), so
    # it is stuck printing its ready line after every worker reported ready.
    # SIGTERM then must still stop the workers, not orphan them.
    read_fd, write_fd = _full_pipe()
    stderr_path = tmp_path / "stderr.log"
    try:
        with open(stderr_path, "wb") as stderr_file:
            proc = subprocess.Popen(
                serve_command(["--workers", "2"]),
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                stderr=stderr_file,
                start_new_session=True,
            )
        os.close(write_fd)
        server = ServerProcess(proc, stderr_path)
        try:
            assert poll_until(lambda: len(log_events(server, "worker_ready")) == 2, timeout=15)
            assert poll_until(lambda: len(log_events(server, "control_ready")) == 1, timeout=15)
            workers = server.child_pids()
            assert len(workers) == 3  # two workers and the control process
            time.sleep(0.2)  # the supervisor reaches its (blocked) ready line
            server.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            _drain(read_fd)
            code = server.wait_exit(timeout=10)
            poll_until(lambda: all(_is_zombie_or_gone(pid) for pid in workers), timeout=3)
            survivors = [pid for pid in workers if not _is_zombie_or_gone(pid)]
            assert not survivors, (
                f"the supervisor exited with {code} on SIGTERM before its ready line and left its workers "
                f"{survivors} running (orphaned, still serving the port)"
            )
        finally:
            server.kill_group()
    finally:
        os.close(read_fd)


# ---- SIGHUP reload ----


def _write_vm(path: Path, location: str) -> None:
    document = json.loads(SAMPLE_PATH.read_bytes())
    document["instance"]["compute"]["location"] = location
    path.write_text(json.dumps(document))


def _location(port: int) -> bytes:
    status, body = fresh_get(port, LOCATION_TEXT)
    assert status == 200
    return body


def test_sighup_reloads_and_refuses_bad_data(tmp_path: Path) -> None:
    data = tmp_path / "vm.json"
    _write_vm(data, LOCATION)
    with running_server("--data", str(data)) as server:
        assert server.ready_line.endswith(f"data={data}")
        assert _location(server.port) == LOCATION.encode()

        _write_vm(data, "northeurope")
        server.send_signal(signal.SIGHUP)
        assert poll_until(lambda: _location(server.port) == b"northeurope")
        published = log_events(server, "reload_published")
        assert [record["generation"] for record in published] == [2]

        data.write_text("{not json")
        server.send_signal(signal.SIGHUP)
        assert poll_until(lambda: bool(log_events(server, "reload_refused")))
        time.sleep(0.2)
        assert _location(server.port) == b"northeurope"
        [refused] = log_events(server, "reload_refused")
        assert refused["source"] == str(data)
        assert refused["serving_generation"] == 2
        assert any("not valid JSON" in problem for problem in refused["problems"])
        assert server.proc.poll() is None
        assert server.stop() == 0


def test_sighup_reload_reaches_every_worker(tmp_path: Path) -> None:
    data = tmp_path / "vm.json"
    _write_vm(data, LOCATION)
    with running_server("--data", str(data), "--workers", "2") as server:
        children = server.child_pids()
        workers = worker_pids(server)
        assert len(workers) == 2

        def every_connection_serves(location: bytes) -> bool:
            return all(_location(server.port) == location for _ in range(20))

        assert every_connection_serves(LOCATION.encode())
        _write_vm(data, "northeurope")
        server.send_signal(signal.SIGHUP)
        assert poll_until(lambda: every_connection_serves(b"northeurope"))
        # The control process reloads once; each worker applies generation 2 from the bus.
        [published] = log_events(server, "reload_published")
        assert published["pid"] == control_pid(server)
        applied = [r for r in log_events(server, "update_applied") if r["generation"] == 2]
        assert {record["pid"] for record in applied} == workers

        document = json.loads(data.read_text())
        del document["instance"]
        data.write_text(json.dumps(document))
        server.send_signal(signal.SIGHUP)
        assert poll_until(lambda: len(log_events(server, "reload_refused")) == 1)
        [refused] = log_events(server, "reload_refused")
        assert "$.instance: required key is missing" in refused["problems"]
        assert every_connection_serves(b"northeurope")
        assert server.child_pids() == children  # a refused reload kills no process
        assert server.stop() == 0


def test_replacement_worker_serves_reloaded_data(tmp_path: Path) -> None:
    data = tmp_path / "vm.json"
    _write_vm(data, LOCATION)
    with running_server("--data", str(data), "--workers", "2") as server:
        _write_vm(data, "northeurope")
        server.send_signal(signal.SIGHUP)
        assert poll_until(lambda: len(log_events(server, "reload_published")) == 1)
        _kill_worker_and_wait_for_replacement(server)
        served = Counter(_location(server.port) for _ in range(40))
        assert served == {b"northeurope": 40}, (
            f"after a worker was replaced, 40 connections were served {dict(served)}: "
            "the replacement serves the data loaded at startup, not the data published by the last SIGHUP"
        )


# ---- SIGTERM ----


def test_sigterm_exits_zero() -> None:
    with running_server() as server:
        assert _location(server.port) == LOCATION.encode()
        started = time.monotonic()
        assert server.stop(timeout=5) == 0
        assert time.monotonic() - started < 3.0


def test_sigterm_closes_idle_keep_alive_connection() -> None:
    with running_server() as server, connect(server.port) as sock:
        sock.sendall(get_request(LOCATION_TEXT, "Metadata: true"))
        reader = RawReader(sock)
        response = reader.read_response()
        assert response.status == 200
        assert response.header("Connection") is None  # kept alive
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit(timeout=5) == 0
        assert time.monotonic() - started < 3.0
        assert reader.at_eof()


def test_sigterm_lets_in_flight_request_finish() -> None:
    with running_server() as server, connect(server.port) as sock:
        sock.sendall(get_request(LOCATION_TEXT, "Metadata: true")[:-2])  # the head, less its final CRLF
        time.sleep(0.3)  # let the server read the partial head
        server.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert server.proc.poll() is None  # waiting for the request in flight
        with pytest.raises(ConnectionRefusedError):
            connect(server.port).close()  # no longer accepting
        sock.sendall(b"\r\n")
        reader = RawReader(sock)
        response = reader.read_response()
        assert (response.status, response.body) == (200, LOCATION.encode())
        assert response.header("Connection") == "close"
        assert reader.at_eof()
        assert server.wait_exit(timeout=5) == 0


# ---- validate, and serve with a bad file ----


def test_validate_accepts_the_sample() -> None:
    result = run_cli("validate", str(SAMPLE_PATH))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{SAMPLE_PATH}: valid"


def _bad_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(SAMPLE_PATH.read_bytes())
    document["bogus"] = 1
    document["instance"]["compute"]["tagsList"] = {"name": "a", "value": "b"}
    del document["instance"]["network"]
    return document


BAD_DOCUMENT_PATHS = ("$.bogus", "$.instance.compute.tagsList", "$.instance.network")


def test_validate_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_bad_document()))
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert lines[0] == f"{bad}: invalid (3 problems)"
    problems = [line.strip() for line in lines[1:]]
    assert len(problems) == 3
    for json_path in BAD_DOCUMENT_PATHS:
        assert any(problem.startswith(json_path + ":") for problem in problems), (json_path, problems)
    assert any("unknown top-level key" in problem for problem in problems)
    assert any("expected an array, got an object" in problem for problem in problems)
    assert any("required key is missing" in problem for problem in problems)


def test_validate_rejects_non_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    assert result.stdout.splitlines()[0] == f"{bad}: invalid (1 problem)"
    assert "$: not valid JSON" in result.stdout


def test_serve_refuses_bad_data(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_bad_document()))
    result = run_cli("serve", "--port", "0", "--data", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""  # no ready line
    assert f"cannot serve {bad}" in result.stderr
    for json_path in BAD_DOCUMENT_PATHS:
        assert json_path + ":" in result.stderr

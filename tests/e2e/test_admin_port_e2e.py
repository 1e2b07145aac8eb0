"""End-to-end: the TCP admin port against any local user (issue 16, items 5 and 9).

Any local user can connect to the loopback admin port; only the token
guards what it shows. Each test runs the real `fastimds serve` and attacks
it as such a user would, from loopback with no token: many idle
connections, requests that never finish, bodies sent with a wrong token,
a scrape of /metrics. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fastimds.control.admin_connection import (
    ADMIN_IDLE_TIMEOUT_S,
    ADMIN_REQUEST_TIMEOUT_S,
    MAX_ADMIN_TCP_CONNECTIONS,
)
from tests.support.admin_token import write_token_file
from tests.support.server_process import (
    ServerProcess,
    admin_unix,
    get_from,
    poll_until,
    running_server,
    vm_document,
    vm_uuid,
)

INSTANCE = "/metadata/instance?api-version=2021-02-01"
# More idle connections than the cap, and more than the server has descriptors
# for under FD_LIMIT: on the old code they took every descriptor it had.
FLOOD_CONNECTIONS = 300
# The server's open-files limit (soft and hard) during the flood: low enough
# that FLOOD_CONNECTIONS exhaust it when nothing caps them.
FD_LIMIT = 256
WITH_FD_LIMIT = ("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}")
# A 1 MiB body, sent with a wrong token, on this many connections held open at once, this many times.
BODY_BYTES = 1024 * 1024
BODY_CONNECTIONS = 50
BODY_ROUNDS = 6
# The server's RSS may grow by less than this over every round (the old code: a body each, ~1 MiB per connection).
RSS_GROWTH_BOUND_KIB = 24 * 1024
# Slack on a deadline: the sweep runs once a second, and the machine may be loaded.
SWEEP_SLACK_S = 4.0


def read_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def admin_port(server: ServerProcess) -> int:
    [url] = [name for name in server.admin if name.startswith("http")]
    return int(url.rsplit(":", 1)[1])


def vm_seen(server: ServerProcess, caller: str) -> str | None:
    status, body = get_from(caller, server.port, INSTANCE)
    return str(json.loads(body)["compute"]["vmId"]) if status == 200 else None


@contextlib.contextmanager
def served(tmp_path: Path, *prefix: str) -> Iterator[tuple[ServerProcess, str, Path]]:
    """A server with a --data-dir (vm1 on 127.0.0.2), the TCP admin port and the Unix socket."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "vm1.json").write_text(json.dumps(vm_document("vm1", callers=["127.0.0.2"])))
    token_file = tmp_path / "token"
    token = write_token_file(token_file)
    socket_path = tmp_path / "admin.sock"
    args = ("--data-dir", str(data_dir), "--admin-socket", str(socket_path), "--admin-port", "0")
    with running_server(*args, "--admin-token-file", str(token_file), prefix=prefix) as server:
        yield server, token, data_dir


def first_bytes(socks: list[socket.socket], seconds: float) -> dict[socket.socket, bytes]:
    """What each socket received first (b"" for an end of file) within `seconds`; silent ones are left out."""
    got: dict[socket.socket, bytes] = {}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while len(got) < len(socks) and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(min(remaining, 0.2)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    got[sock] = sock.recv(4096)
                except ConnectionResetError:
                    got[sock] = b""
                selector.unregister(sock)
    return got


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_idle_admin_connections_past_the_cap_get_503_and_the_vm_port_and_the_watch_keep_working(
    tmp_path: Path,
) -> None:
    with served(tmp_path, *WITH_FD_LIMIT) as (server, token, data_dir):
        port = admin_port(server)
        flood = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(FLOOD_CONNECTIONS)]
        try:
            # Past the cap: a 503 and an end of file. Within it: silence (idle, not yet expired).
            answers = first_bytes(flood, seconds=3)
            refused = [sock for sock, data in answers.items() if data.startswith(b"HTTP/1.1 503 ")]
            print(f"\n{FLOOD_CONNECTIONS} idle admin connections: {len(refused)} refused with 503")
            assert len(refused) == FLOOD_CONNECTIONS - MAX_ADMIN_TCP_CONNECTIONS, answers
            assert b"too many admin connections" in answers[refused[0]]
            idle = [sock for sock in flood if sock not in answers]
            assert len(idle) == MAX_ADMIN_TCP_CONNECTIONS

            # The VM port serves, the data-dir watch applies a new file, the Unix socket answers its owner.
            started = time.monotonic()
            assert vm_seen(server, "127.0.0.2") == vm_uuid("vm1")
            print(f"a VM request during the flood: {(time.monotonic() - started) * 1000:.1f} ms")
            (data_dir / "vm2.json").write_text(json.dumps(vm_document("vm2", callers=["127.0.0.3"])))
            assert poll_until(lambda: vm_seen(server, "127.0.0.3") == vm_uuid("vm2"), timeout=10)
            assert admin_unix(tmp_path / "admin.sock", "GET", "/vms")[0] == 200
            assert "EMFILE" not in server.stderr_text() and "Too many open files" not in server.stderr_text()

            # The admitted idle ones are closed at their deadline, and their slots serve again.
            closed = first_bytes(idle, seconds=ADMIN_IDLE_TIMEOUT_S + SWEEP_SLACK_S)
            assert len(closed) == len(idle) and set(closed.values()) == {b""}
            ok = requests.get(f"http://127.0.0.1:{port}/vms", headers={"Authorization": f"Bearer {token}"}, timeout=5)
            assert ok.status_code == 200
        finally:
            for sock in flood:
                sock.close()
        assert server.proc.poll() is None


def test_idle_and_half_sent_admin_connections_end_at_their_deadlines(tmp_path: Path) -> None:
    with served(tmp_path) as (server, _token, _data_dir):
        port = admin_port(server)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as idle,
            socket.create_connection(("127.0.0.1", port), timeout=5) as slow,
        ):
            started = time.monotonic()
            slow.sendall(b"PUT /vms/x HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
            [idle_end] = first_bytes([idle], seconds=ADMIN_IDLE_TIMEOUT_S + SWEEP_SLACK_S).values()
            idle_after = time.monotonic() - started
            assert idle_end == b""  # closed without a word
            reply = first_bytes([slow], seconds=ADMIN_REQUEST_TIMEOUT_S + SWEEP_SLACK_S)
            slow_after = time.monotonic() - started
            print(
                f"\nidle admin connection closed after {idle_after:.1f} s, a half-sent request after {slow_after:.1f} s"
            )
            assert reply[slow].startswith(b"HTTP/1.1 408 "), reply
            assert ADMIN_IDLE_TIMEOUT_S - 1 <= idle_after <= ADMIN_IDLE_TIMEOUT_S + SWEEP_SLACK_S
            assert ADMIN_REQUEST_TIMEOUT_S - 1 <= slow_after <= ADMIN_REQUEST_TIMEOUT_S + SWEEP_SLACK_S


def wrong_token_post(port: int) -> bytes:
    return (
        b"POST /vms/vm1/faults HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % BODY_BYTES
    )


def test_a_wrong_token_is_refused_before_the_body_and_bodies_are_never_buffered(tmp_path: Path) -> None:
    with served(tmp_path) as (server, _token, _data_dir):
        port = admin_port(server)
        # The 401 comes as soon as the head is complete: the body has not been sent.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(wrong_token_post(port))
            [reply] = first_bytes([sock], seconds=5).values()
            assert reply.startswith(b"HTTP/1.1 401 "), reply
            assert b"Connection: close" in reply
            assert first_bytes([sock], seconds=5)[sock] == b""  # and the connection ends

        # Many such requests, each sending its whole body (but its last byte) and held open.
        rss_before = read_status(server.pid, "VmRSS")
        body = b"x" * (BODY_BYTES - 1)
        growth = []
        for _ in range(BODY_ROUNDS):
            held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(BODY_CONNECTIONS)]
            try:
                for sock in held:
                    with contextlib.suppress(OSError):  # the server may already have closed it
                        sock.sendall(wrong_token_post(port) + body)
                answers = first_bytes(held, seconds=5)
                # A 401 each (or a 503 where the last round's closes were not yet seen by the server).
                statuses = [data[:12] for data in answers.values() if data]
                assert set(statuses) <= {b"HTTP/1.1 401", b"HTTP/1.1 503"}, statuses
                assert statuses.count(b"HTTP/1.1 401") >= BODY_CONNECTIONS // 2, statuses
                growth.append(read_status(server.pid, "VmRSS") - rss_before)
            finally:
                for sock in held:
                    sock.close()
        sent_mib = BODY_ROUNDS * BODY_CONNECTIONS * BODY_BYTES >> 20
        print(f"\n{sent_mib} MiB of bodies with a wrong token: RSS growth after each round {growth} KiB")
        assert max(growth) < RSS_GROWTH_BOUND_KIB, growth
        assert vm_seen(server, "127.0.0.2") == vm_uuid("vm1")


def test_metrics_on_the_tcp_port_need_the_token_and_health_does_not(tmp_path: Path) -> None:
    with served(tmp_path) as (server, token, _data_dir):
        url = f"http://127.0.0.1:{admin_port(server)}"
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = requests.get(f"{url}/metrics", headers=headers, timeout=5)
            assert refused.status_code == 401
            assert "vm1" not in refused.text
        scraped = requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert scraped.status_code == 200 and 'vm="vm1"' in scraped.text
        for path in ("/healthz", "/readyz", "/jwks"):
            assert requests.get(f"{url}{path}", timeout=5).status_code == 200, path
        # The Unix socket is its owner's alone (mode 0600): no token there.
        with contextlib.closing(socket.socket(socket.AF_UNIX)) as sock:
            sock.settimeout(5)
            sock.connect(str(tmp_path / "admin.sock"))
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 ") and b'vm="vm1"' in reply

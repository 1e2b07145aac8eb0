"""Run the real `fastimds serve` process for end-to-end tests.

Rules of this module:
- Nothing here may hang: the ready line is awaited with a deadline, stopping
  waits with a timeout and then kills the whole process group, and every
  socket helper has a timeout.
- stdout is a pipe (the server prints exactly one ready line there); stderr
  goes to a file, so log lines can be read at any time without a reader
  thread and without the server ever blocking on a full pipe.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.support import REPO_ROOT

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
SOCKET_TIMEOUT_S = 5.0

READY_LINE = re.compile(
    r"^fastimds listening on http://127\.0\.0\.1:(?P<port>\d+) workers=(?P<workers>\d+) vms=(?P<vms>\d+) "
    r"vmId=(?P<vm_id>\S*) admin=(?P<admin>\S*) data=(?P<data>.*)$"
)


class ServerStartError(Exception):
    """The server exited or stayed silent instead of printing its ready line."""


class ServerProcess:
    """A running `fastimds serve`; see `running_server`."""

    def __init__(self, proc: subprocess.Popen[bytes], stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.ready_line = ""
        self.port = 0
        self.workers = 0
        self.vm_id = ""
        self.admin: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, target: str) -> str:
        return self.base_url + target

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Read the one ready line from stdout, or raise within `timeout`."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buffer = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerStartError(f"no ready line within {timeout} s; stderr:\n{self.stderr_text()}")
                if not selector.select(remaining):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait(timeout=STOP_TIMEOUT_S)
                    raise ServerStartError(
                        f"server exited with {self.proc.returncode} before its ready line "
                        f"(stdout {buffer!r}); stderr:\n{self.stderr_text()}"
                    )
                buffer += chunk
        line, _, rest = buffer.partition(b"\n")
        if rest:
            raise ServerStartError(f"more than one line on stdout: {buffer!r}")
        self.ready_line = line.decode()
        match = READY_LINE.match(self.ready_line)
        if match is None:
            raise ServerStartError(f"unexpected ready line: {self.ready_line!r}")
        self.port = int(match["port"])
        self.workers = int(match["workers"])
        self.vm_id = match["vm_id"]
        self.admin = [] if match["admin"] == "-" else match["admin"].split(",")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to `timeout`, then kill the process group; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Wait for the process to exit; on timeout kill its group and raise TimeoutExpired."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise

    def kill_group(self) -> None:
        """SIGKILL the server's process group: the supervisor and every worker it forked.

        The server runs in its own session (start_new_session), so the group id
        is the server's pid and the group outlives a supervisor that died
        before its workers; an empty group is a no-op.
        """
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)

    def child_pids(self) -> list[int]:
        """Pids whose parent is the server process (the workers, with --workers N)."""
        children = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # exited while scanning
            # Field 2 (comm) may contain spaces; fields after its closing ")" are fixed.
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == self.proc.pid:
                children.append(int(entry))
        return sorted(children)


def serve_command(extra_args: Sequence[str] = (), prefix: Sequence[str] = ()) -> list[str]:
    """`fastimds serve`, on an ephemeral port unless EXTRA_ARGS name one.

    PREFIX runs before it (`taskset -c 0` to pin it to a core, for load runs).
    """
    port = [] if "--port" in extra_args else ["--port", "0"]
    return [*prefix, sys.executable, "-m", "fastimds", "serve", *port, *extra_args]


@contextlib.contextmanager
def running_server(
    *extra_args: str, wait_ready: bool = True, ready_timeout: float = READY_TIMEOUT_S, prefix: Sequence[str] = ()
) -> Iterator[ServerProcess]:
    """Start `fastimds serve --port 0 EXTRA_ARGS`, wait for its ready line, stop it on exit.

    On exit whatever is left of the server's process group is killed, so even
    a supervisor that died and orphaned its workers leaves nothing running.
    With `wait_ready=False` the server is yielded as soon as it is spawned.
    """
    log_dir = Path(tempfile.mkdtemp(prefix="fastimds-e2e-"))
    stderr_path = log_dir / "stderr.log"
    try:
        with open(stderr_path, "wb") as stderr_file:
            proc = subprocess.Popen(
                serve_command(extra_args, prefix),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr_file,
                start_new_session=True,
            )
        server = ServerProcess(proc, stderr_path)
        try:
            if wait_ready:
                server.wait_ready(ready_timeout)
            yield server
        finally:
            try:
                if proc.poll() is None:
                    server.stop()
            except subprocess.TimeoutExpired:
                pass  # stop() already killed the group
            finally:
                server.kill_group()
                assert proc.stdout is not None
                proc.stdout.close()
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


# ---- raw HTTP over a socket ----


def connect(port: int, timeout: float = SOCKET_TIMEOUT_S) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


class RawResponse:
    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes, raw_head: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.raw_head = raw_head

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key.lower() == name.lower()]
        assert len(values) <= 1, f"header {name} repeated: {values}"
        return values[0] if values else None

    def __repr__(self) -> str:
        return f"RawResponse({self.status}, {self.headers}, {self.body[:80]!r})"


class RawReader:
    """Reads HTTP/1.1 responses (Content-Length framed) off a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def read_response(self, head_only: bool = False) -> RawResponse:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"connection closed inside a response head: {self.buffer!r}")
        raw_head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = []
        for line in header_lines:
            name, sep, value = line.partition(":")
            assert sep, f"bad header line {line!r}"
            headers.append((name, value.strip()))
        response = RawResponse(int(status), reason, headers, b"", raw_head)
        if head_only:
            return response
        length = int(response.header("Content-Length") or 0)
        while len(self.buffer) < length:
            if not self._fill():
                raise ConnectionError(f"connection closed inside a body: {self.buffer!r}")
        response.body, self.buffer = self.buffer[:length], self.buffer[length:]
        return response

    def at_eof(self) -> bool:
        """True when the server closed the connection with nothing more to read."""
        if self.buffer:
            return False
        return self.sock.recv(65536) == b""


def exchange(port: int, request: bytes, head_only: bool = False) -> RawResponse:
    """One request on a fresh connection."""
    with connect(port) as sock:
        sock.sendall(request)
        return RawReader(sock).read_response(head_only)


def get_request(target: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ---- many VMs: documents, caller source addresses, the admin API ----

SAMPLE_VM_PATH = REPO_ROOT / "fastimds" / "sample_vm.json"


def vm_uuid(vm_id: str) -> str:
    """A stable compute.vmId for the VM named `vm_id`."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{vm_id}.fastimds.test"))


def vm_document(
    vm_id: str,
    callers: Sequence[str] = (),
    private_ips: Sequence[str] = (),
    location: str = "westeurope",
    with_id: bool = False,
) -> dict[str, Any]:
    """The sample VM made into VM `vm_id`: its own vmId, name and location.

    The sample's own private IPs (10.0.0.4, 10.0.0.5, fd00:10::4, 10.0.1.4)
    are replaced by `private_ips` on the first NIC, so copies never conflict;
    `callers` becomes the document's "callers" list when given, and
    `with_id` adds the "id" key.
    """
    document: dict[str, Any] = json.loads(SAMPLE_VM_PATH.read_bytes())
    compute = document["instance"]["compute"]
    compute["vmId"] = vm_uuid(vm_id)
    compute["name"] = compute["osProfile"]["computerName"] = f"{vm_id}-name"
    compute["location"] = location
    interfaces = document["instance"]["network"]["interface"]
    interfaces[0]["ipv4"]["ipAddress"] = [
        {"privateIpAddress": address, "publicIpAddress": ""} for address in private_ips if ":" not in address
    ]
    interfaces[0]["ipv6"]["ipAddress"] = [{"privateIpAddress": address} for address in private_ips if ":" in address]
    interfaces[1]["ipv4"]["ipAddress"] = []
    if callers:
        document["callers"] = list(callers)
    if with_id:
        document["id"] = vm_id
    return document


def poll_until(condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """True as soon as `condition()` is, False if it still is not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def log_events(server: ServerProcess, event: str) -> list[dict[str, Any]]:
    """The server's event-log records (JSON lines on its stderr) named `event`, in order."""
    records = []
    for line in server.stderr_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            records.append(record)
    return records


def worker_pids(server: ServerProcess) -> set[int]:
    """Children that are workers (they log worker_ready); the other child is the control process."""
    return {record["pid"] for record in log_events(server, "worker_ready")} & set(server.child_pids())


def http_from(source: str, port: int, timeout: float = SOCKET_TIMEOUT_S) -> http.client.HTTPConnection:
    """An http.client connection to 127.0.0.1:`port` whose source address is `source` (any of 127.0.0.0/8)."""
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))


def get_from(source: str, port: int, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One IMDS GET from `source` over a new connection; returns (status, body)."""
    conn = http_from(source, port)
    try:
        conn.request("GET", target, headers={"Metadata": "true", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def fresh_get(port: int, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One GET over a new http.client connection from 127.0.0.1; returns (status, body)."""
    return get_from("127.0.0.1", port, target, headers)


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (the admin API's), written here independently of fastimds."""

    def __init__(self, path: str | Path, timeout: float = SOCKET_TIMEOUT_S) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def admin_call(
    conn: http.client.HTTPConnection, method: str, target: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One admin API request on `conn` (kept alive); returns (status, parsed JSON body)."""
    payload = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    conn.request(method, target, body=payload, headers=headers or {})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def admin_unix(path: str | Path, method: str, target: str, body: Any = None) -> tuple[int, Any]:
    """One admin API request over the Unix socket at `path`, on a new connection."""
    conn = UnixHTTPConnection(path)
    try:
        return admin_call(conn, method, target, body)
    finally:
        conn.close()

"""Sans-socket test doubles: a recording transport and a response splitter.

Time is pinned: connections are created with `now=0.0` and tests move the
clock only through `ServerState.tick`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastimds.bus.files import Bus
from fastimds.bus.follower import Follower
from fastimds.config import Limits
from fastimds.control.admin_api import AdminApi
from fastimds.control.admin_connection import (
    MAX_ADMIN_TCP_CONNECTIONS,
    MAX_ADMIN_UNIX_CONNECTIONS,
    AdminListener,
    AdminProtocol,
)
from fastimds.control.plane import ControlPlane
from fastimds.control.writer import Control
from fastimds.http.connection import HttpProtocol
from fastimds.http.memo import MemoEntry, known_requests
from fastimds.http.throttle import Throttle
from fastimds.http.worker_state import ApprovalSink, ServerState
from fastimds.imds.datafile import VmDescription, load_vm
from fastimds.imds.faults import FaultTable
from fastimds.imds.keys import Keys
from fastimds.imds.registry import VmRegistry
from fastimds.imds.snapshot import Snapshot
from fastimds.imds.store import DEFAULT_VM_ID, SnapshotStore
from fastimds.ops.event_log import EventLog
from fastimds.ops.telemetry import new_counters

PINNED_UNIX_TIME = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
PINNED_DATE = b"Tue, 14 Nov 2023 22:13:20 GMT"

_SAMPLE: VmDescription | None = None

# The keys unit tests sign with (made on first use, once per test session; a server makes its own).
KEYS = Keys()


def sample_vm() -> VmDescription:
    global _SAMPLE  # noqa: PLW0603 - parse the embedded sample once per test session
    if _SAMPLE is None:
        _SAMPLE = load_vm(None)
    return _SAMPLE


class FakeTransport(asyncio.Transport):
    """Records writes, closes and read pauses instead of touching a socket."""

    def __init__(self, peer: str = "127.0.0.1") -> None:
        super().__init__()
        self.peer = peer
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.eof_written = False  # half-closed: a FIN sent, reading goes on
        self.reading = True
        self.pause_count = 0
        self.buffered = 0  # what get_write_buffer_size reports (tests set it)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        assert not self.eof_written, "write after write_eof"
        self.writes.append(bytes(data))

    def write_eof(self) -> None:
        self.eof_written = True

    @property
    def ended(self) -> bool:
        """Our side is done: closed, or half-closed (a lingering close, fastimds.http.connection)."""
        return self.closed or self.eof_written

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False
        self.pause_count += 1

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 40000) if name == "peername" else default

    @property
    def output(self) -> bytes:
        return b"".join(self.writes)


def make_connection(
    limits: Limits | None = None,
    store: SnapshotStore | None = None,
    registry: VmRegistry | None = None,
    peer: str = "127.0.0.1",
    *,
    faults: FaultTable | None = None,
    throttle: Throttle | None = None,
    approvals: ApprovalSink | None = None,
    clock: Callable[[], float] = lambda: 0.0,
) -> tuple[HttpProtocol, FakeTransport, ServerState]:
    """A connection from `peer`; by default to a single-VM registry of the sample (or of `store`).

    The state's clocks are pinned: the tick's `now` at 0.0 and its fresh `clock` at `clock`.
    """
    if registry is None:
        registry = VmRegistry(default_vm_id=DEFAULT_VM_ID)
        registry.stores[DEFAULT_VM_ID] = store or SnapshotStore(sample_vm())
    state = ServerState(
        registry,
        limits or Limits(),
        now=0.0,
        unix_time=PINNED_UNIX_TIME,
        counters=new_counters(),
        faults=faults,
        throttle=throttle,
        approvals=approvals,
        keys=KEYS,
        clock=clock,
    )
    protocol = HttpProtocol(state)
    transport = FakeTransport(peer)
    protocol.connection_made(transport)
    return protocol, transport, state


def remembered(snapshot: Snapshot | None, faults: FaultTable | None = None) -> dict[bytes, MemoEntry]:
    """What `snapshot`'s request memo answers now (`faults`: the table it answers under; a load empties it)."""
    return known_requests(snapshot)


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        import orjson

        return orjson.loads(self.body)


def split_responses(data: bytes, head_only: tuple[bool, ...] = ()) -> list[Response]:
    """Cut a byte stream of HTTP/1.1 responses into Response objects.

    `head_only[i]` says response i answers a HEAD (no body despite
    Content-Length). Raises if the stream does not frame exactly.
    """
    responses: list[Response] = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"unterminated response head: {data[:200]!r}"
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        version, code, _reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(": ")
            assert name.lower() not in headers, f"duplicate header {name}"
            headers[name.lower()] = value
        # 304 (and any reply without Content-Length) has no body.
        length = int(headers.get("content-length", "0")) if int(code) != 304 else 0
        if len(responses) < len(head_only) and head_only[len(responses)]:
            length = 0
        assert len(rest) >= length, "body shorter than Content-Length"
        responses.append(Response(int(code), headers, rest[:length]))
        data = rest[length:]
    return responses


def request(
    target: str = "/metadata/instance?api-version=2021-02-01",
    method: str = "GET",
    headers: tuple[tuple[str, str], ...] = (("Metadata", "true"),),
    version: str = "1.1",
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: 169.254.169.254", *(f"{n}: {v}" for n, v in headers)]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ---- the control plane as a single process runs it ----


def in_process(plane: ControlPlane) -> ControlPlane:
    """`plane` with an in-process Follower attached (and caught up), as a single process runs it."""
    control = plane.control
    follower = Follower(control.bus, VmRegistry(control.model.default_vm_id), control.log, plane.faults.budgets)
    follower.rescan()
    control.attach(follower)
    return plane


def new_plane(directory: Path, durable: bool = False) -> ControlPlane:
    """A control plane over a new bus in `directory`, serving in-process."""
    log = EventLog()
    return in_process(ControlPlane.over(Bus(directory, durable, log), log))


def serving(control: Control) -> VmRegistry:
    """What the control's in-process follower serves: never the control's own model."""
    assert control.in_process is not None
    return control.in_process.registry


def admin_api(plane: ControlPlane, token: str | None = None, **extras: Any) -> AdminApi:
    return AdminApi(plane, token, Keys(), **extras)


def admin_connection(
    api: AdminApi, tcp: bool = False, listener: AdminListener | None = None
) -> tuple[AdminProtocol, FakeTransport]:
    """An admin connection on a fake transport, made by `listener` (default: a fresh one at loop time 0)."""
    if listener is None:
        cap = MAX_ADMIN_TCP_CONNECTIONS if tcp else MAX_ADMIN_UNIX_CONNECTIONS
        listener = AdminListener(api, over_tcp=tcp, cap=cap, clock=lambda: 0.0)
    protocol = listener.factory()()
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport

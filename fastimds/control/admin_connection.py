"""One admin connection (`AdminProtocol`) and one admin listener's connections (`AdminListener`).

Rules of this module:
- Any local user can connect to the TCP admin port, token or not: a
  connection, its memory and its time are bounded before anyone is known.
  Each listener admits at most its cap (`MAX_ADMIN_TCP_CONNECTIONS`, and a
  separate `MAX_ADMIN_UNIX_CONNECTIONS` so a full TCP port never locks the
  socket's owner out); one over it gets a 503 and is closed, like the VM
  port's refusals (fastimds.http.connection).
- The token is checked when a request's head is complete, before any of
  its body is read (`AdminApi.refusal`): a request without it gets its 401
  and the connection ends; its body is never buffered.
- Every admitted connection has a deadline: a request must complete within
  `ADMIN_REQUEST_TIMEOUT_S` of its first byte (else 408), an idle keep-alive
  connection is closed after `ADMIN_IDLE_TIMEOUT_S`, and a connection that
  got its last reply reads and drops input for `ADMIN_LINGER_S`, then
  closes. The control part's once-a-second tick sweeps them
  (`AdminListener.sweep`, house rule 6: deadlines, not timers); no timer is
  made per connection or per request.
- Every descriptor an admin listener may hold is counted in
  `MAX_ADMIN_DESCRIPTORS`, which fastimds.process.sockets keeps out of the
  VM port's connection limit: admin connections never take a VM
  connection's or a watch's descriptor.
- Replies are read by the client: input is parsed in slices, and a client
  that stops reading (the transport pauses writing) stops being read.
- Not a hot path: plain code, a few connections at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import cast

import httptools

from fastimds.control.admin_api import (
    MAX_ADMIN_BODY_BYTES,
    MAX_ADMIN_HEAD_BYTES,
    AdminApi,
    json_reply,
    wire,
)
from fastimds.ops.event_log import EventLog

# Admitted TCP admin connections at once. The port's users are an operator's
# scripts, the CLI and a Prometheus scrape: a handful at a time. Any local
# user may connect (the token is per request), so this cap is what bounds
# what they can hold: 64 descriptors, and at most 64 bodies of
# MAX_ADMIN_BODY_BYTES in flight (~68 MiB), and those only with the token.
MAX_ADMIN_TCP_CONNECTIONS = 64
# The Unix socket is its owner's alone (mode 0600) and gets its own cap, so a
# local user who fills the TCP port's never locks the owner out. Small: the
# owner runs a CLI command at a time; a script that leaks connections is
# still kept out of the fd reserve.
MAX_ADMIN_UNIX_CONNECTIONS = 16
# Refused connections (over a cap) kept per listener until their client reads
# the 503 (closing with unread input sends a reset that may destroy it); past
# this many a refusal is closed at once, so refusals hold few descriptors.
MAX_ADMIN_LINGERING_REFUSALS = 16
# Every descriptor the admin listeners' connections may hold at once, for the fd reserve.
MAX_ADMIN_DESCRIPTORS = MAX_ADMIN_TCP_CONNECTIONS + MAX_ADMIN_UNIX_CONNECTIONS + 2 * MAX_ADMIN_LINGERING_REFUSALS
# From a request's first byte to its last. A head and a 1 MiB body cross
# loopback in milliseconds; 10 s leaves room for a slow script or an SSH
# tunnel, and bounds how long a half-sent request holds a slot.
ADMIN_REQUEST_TIMEOUT_S = 10.0
# An idle keep-alive connection (no request begun) is closed after this. A
# script sends its requests back to back and a scraper reconnects cheaply on
# loopback; an idle connection only holds one of few slots.
ADMIN_IDLE_TIMEOUT_S = 5.0
# After a last reply (401, 503, 408, 4xx on bad framing) input is read and
# dropped this long, so the client reads its reply instead of a reset.
ADMIN_LINGER_S = 1.0
# Input is parsed in slices of this size, so one read of small pipelined
# requests makes at most a slice's worth of replies before flow control is
# looked at again (~200 replies of under 1 KiB without the token).
ADMIN_FEED_SLICE_BYTES = 4 * 1024

_CONNECTIONS_FULL = json_reply(503, {"error": "too many admin connections"}, close=True)
_REQUEST_TIMEOUT = json_reply(408, {"error": "the request took too long"}, close=True)
_MALFORMED = json_reply(400, {"error": "malformed HTTP request"}, close=True)

# Input fed while one request's head is still open, past which it gets a 431: the head's own
# limit plus one feed slice (the slice that began the head may also hold earlier requests).
MAX_UNFINISHED_HEAD_BYTES = MAX_ADMIN_HEAD_BYTES + ADMIN_FEED_SLICE_BYTES


class AdminListener:
    """One admin listener's connections: the cap, the refusals that linger, the deadline sweep.

    `clock` is the loop's time (asyncio's `loop.time`), the same clock the
    tick passes to `sweep`.
    """

    def __init__(
        self, api: AdminApi, *, over_tcp: bool, cap: int, clock: Callable[[], float], log: EventLog | None = None
    ) -> None:
        self.api = api
        self.over_tcp = over_tcp
        self.cap = cap
        self.clock = clock
        self.log = log
        self.open: set[AdminProtocol] = set()  # admitted: counted against the cap until closed
        self.refused: set[AdminProtocol] = set()  # over the cap: lingering until their 503 is read

    def factory(self) -> Callable[[], AdminProtocol]:
        return lambda: AdminProtocol(self)

    def admit(self, connection: AdminProtocol) -> bool:
        """Count a new connection against the cap; over it, answer 503 and end it (False)."""
        if len(self.open) < self.cap:
            self.open.add(connection)
            return True
        if self.log is not None:
            self.log.event("admin_connection_refused", listener="tcp" if self.over_tcp else "unix", limit=self.cap)
        if len(self.refused) < MAX_ADMIN_LINGERING_REFUSALS:
            self.refused.add(connection)
            connection.finish(self.api.counted(_CONNECTIONS_FULL))
        else:
            connection.send_and_close(self.api.counted(_CONNECTIONS_FULL))
        return False

    def forget(self, connection: AdminProtocol) -> None:
        self.open.discard(connection)
        self.refused.discard(connection)

    def sweep(self, now: float) -> None:
        """Once a second: end every connection whose deadline has passed."""
        for connection in [c for c in self.open if c.deadline <= now]:
            connection.expire()
        for connection in [c for c in self.refused if c.deadline <= now]:
            connection.drop()

    def close_all(self) -> None:
        for connection in [*self.open, *self.refused]:
            connection.drop()


class AdminProtocol(asyncio.Protocol):
    def __init__(self, listener: AdminListener) -> None:
        self.listener = listener
        self.api = listener.api
        self.over_tcp = listener.over_tcp
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.deadline = 0.0
        self.in_request = False
        self.lingering = False  # the last reply is sent: input is dropped until the deadline
        self.write_paused = False
        self.backlog = b""  # input not parsed yet while the client does not read its replies
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.authorization: bytes | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        self.head_size = 0
        # Bytes fed since this request's head began and before it completed: httptools keeps an
        # unfinished header line itself (on_header sees it only whole), so an endless line is
        # capped here, between slices, as the VM port caps it (fastimds.http.connection).
        self.head_pending: int | None = None
        self.failure: bytes | None = None

    # ---- asyncio callbacks ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.listener.admit(self):
            self.deadline = self.listener.clock() + ADMIN_IDLE_TIMEOUT_S

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.forget(self)
        self.backlog = b""
        self.body = []

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.lingering:
            self.transport.resume_reading()
            backlog, self.backlog = self.backlog, b""
            self._feed(backlog)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # its last reply is sent: read and dropped, never buffered
        if self.backlog:
            self.backlog += data
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        assert self.transport is not None
        for start in range(0, len(data), ADMIN_FEED_SLICE_BYTES):
            if self.write_paused:  # the client is not reading its replies: stop reading its requests
                self.backlog = data[start:]
                self.transport.pause_reading()
                return
            piece = data[start : start + ADMIN_FEED_SLICE_BYTES]
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                self.transport.close()  # Upgrade or CONNECT: answered (on_message_complete); we speak nothing else
                return
            except httptools.HttpParserError:
                self.finish(self.failure or self.api.counted(_MALFORMED))
                return
            if self.lingering or self.transport.is_closing():
                return
            if self.head_pending is not None:
                self.head_pending += len(piece)
                if self.head_pending > MAX_UNFINISHED_HEAD_BYTES:
                    self.finish(self.api.counted(json_reply(431, {"error": "request head too large"}, close=True)))
                    return

    # ---- ending a connection ----

    def finish(self, reply: bytes) -> None:
        """Send a last reply, shut our side, and drop input for ADMIN_LINGER_S (then the sweep closes it)."""
        assert self.transport is not None
        self.lingering = True
        self.in_request = False
        self.body = []
        self.backlog = b""
        self.deadline = self.listener.clock() + ADMIN_LINGER_S
        self.transport.write(reply)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()

    def send_and_close(self, reply: bytes) -> None:
        assert self.transport is not None
        self.transport.write(reply)
        self.transport.close()

    def drop(self) -> None:
        """Close now; a client that does not read its replies loses them (abort: no wait for the buffer)."""
        assert self.transport is not None
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def expire(self) -> None:
        """Its deadline passed: a half-sent request gets 408; an idle or lingering connection is closed."""
        if self.in_request and not self.lingering:
            self.finish(self.api.counted(_REQUEST_TIMEOUT))
        else:
            self.drop()

    # ---- parser callbacks ----

    def on_message_begin(self) -> None:
        self.in_request = True
        self.head_pending = 0
        self.deadline = self.listener.clock() + ADMIN_REQUEST_TIMEOUT_S

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        if name.lower() == b"authorization":
            self.authorization = value

    def _count(self, size: int) -> None:
        self.head_size += size
        if self.head_size > MAX_ADMIN_HEAD_BYTES:
            self.failure = self.api.counted(json_reply(431, {"error": "request head too large"}, close=True))
            raise ValueError("head too large")

    def on_headers_complete(self) -> None:
        self.head_pending = None
        # The token before the body: a request without it never has its body read.
        refused = self.api.refusal(self.url.decode("latin-1"), self.authorization, self.over_tcp)
        if refused is not None:
            self.failure = self.api.counted(replace(refused, close=True))
            raise PermissionError("no token")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > MAX_ADMIN_BODY_BYTES:
            reply = json_reply(413, {"error": f"body over {MAX_ADMIN_BODY_BYTES} bytes"}, close=True)
            self.failure = self.api.counted(reply)
            raise ValueError("body too large")
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        method = self.parser.get_method().decode("latin-1")
        try:
            target, body = self.url.decode("latin-1"), b"".join(self.body)
            # on_headers_complete asked `refusal` already: the token is compared once per request.
            reply = self.api.handle(method, target, self.authorization, body, self.over_tcp, token_checked=True)
        except Exception as exc:  # an admin bug must not take the listener down
            reply = wire(json_reply(500, {"error": f"internal error: {exc!r}"}))
        self.transport.write(reply)
        self.in_request = False
        self.deadline = self.listener.clock() + ADMIN_IDLE_TIMEOUT_S
        if not self.parser.should_keep_alive():
            self.transport.close()
        self._reset()

"""A connection's fields: one __slots__ layout for HttpProtocol and every part of it.

Rules of this module:
- Every field of a connection is declared here, with its type, once. The
  parts (fastimds.http.answer, .memo, .holds) are mixins over this class
  and HttpProtocol (fastimds.http.connection) joins them: one object, one
  layout, so a field is one specialised slot load wherever it is read.
- Only declarations: the values are set in HttpProtocol.__init__, and the
  methods one part calls in another are declared for the type checker alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastimds.config import Limits
    from fastimds.http.holds import Wait
    from fastimds.http.memo import LogStub, MemoEntry
    from fastimds.http.phases import Hold, Phase
    from fastimds.http.throttle import CallerWindow
    from fastimds.http.worker_state import ServerState
    from fastimds.imds.render import Reply
    from fastimds.imds.store import SnapshotStore
    from fastimds.ops.request_log import RequestLog


class ConnectionFields(asyncio.Protocol):
    __slots__ = (
        # ---- per connection ----
        "state",
        "vm",
        "peer",
        "limits",
        "transport",
        "write",
        "parser",
        "out",
        "phase",
        "hold",
        "wait",
        "write_paused",
        "backlog",
        "giving_way",
        "deadline",
        "remembering",
        "counters",
        "replies_in_read",
        "request_log",
        "logged",
        "log_head",
        "window",
        # ---- per request ----
        "head_pending",
        "url",
        "head_bytes",
        "header_count",
        "metadata_ok",
        "forwarded",
        "keep_alive_asked",
        "upgrade_asked",
        "rememberable",
        "if_none_match",
        "body",
        "reject",
    )

    # ---- per connection ----
    state: ServerState
    vm: SnapshotStore  # the caller's VM, set once the peer is known
    peer: str
    limits: Limits
    transport: asyncio.Transport
    write: Callable[[bytes], Any]  # transport.write, bound once
    parser: Any  # httptools.HttpRequestParser (untyped)
    out: list[bytes]  # this read's reply pieces, written in one call
    phase: Phase  # where the connection is in its life (fastimds.http.phases)
    hold: Hold | None  # what holds its replies back, if anything
    wait: Wait | None  # the held long-poll, while hold is LONG_POLL
    write_paused: bool
    backlog: bytes  # unread input held while the transport is paused
    giving_way: bool  # the backlog's next turn is due (fastimds.http.turns)
    deadline: float  # when this connection must next have progressed
    remembering: list[MemoEntry] | None  # this read's memo entries, while it may still be remembered
    counters: list[int] | None
    replies_in_read: int  # replies produced by the current read, for the latency histogram
    request_log: RequestLog | None
    logged: list[tuple[LogStub, int]]  # this read's replies, for the request log
    log_head: tuple[str, str, int]  # (caller, vm, generation), the log's record head
    window: CallerWindow | None  # the caller's throttle window, when throttling is on
    # ---- per request ----
    head_pending: int  # bytes of an unfinished head charged between reads
    url: bytes
    head_bytes: int
    header_count: int
    metadata_ok: bool
    forwarded: bool
    keep_alive_asked: bool
    upgrade_asked: bool
    rememberable: bool  # no body framing, no upgrade: the head alone decides the reply
    if_none_match: bytes | None
    body: bytes  # kept whole (up to max_body_bytes): only an approval POST has one
    reject: Reply | None  # the limit a parser callback broke

    if TYPE_CHECKING:
        # What one part calls in another, for the type checker only: at run time
        # each resolves to its one definition (fastimds.http.connection, .answer, .holds).
        def _feed(self, data: bytes) -> None: ...
        def _feed_backlog(self) -> None: ...
        def _flush(self) -> None: ...
        def _reset_request(self) -> None: ...
        def _account(self, started: int | None) -> None: ...
        def _resolve(
            self, method: bytes, url: bytes, metadata_ok: bool, forwarded: bool, body: bytes = b""
        ) -> Reply: ...
        def _note(self, slots: tuple[int, int, int], size: int, stub: LogStub) -> None: ...
        def _sample_error(self, event: str, status: int, target: bytes) -> None: ...
        def _append_reply(
            self, reply: Reply, method: bytes, connection: bytes, if_none_match: bytes | None
        ) -> tuple[bytes, bytes]:
            raise NotImplementedError

        def _hold(self, wait: Wait) -> None: ...
        def _delay(self, seconds: float) -> None: ...
        def _release_with_current(self) -> None: ...

"""A connection's fields: one __slots__ layout for HttpProtocol and every part of it.

Rules of this module:
- Every field of a connection is declared here, with its type, once. The
  parts are one chain of single inheritance over this class, each in its
  module and each adding methods only (`__slots__ = ()`):
  ConnectionFields < RequestHead (.request_head) < MemoPath (.memo) <
  Holds (.holds) < AnswerPath (.answer) < CallerOwner (.caller_owner) <
  TakingTurns (.turns) < HttpProtocol (.connection). One object, one
  layout, so a field is one specialised slot load wherever it is read (a
  struct field in the mypyc build, which refuses multiple inheritance:
  docs/architecture.md, "Two builds").
- Only declarations: the values are set in HttpProtocol.__init__. The
  methods one part calls in another are declared here as stubs that the
  part defining them overrides, so every part can call them whatever its
  place in the chain (a method found through the type's cache in Python,
  a vtable call in the mypyc build).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from fastimds.config import Limits
    from fastimds.http.holds import Wait
    from fastimds.http.memo import LoggedReply, LogHead, LogStub, MemoEntry
    from fastimds.http.phases import Hold, Phase
    from fastimds.http.throttle import CallerWindow
    from fastimds.http.worker_state import ServerState
    from fastimds.imds.render import Reply
    from fastimds.imds.store import SnapshotStore
    from fastimds.ops.request_log import RequestLog

# The parts' clock (latency, turns), bound once as a Final name: the mypyc build loads it from a
# C static rather than looking `perf_counter_ns` up in each module's globals on every read.
CLOCK_NS: Final = perf_counter_ns


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
    # httptools.HttpRequestParser (untyped), made by the first read the memo cannot answer: a
    # connection whose requests are all known never makes one (1.0 µs of a Connection: close
    # request's 3.9 in the mypyc build, most of it httptools binding the callbacks; tuning.md).
    parser: Any
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
    logged: list[LoggedReply]  # this read's replies, for the request log
    log_head: LogHead  # (caller, vm, generation), the log's record head
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

    # ---- what one part calls in another: stubs, each overridden by its one definition ----
    # (fastimds.http.connection: _feed, _feed_backlog, _flush; .request_head: _reset_request;
    # .answer: _account, _resolve, _note, _sample_error, _append_reply; .holds: _hold, _delay,
    # _release_with_current). Real methods, not declarations under TYPE_CHECKING: mypyc
    # compiles no statement but a declaration in a class body.

    def _feed(self, data: bytes) -> None:
        raise NotImplementedError

    def _feed_backlog(self) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def _reset_request(self) -> None:
        raise NotImplementedError

    def _account(self, started: int | None) -> None:
        raise NotImplementedError

    def _resolve(self, method: bytes, url: bytes, metadata_ok: bool, forwarded: bool, body: bytes = b"") -> Reply:
        raise NotImplementedError

    def _note(self, slots: tuple[int, int, int], size: int, stub: LogStub) -> None:
        raise NotImplementedError

    def _sample_error(self, event: str, status: int, target: bytes) -> None:
        raise NotImplementedError

    def _append_reply(
        self, reply: Reply, method: bytes, connection: bytes, if_none_match: bytes | None
    ) -> tuple[bytes, bytes]:
        raise NotImplementedError

    def _hold(self, wait: Wait) -> None:
        raise NotImplementedError

    def _delay(self, seconds: float) -> None:
        raise NotImplementedError

    def _release_with_current(self) -> None:
        raise NotImplementedError

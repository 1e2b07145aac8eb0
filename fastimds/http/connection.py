"""The HTTP/1.1 connection: parse with httptools, check limits, write finished bytes.

Rules of this module (its parts: fastimds.http.request_head, .memo, .answer,
.holds, .caller_owner, .fields, .phases, .worker_state):
- Dumb transport: this package parses and writes; what to answer is decided
  by `routing.resolve`, which returns a pre-rendered Reply. Nothing is
  formatted or encoded here per request.
- One connection is one `HttpProtocol` object: its parts are one chain of
  single inheritance over one __slots__ layout (fastimds.http.fields), so
  the hot path reaches every field with one attribute load and calls
  nothing to cross from one part to another.
- Its state is explicit (fastimds.http.phases): `phase` (idle, in a request,
  or ending) and `hold` (nothing, a long-poll, injected latency).
- Pipelined requests are answered inline, in order, and every reply produced
  by one read goes out in one `transport.write` (house rule 5). Reads larger
  than `FEED_SLICE_BYTES` are fed in slices, and feeding stops while the
  transport is paused, so a client that never reads holds at most one slice
  of replies plus the unread input, not an unbounded queue. Past
  MAX_WORK_PER_TURN_NS of slices in one turn of the loop, the rest waits
  for the loop's next turn, so other connections are answered in between
  (fastimds.http.turns).
- Limits are checked where the bytes arrive (fastimds.http.request_head),
  plus a cap on an unfinished head between reads (`_feed`). Breaking one
  gets its status and a close.
- Connection limits are checked once, on accept (`connection_made`): per
  worker and per caller address (ServerState.callers). A connection over
  either is never admitted: it gets a pre-rendered 503, its write side is
  shut, and it lingers in `ServerState.refused` (reading and discarding)
  until the client closes or REFUSED_LINGER_S passes, so the client reads
  the 503 instead of a reset. Refusals are rejects in telemetry, not
  connections, and are logged under the event log's rate limit.
- Deadlines, not timers (house rule 6): see fastimds.http.worker_state.
- Telemetry costs two monotonic clock reads per read (the latency histogram)
  plus a few list increments per reply (fastimds.http.answer).
- Any bytes either parse or get a 400 and a close; no input raises out of
  `data_received`.
- A close the server decides (an error reply, a deadline, draining) is a
  lingering close (RFC 9112 §9.6, `Phase.LINGERING`): a FIN, then input is
  read and dropped until the client closes or CLOSE_LINGER_S passes, because
  closing a socket with unread input sends a reset, which can destroy
  replies the client has not read yet. A close the client asked for
  (`Connection: close`, `Phase.CLOSING`) is immediate: it will not send
  more, and the linger would cost an extra event per connection.
- Known requests skip the parser (fastimds.http.memo).
"""

from __future__ import annotations

import asyncio
from typing import Final, cast

import httptools

from fastimds.http.fields import CLOCK_NS
from fastimds.http.memo import END_OF_HEAD, reply_slots
from fastimds.http.phases import (
    CLOSED,
    CLOSING,
    DELAYED,
    ENDED,
    HEAD_BEGUN,
    HELD,
    IDLE,
    IN_HEAD,
    LINGERING,
    LONG_POLL,
)
from fastimds.http.turns import TakingTurns
from fastimds.http.worker_state import EXPIRE_SLICE, ServerState
from fastimds.imds.registry import caller_key
from fastimds.imds.render import CONNECTION_CLOSE, CONNECTION_KEEP_ALIVE, ERRORS, Reply
from fastimds.imds.routing import category_of
from fastimds.ops.telemetry import LAYOUT

__all__ = ["CLOSE_LINGER_S", "EXPIRE_SLICE", "FEED_SLICE_BYTES", "HttpProtocol", "ServerState"]

# Reads larger than this are fed to the parser in slices of this size, so one
# read of tiny pipelined requests cannot produce an unbounded reply batch. A
# normal request (~200 bytes) or a 16-deep pipeline (~3 KiB) is one slice.
FEED_SLICE_BYTES: Final = 8 * 1024

_MALFORMED: Final = ERRORS["malformed"]
_HEAD_TOO_LARGE: Final = ERRORS["head_too_large"]
_REQUEST_TIMEOUT: Final = ERRORS["request_timeout"]
_WORKER_CONNECTIONS_FULL: Final = ERRORS["worker_connections_full"]
_CALLER_CONNECTIONS_FULL: Final = ERRORS["caller_connections_full"]

# A refused connection is kept this long (swept by the tick, so 1-2 s more)
# for its client to read the 503 and close first: closing a socket with
# unread input sends a reset, and a reset may destroy the 503 before the
# client reads it. At most MAX_LINGERING_REFUSALS linger per worker; past
# that a refusal closes at once (a flood of refusals must not take every
# file descriptor), which fastimds.process.serve keeps free of the connection limit.
REFUSED_LINGER_S: Final = 1.0
MAX_LINGERING_REFUSALS: Final = 256
# How long a lingering close reads and drops input before closing (swept by the tick: 1-2 s).
CLOSE_LINGER_S: Final = 1.0

_OPENED_SLOT: Final = LAYOUT.connections_opened
_CLOSED_SLOT: Final = LAYOUT.connections_closed


class HttpProtocol(TakingTurns):
    __slots__ = ()  # the one layout is ConnectionFields', and the parts' chain ends here (fastimds.http.fields)

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.vm = state.registry.nobody
        self.peer = ""
        self.limits = state.limits
        self.parser = None  # made by the first read the memo cannot answer (ConnectionFields.parser)
        self.out = []
        self.phase = IDLE
        self.hold = None
        self.wait = None
        self.write_paused = False
        self.backlog = b""
        self.giving_way = False
        self.deadline = 0.0
        self.remembering = None
        self.counters = state.counters
        self.replies_in_read = 0
        self.request_log = state.request_log
        self.logged = []
        self.log_head = ("", "", 0)
        self.window = None
        self.head_pending = 0
        self.reject = None
        self._reset_request()

    # ---- asyncio callbacks ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.write = self.transport.write
        self.peer = caller_key(transport.get_extra_info("peername"))  # address, and zone when link-local
        state = self.state
        # The caller's VM is decided once per connection (house rule: not per request), and
        # again only when the caller's address changes owner (remap).
        self.vm = state.registry.store_for(self.peer or None)
        by_caller = state.callers.get(self.peer)
        open_by_caller = len(by_caller) if by_caller is not None else 0
        if open_by_caller >= self.limits.max_connections_per_caller:
            self._refuse(_CALLER_CONNECTIONS_FULL, open_by_caller, self.limits.max_connections_per_caller)
            return
        if len(state.connections) >= self.limits.max_connections_per_worker:
            self._refuse(_WORKER_CONNECTIONS_FULL, len(state.connections), self.limits.max_connections_per_worker)
            return
        if by_caller is None:
            by_caller = state.callers[self.peer] = set()
        by_caller.add(self)  # by address: re-mapped when the address changes owner (ServerState.owners_changed)
        if state.throttle is not None:
            self.window = state.throttle.for_caller(self.peer)
        state.connections.add(self)
        if self.counters is not None:
            self.counters[_OPENED_SLOT] += 1
        self.deadline = self.state.now + self.limits.keep_alive_timeout_s

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = CLOSED
        self.backlog = b""
        state = self.state
        if self.write_paused:
            state.note_resumed(self)
        if self not in state.connections:
            state.refused.discard(self)  # refused on accept: never admitted, never counted
            return
        state.connections.remove(self)
        by_caller = state.callers[self.peer]
        by_caller.discard(self)
        if not by_caller:
            del state.callers[self.peer]  # the table holds only callers with connections open
        if self.counters is not None:
            self.counters[_CLOSED_SLOT] += 1
        if self.hold is not None:
            self.hold = self.wait = None
            self.vm.watchers.discard(self)

    def _refuse(self, reply: Reply, open_now: int, limit: int) -> None:
        """Over a connection limit: a 503 before any request, then shut our side and linger."""
        state = self.state
        self.phase = CLOSING  # whatever the client sends is read and discarded
        if self.counters is not None and reply.reject is not None:
            self.counters[LAYOUT.reject_slot(reply.reject)] += 1
        event_log = state.event_log
        if event_log.allow("connection_refused", state.now_unix):
            current = self.vm.current
            event_log.write(
                "connection_refused",
                state.now_unix,
                {
                    "caller": self.peer,
                    "vm": self.vm.vm_id if current is not None else None,
                    "reason": reply.reject,
                    "open": open_now,
                    "limit": limit,
                },
            )
        self.write(b"".join((reply.head, CONNECTION_CLOSE, state.date_block, reply.body)))
        if len(state.refused) < MAX_LINGERING_REFUSALS:
            self.deadline = state.now + REFUSED_LINGER_S
            state.refused.add(self)
            self.transport.write_eof()  # the client reads the 503, then our end of file
        else:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase is not IDLE and (phase is CLOSING or phase is LINGERING or phase is CLOSED):
            return  # the server is closing: input is read and dropped
        started = CLOCK_NS()
        if self.backlog or len(data) > FEED_SLICE_BYTES:
            self.backlog += data
            self._feed_backlog()
        else:
            # A throttled caller's requests take the parser, where the limit is checked.
            if phase is not IDLE or self.state.draining or self.window is not None or not data.endswith(END_OF_HEAD):
                self._feed(data)
            elif not self._answer_known(data):
                self.remembering = []  # set here: _feed_and_remember must not see it narrowed (mypyc)
                self._feed_and_remember(data)
            self._flush()
        if self.replies_in_read:
            self._account(started)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.deadline = self.state.now + self.limits.send_stall_timeout_s
        self.transport.pause_reading()
        # What it keeps while its client does not read, against the worker's budget (may abort the oldest).
        self.state.note_stalled(self, len(self.backlog) + self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        self.write_paused = False
        self.state.note_resumed(self)
        if self.phase in ENDED or self.hold is not None:
            return  # a held reply keeps reading paused and its own deadline until it is answered
        self.deadline = self.state.now + self.limits.keep_alive_timeout_s
        self.transport.resume_reading()
        if self.backlog:
            started = CLOCK_NS()
            self._feed_backlog()
            self._account(started)

    # ---- feeding the parser ----

    def _feed(self, data: bytes) -> None:
        hold = self.hold  # a local, not `self.hold` narrowed across the parser's callbacks (mypyc trusts it)
        if hold is not None:
            self._keep_while_held(data)  # behind a held long-poll: not parsed until it is answered
            return
        if self.parser is None:
            self.parser = httptools.HttpRequestParser(self)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Requests before the upgrade were answered; we speak nothing else.
            self.phase = CLOSING
            return
        except httptools.HttpParserError:
            # Also raised for bytes after a reply that closed the connection
            # (llhttp refuses data after `Connection: close`): those get nothing.
            if self.phase not in ENDED:
                self._respond(self.reject or _MALFORMED, head_only=False, keep_alive=False)
            return
        hold = self.hold
        if hold is not None:
            if hold is LONG_POLL and self.phase is IDLE:
                self.phase = HELD  # later reads are kept unparsed, never answered by the memo
            return  # a held reply keeps its own deadline (timeout_sec, or the delay)
        phase = self.phase
        if phase is IDLE:
            self.deadline = self.state.now + self.limits.keep_alive_timeout_s
        elif phase is HEAD_BEGUN:
            # Began during this read: its bytes are charged from the next read on,
            # so bytes of earlier pipelined requests in this read never are.
            self.phase = IN_HEAD
            self.head_pending = 0
        elif phase is IN_HEAD:
            # httptools buffers a header until it is complete, so a head that never
            # ends must be capped here, between reads, not only in on_header.
            self.head_pending += len(data)
            if self.head_pending > self.limits.max_request_head_bytes + self.limits.max_url_bytes:
                self._respond(_HEAD_TOO_LARGE, head_only=False, keep_alive=False)

    def _feed_backlog(self) -> None:
        hold = self.hold  # a local: the loop below reads self.hold after _feed changes it (see _feed)
        if hold is not None:
            self._keep_while_held(b"")  # input behind a held reply stays unparsed, within its bound
            return
        turn_ends = self._turn_ends()  # a bounded turn, then the others' (fastimds.http.turns)
        while self.backlog and self.phase not in ENDED and not self.write_paused and self.hold is None:
            piece, self.backlog = self.backlog[:FEED_SLICE_BYTES], self.backlog[FEED_SLICE_BYTES:]
            self._feed(piece)
            self._flush()
            if self.backlog and CLOCK_NS() >= turn_ends:  # at least one slice a turn
                self._give_way()
                return

    def _flush(self) -> None:
        if self.hold is not None:
            return  # replies after a held one wait for it (fastimds.http.holds)
        out = self.out
        if out:
            self.write(b"".join(out))
            out.clear()
        phase = self.phase
        if phase is not IDLE and (phase is CLOSING or phase is LINGERING or phase is CLOSED):
            self.backlog = b""
            if phase is LINGERING:
                self._linger()
            elif phase is CLOSING:
                self._close()

    def _linger(self) -> None:
        """Half-close: our FIN now; the tick closes us CLOSE_LINGER_S later if the client has not."""
        transport = self.transport
        if transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
            transport.resume_reading()  # read and drop (data_received) whatever the client still sends
            self.deadline = self.state.now + CLOSE_LINGER_S
        else:
            self._close()

    def _close(self) -> None:
        """Close once the replies drain; past the send-stall timeout check_deadlines aborts it instead."""
        self.transport.close()
        self.deadline = self.state.now + self.limits.send_stall_timeout_s

    def _respond(self, reply: Reply, head_only: bool, keep_alive: bool) -> None:
        """Queue an error decided by the protocol itself (limits, bad bytes, timeouts)."""
        body_size = 0 if head_only else len(reply.body)
        self._note(
            reply_slots(category_of(self.url), reply.status, reply.reject),
            body_size,
            ("", self.url.decode("utf-8", "backslashreplace"), reply.status),
        )
        self._sample_error("limit_hit", reply.status, self.url)
        out = self.out
        out.append(reply.head)
        if not keep_alive:
            out.append(CONNECTION_CLOSE)
            self.phase = LINGERING  # the server's decision: the client may still be sending
        elif self.keep_alive_asked:
            out.append(CONNECTION_KEEP_ALIVE)  # HTTP/1.0 keep-alive must be confirmed
        out.append(self.state.date_block)
        if not head_only:
            out.append(reply.body)

    # ---- deadlines and shutdown ----

    def check_deadlines(self, now: float) -> None:
        hold = self.hold
        if now < self.deadline or hold is DELAYED:
            return
        phase = self.phase
        if hold is None and phase in ENDED:
            if self.transport.is_closing():
                self.transport.abort()  # closed, but its last replies never drained: the client stopped reading
            elif phase is LINGERING:
                self._close()  # the linger is over
            return
        if hold is LONG_POLL:
            self._release_with_current()  # timeout_sec passed: answer with the current value
        elif self.write_paused:
            self.transport.abort()  # the client stopped reading; drop what it did not take
        elif phase is not IDLE:
            self._respond(_REQUEST_TIMEOUT, head_only=False, keep_alive=False)
            self._flush()
            self._account(None)  # logged, but not a read's reply: no latency to record
        else:
            self.phase = LINGERING
            self._linger()  # idle keep-alive: a request may be on its way

    def shutdown(self) -> None:
        """Half-close now if idle; otherwise the pending reply closes (state.draining).

        Idle closes in stages (RFC 9112 §9.6): a FIN now, then whatever arrives
        is read and dropped (`Phase.CLOSING`) until the client closes its side or
        `finish_shutdown`. A request already on its way meets a clean end of
        stream, never a reset (a close with unread input sends RST).
        """
        if self.hold is DELAYED:
            # Its delayed reply goes when the delay ends (the grace period caps it), then a lingering close.
            self.phase = LINGERING
            return
        if self.hold is LONG_POLL:
            self._release_with_current()
            return
        if self.phase is IDLE and not self.backlog:
            self.phase = CLOSING
            self.transport.write_eof()

    def finish_shutdown(self) -> None:
        """The linger is over: fully close a connection that is closing.

        A started request, and a reply held by injected latency, keep the grace period to finish.
        """
        if self.phase in ENDED and self.hold is None:
            self._close()

"""The HTTP/1.1 protocol: parse with httptools, look up, write finished bytes.

Rules of this module:
- Dumb transport: this module parses and writes; what to answer is decided
  by `routing.resolve`, which returns a pre-rendered Reply. Nothing is
  formatted or encoded here per request.
- Pipelined requests are answered inline, in order, and every reply produced
  by one read goes out in one `transport.write` (house rule 5). Reads larger
  than `FEED_SLICE_BYTES` are fed in slices, and feeding stops while the
  transport is paused, so a client that never reads holds at most one slice
  of replies plus the unread input, not an unbounded queue.
- Limits are checked where the bytes arrive: the URL in `on_url`, header
  count and size in `on_header` (plus a cap on an unfinished head between
  reads), the body in `on_body`. Breaking one gets its status and a close.
- Connection limits are checked once, on accept (`connection_made`): per
  worker and per caller address (ServerState.callers). A connection over
  either is never admitted: it gets a pre-rendered 503, its write side is
  shut, and it lingers in `ServerState.refused` (reading and discarding)
  until the client closes or REFUSED_LINGER_S passes, so the client reads
  the 503 instead of a reset. Refusals are rejects in telemetry, not
  connections, and are logged under the event log's rate limit.
- Deadlines, not timers (house rule 6): each connection stores when it must
  next make progress; `ServerState.tick` sweeps them once a second and also
  refreshes the Date block, so no request reads the wall clock for them.
- Telemetry costs two monotonic clock reads per read (the latency histogram)
  and a few list increments per reply (fastimds.ops.telemetry); with
  --request-log, each read's replies go to the log in one call. Both can be
  off, and then cost one `is None` test each.
- A long-poll (`wait_for_change`) parks its connection in its VM store's
  watchers: reading pauses, the replies to requests behind it wait, and the
  store's next publish (or the deadline sweep) answers it. One is held per
  connection: a long-poll pipelined behind a held one is answered with the
  current value, in its place after it.
- Any bytes either parse or get a 400 and a close; no input raises out of
  `data_received`.
- A close the server decides (an error reply, a deadline, draining) is a
  lingering close (RFC 9112 §9.6): a FIN, then input is read and dropped
  until the client closes or CLOSE_LINGER_S passes, because closing a socket
  with unread input sends a reset, which can destroy replies the client has
  not read yet. A close the client asked for (`Connection: close`) is
  immediate: it will not send more, and the linger would cost an extra
  event per connection.
- Injected faults (fastimds.imds.faults) are applied on the parser path only; the
  fault table keeps the memo clear of anything a fault could match. Injected
  latency holds the connection like a long-poll (`_DELAYED`): its reply and
  those behind it wait, in order. A reset closes with SO_LINGER 0 (an RST).
- Known requests skip the parser. A read that starts between requests and
  ends with a blank line is split at blank lines; when every piece is a
  request head this snapshot has already answered (`request_replies`), the
  remembered replies are written without parsing. Only heads of body-less
  GET/HEAD requests, parsed whole in one read, are remembered: for them the
  bytes alone decide the reply. Anything else takes the parser. Measured in
  tuning.md ("request memo").
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from functools import lru_cache
from time import perf_counter_ns, time
from typing import cast

import httptools

from fastimds.config import Limits
from fastimds.http.throttle import CallerWindow, Throttle
from fastimds.imds.faults import Fault, FaultTable
from fastimds.imds.registry import NOBODY, VmRegistry, caller_key
from fastimds.imds.render import CONNECTION_CLOSE, CONNECTION_KEEP_ALIVE, CONTINUE, ERRORS, Reply, date_block
from fastimds.imds.routing import WAIT_MARK, category_of, etag_matches, resolve, wait_spec
from fastimds.imds.snapshot import LogStub, RequestReply
from fastimds.imds.store import SnapshotStore
from fastimds.ops.event_log import EVENT_LOG
from fastimds.ops.request_log import MAX_BUFFERED_VALUES as _MAX_LOG_VALUES
from fastimds.ops.request_log import RequestLog
from fastimds.ops.telemetry import LATENCY_FIRST_BIT, LATENCY_LAST_BUCKET, LAYOUT, new_counters

# Reads larger than this are fed to the parser in slices of this size, so one
# read of tiny pipelined requests cannot produce an unbounded reply batch. A
# normal request (~200 bytes) or a 16-deep pipeline (~3 KiB) is one slice.
FEED_SLICE_BYTES = 8 * 1024

END_OF_HEAD = b"\r\n\r\n"

# Header names whose presence makes a request's bytes unfit to remember:
# a body may follow them, or a 100 Continue must precede the reply.
_BODY_FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"expect"})
# Lengths of every header name on_header looks at, so that most names are
# passed over after one set lookup.
_WATCHED_HEADER_SIZES = frozenset(
    {len(name) for name in (b"metadata", b"x-forwarded-for", b"connection", b"upgrade", b"if-none-match")}
)
_WATCHED_HEADER_SIZES |= {len(name) for name in _BODY_FRAMING_HEADERS}

_REMEMBERED_METHODS = frozenset({b"GET", b"HEAD"})

_MALFORMED = ERRORS["malformed"]
_THROTTLED = ERRORS["throttled"]
_HEAD_TOO_LARGE = ERRORS["head_too_large"]
_URI_TOO_LONG = ERRORS["uri_too_long"]
_BODY_TOO_LARGE = ERRORS["body_too_large"]
_REQUEST_TIMEOUT = ERRORS["request_timeout"]
_WORKER_CONNECTIONS_FULL = ERRORS["worker_connections_full"]
_CALLER_CONNECTIONS_FULL = ERRORS["caller_connections_full"]

# A refused connection is kept this long (swept by the tick, so 1-2 s more)
# for its client to read the 503 and close first: closing a socket with
# unread input sends a reset, and a reset may destroy the 503 before the
# client reads it. At most MAX_LINGERING_REFUSALS linger per worker; past
# that a refusal closes at once (a flood of refusals must not take every
# file descriptor), which fastimds.process.serve keeps free of the connection limit.
REFUSED_LINGER_S = 1.0
MAX_LINGERING_REFUSALS = 256
# How long a lingering close reads and drops input before closing (swept by the tick: 1-2 s).
CLOSE_LINGER_S = 1.0
# Connections whose deadline passed handled per loop iteration (see ServerState._expire).
EXPIRE_SLICE = 100

# `head_pending` value meaning "this head began during the current feed":
# its bytes are not counted until the next read, so bytes of earlier
# pipelined requests in the same read are never charged to it.
_BEGAN_THIS_FEED = -1


@dataclass(slots=True, frozen=True)
class _Wait:
    """A held long-poll: the request to re-resolve and the ETag it waits to change from."""

    method: bytes
    url: bytes
    metadata_ok: bool
    forwarded: bool
    awaited: bytes | None
    connection: bytes
    closes: bool


# A connection whose replies wait out injected latency: `waiting` holds this.
_DELAYED = _Wait(b"", b"", False, False, None, b"", False)
# SO_LINGER on, zero seconds: close() sends an RST instead of a FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)

# Counter offsets the hot path uses, read once (fastimds.ops.telemetry.LAYOUT).
_LATENCY_SLOT = LAYOUT.latency
_LATENCY_SUM_SLOT = LAYOUT.latency_sum_ns
_LATENCY_FIRST_BIT = LATENCY_FIRST_BIT
_LATENCY_LAST_BUCKET = LATENCY_LAST_BUCKET
_OPENED_SLOT = LAYOUT.connections_opened
_CLOSED_SLOT = LAYOUT.connections_closed


@lru_cache(maxsize=len(LAYOUT.categories) * (len(LAYOUT.codes) + 1) * (len(LAYOUT.reasons) + 1) * 2)
def _slots(category: str, status: int, reject: str | None) -> tuple[int, int, int]:
    """The telemetry slots of one reply: (requests by category and code, bytes, reject or 0)."""
    return (
        LAYOUT.request_slot(category, status),
        LAYOUT.bytes_slot(category),
        LAYOUT.reject_slot(reject) if reject is not None else 0,  # 0: not a reject (slot 0 is never one)
    )


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the reply is on the protocol."""


class ServerState:
    """What every connection of one worker shares."""

    __slots__ = (
        "registry",
        "limits",
        "connections",
        "date_block",
        "now",
        "now_unix",
        "draining",
        "counters",
        "request_log",
        "throttle",
        "callers",
        "refused",
        "faults",
    )

    def __init__(
        self, registry: VmRegistry, limits: Limits, now: float, unix_time: float, telemetry: bool = True
    ) -> None:
        self.registry = registry
        # This worker's hot-path counters (fastimds.ops.telemetry.LAYOUT); None turns telemetry off.
        self.counters: list[int] | None = new_counters() if telemetry else None
        self.request_log: RequestLog | None = None  # the cold path, when --request-log is on
        self.throttle: Throttle | None = None  # per-caller limits, when --throttle is on
        self.faults = FaultTable()  # injected faults (admin API); replaced by the server's table
        self.limits = limits
        self.connections: set[HttpProtocol] = set()
        self.callers: dict[str, int] = {}  # caller address -> its admitted connections open now
        self.refused: set[HttpProtocol] = set()  # refused connections lingering until their 503 is read
        self.date_block = date_block(unix_time)
        self.now = now  # loop.time() as of the last tick
        self.now_unix = unix_time  # time.time() as of the last tick
        self.draining = False  # set by shutdown: every reply closes its connection

    def tick(self, now: float, unix_time: float) -> None:
        """Once a second: refresh the Date block, enforce deadlines."""
        self.now = now
        self.now_unix = unix_time
        self.date_block = date_block(unix_time)
        self._expire([connection for connection in self.connections if now >= connection.deadline], now)
        for connection in [c for c in self.refused if now >= c.deadline]:
            self.refused.discard(connection)
            connection.transport.abort()

    def _expire(self, due: list[HttpProtocol], now: float) -> None:
        """Deadlines in slices of EXPIRE_SLICE, with pending I/O served between them.

        Expiring a connection costs 18-39 µs (a close or a 408), so 1,000 at
        once stalled the worker ~18-39 ms (reliability.md); a slice is ~2-4 ms.
        """
        for connection in due[:EXPIRE_SLICE]:
            connection.check_deadlines(now)
        if len(due) > EXPIRE_SLICE:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a direct call): the rest now
                self._expire(due[EXPIRE_SLICE:], now)
                return
            loop.call_soon(self._expire, due[EXPIRE_SLICE:], now)


class HttpProtocol(asyncio.Protocol):
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
        "closing",
        "lingering",
        "write_paused",
        "backlog",
        "deadline",
        "captured",
        "waiting",
        "counters",
        "replies_in_read",
        "request_log",
        "logged",
        "log_head",
        "window",
        # ---- per request ----
        "in_request",
        "head_done",
        "head_pending",
        "url",
        "head_bytes",
        "header_count",
        "metadata_ok",
        "forwarded",
        "keep_alive_asked",
        "upgrade_asked",
        "plain",
        "if_none_match",
        "body",
        "reject",
    )

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.vm: SnapshotStore = NOBODY  # the caller's VM, set once the peer is known
        self.peer = ""
        self.limits = state.limits
        self.parser = httptools.HttpRequestParser(self)
        self.out: list[bytes] = []
        self.closing = False
        self.lingering = False  # closing with a FIN sent, reading and dropping until the client closes
        self.write_paused = False
        self.backlog = b""  # unread input held while the transport is paused
        self.deadline = 0.0  # when this connection must next have progressed
        # Replies of the current read, in order, while it may still be remembered.
        self.captured: list[RequestReply] | None = None
        self.waiting: _Wait | None = None  # a held long-poll
        self.counters = state.counters
        self.replies_in_read = 0  # replies produced by the current read, for the latency histogram
        self.request_log = state.request_log
        self.logged: list[tuple[LogStub, int]] = []  # this read's replies, for the request log
        self.log_head: tuple[str, str, int] = ("", "", 0)  # (caller, vm, generation), the log's record head
        self.window: CallerWindow | None = None  # the caller's throttle window, when throttling is on
        self.in_request = False
        self.head_done = False
        self.head_pending = 0
        self.reject: Reply | None = None
        self._reset_request()

    # ---- asyncio callbacks ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.write = self.transport.write
        self.peer = caller_key(transport.get_extra_info("peername"))  # address, and zone when link-local
        state = self.state
        # The caller's VM is decided once per connection (house rule: not per request).
        self.vm = state.registry.store_for(self.peer or None)
        open_by_caller = state.callers.get(self.peer, 0)
        if open_by_caller >= self.limits.max_connections_per_caller:
            self._refuse(_CALLER_CONNECTIONS_FULL, open_by_caller, self.limits.max_connections_per_caller)
            return
        if len(state.connections) >= self.limits.max_connections_per_worker:
            self._refuse(_WORKER_CONNECTIONS_FULL, len(state.connections), self.limits.max_connections_per_worker)
            return
        state.callers[self.peer] = open_by_caller + 1
        if state.throttle is not None:
            self.window = state.throttle.for_caller(self.peer)
        state.connections.add(self)
        if self.counters is not None:
            self.counters[_OPENED_SLOT] += 1
        self.deadline = self.state.now + self.limits.keep_alive_timeout_s

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.backlog = b""
        state = self.state
        if self not in state.connections:
            state.refused.discard(self)  # refused on accept: never admitted, never counted
            return
        state.connections.remove(self)
        still_open = state.callers[self.peer] - 1
        if still_open:
            state.callers[self.peer] = still_open
        else:
            del state.callers[self.peer]  # the table holds only callers with connections open
        if self.counters is not None:
            self.counters[_CLOSED_SLOT] += 1
        if self.waiting is not None:
            self.waiting = None
            self.vm.watchers.discard(self)

    def _refuse(self, reply: Reply, open_now: int, limit: int) -> None:
        """Over a connection limit: a 503 before any request, then shut our side and linger."""
        state = self.state
        self.closing = True  # whatever the client sends is read and discarded
        if self.counters is not None and reply.reject is not None:
            self.counters[LAYOUT.reject_slot(reply.reject)] += 1
        if EVENT_LOG.allow("connection_refused", state.now_unix):
            current = self.vm.current
            EVENT_LOG.write(
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
        if self.closing:
            return
        started = perf_counter_ns()
        if self.backlog or len(data) > FEED_SLICE_BYTES:
            self.backlog += data
            self._feed_backlog()
        else:
            # A throttled caller's requests take the parser, where the limit is checked.
            if self.in_request or self.state.draining or self.window is not None or not data.endswith(END_OF_HEAD):
                self._feed(data)
            elif not self._answer_known(data):
                self._feed_and_remember(data)
            self._flush()
        if self.replies_in_read:
            self._account(started)

    def _account(self, started: int | None) -> None:
        """Telemetry and the request log for the replies just produced, `started` ns after their bytes came.

        Called after every read, and after replies produced outside one (a
        held reply released, writing resumed, a deadline's 408); `started`
        None: no latency to record.
        """
        replies = self.replies_in_read
        if replies:
            self.replies_in_read = 0
            # One latency per read, for each reply it produced: two clock reads
            # per read, whatever the pipeline depth.
            elapsed = perf_counter_ns() - started if started is not None else 0
            counters = self.counters
            if counters is not None and started is not None:
                # latency_bucket(), inlined (64 -> 41 ns)
                bucket = elapsed.bit_length() - _LATENCY_FIRST_BIT
                bucket = 0 if bucket < 0 else (bucket if bucket < _LATENCY_LAST_BUCKET else _LATENCY_LAST_BUCKET)
                counters[_LATENCY_SLOT + bucket] += replies
                counters[_LATENCY_SUM_SLOT] += elapsed * replies
            logged = self.logged
            if logged:
                # The cold path's hand-off (the request log writes in batches, off this path).
                # One reply per read is the common case: its record goes straight into the
                # log's flat buffer, RequestLog.record_read inlined (0.46 -> 0.33 µs, tuning.md),
                # as four references, no copies (the request log's format; tuning.md).
                request_log = self.request_log
                assert request_log is not None
                current = self.vm.current
                head = self.log_head
                if current is None:
                    head = (self.peer, "", 0)
                elif head[2] != current.generation:
                    head = self.log_head = (self.peer, self.vm.vm_id, current.generation)
                if len(logged) == 1:
                    buffer = request_log.buffer
                    if len(buffer) < _MAX_LOG_VALUES:
                        buffer += (head, time(), logged[0], elapsed // 1000)
                    else:
                        request_log.dropped += 1
                else:
                    request_log.record_read(time(), head, elapsed // 1000, logged)
                logged.clear()

    def _answer_known(self, data: bytes) -> bool:
        """Answer a read of known request heads from the memo; False if any is new."""
        snapshot = self.vm.current
        if snapshot is None:
            return False
        known = snapshot.request_replies
        heads = data[:-4]
        out = self.out
        date = self.state.date_block
        # One request per read is the common case: no list, no tuple, nothing
        # the cyclic GC tracks is allocated for it. Its branch is the loop
        # below written out for one reply, on purpose (0.84 -> 0.67 µs per
        # request, tuning.md): keep the two in step.
        counters = self.counters
        reply = known.get(heads)
        if reply is not None:
            head, body, self.closing, requests_slot, bytes_slot, reject_slot, logged = reply
            out.append(head)
            out.append(date)
            out.append(body)
            self.replies_in_read = 1
            if counters is not None:
                counters[requests_slot] += 1
                counters[bytes_slot] += len(body)
                if reject_slot:
                    counters[reject_slot] += 1
            if self.request_log is not None:
                self.logged.append(logged)
        else:
            replies = []
            for head in heads.split(END_OF_HEAD):
                reply = known.get(head)
                if reply is None:
                    return False
                replies.append(reply)
            for head, body, closes, requests_slot, bytes_slot, reject_slot, logged in replies:
                out.append(head)
                out.append(date)
                out.append(body)
                self.replies_in_read += 1
                if counters is not None:
                    counters[requests_slot] += 1
                    counters[bytes_slot] += len(body)
                    if reject_slot:
                        counters[reject_slot] += 1
                if self.request_log is not None:
                    self.logged.append(logged)
                if closes:
                    self.closing = True
                    break  # the parser would refuse what follows a close
        self.deadline = self.state.now + self.limits.keep_alive_timeout_s
        return True

    def _feed_and_remember(self, data: bytes) -> None:
        """Parse a read that starts between requests; remember its replies if it may be."""
        snapshot = self.vm.current
        self.captured = []
        self._feed(data)
        captured, self.captured = self.captured, None
        if captured is None or self.in_request or snapshot is None:
            return
        if self.closing and not (captured and captured[-1][2]):
            return  # closed by an error reply, which is never remembered
        heads = data[:-4].split(END_OF_HEAD)
        # One reply per blank-line-separated piece proves the pieces are exactly
        # the request heads (a head cannot contain a blank line).
        if len(heads) == len(captured):
            for head, reply in zip(heads, captured, strict=True):
                snapshot.remember_request(head, reply)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.deadline = self.state.now + self.limits.send_stall_timeout_s
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.closing or self.waiting is not None:
            return  # a held reply keeps reading paused and its own deadline until it is answered
        self.deadline = self.state.now + self.limits.keep_alive_timeout_s
        self.transport.resume_reading()
        if self.backlog:
            started = perf_counter_ns()
            self._feed_backlog()
            self._account(started)

    # ---- feeding the parser ----

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Requests before the upgrade were answered; we speak nothing else.
            self.closing = True
            return
        except httptools.HttpParserError:
            # Also raised for bytes after a reply that closed the connection
            # (llhttp refuses data after `Connection: close`): those get nothing.
            if not self.closing:
                self._respond(self.reject or _MALFORMED, head_only=False, keep_alive=False)
            return
        if self.waiting is not None:
            pass  # a held long-poll keeps its own deadline (timeout_sec)
        elif not self.in_request:
            self.deadline = self.state.now + self.limits.keep_alive_timeout_s
        elif not self.head_done:
            self._charge_unfinished_head(len(data))

    def _charge_unfinished_head(self, size: int) -> None:
        # httptools buffers a header until it is complete, so a head that never
        # ends must be capped here, between reads, not only in on_header.
        if self.head_pending == _BEGAN_THIS_FEED:
            self.head_pending = 0
            return
        self.head_pending += size
        if self.head_pending > self.limits.max_request_head_bytes + self.limits.max_url_bytes:
            self._respond(_HEAD_TOO_LARGE, head_only=False, keep_alive=False)

    def _feed_backlog(self) -> None:
        while self.backlog and not self.closing and not self.write_paused and self.waiting is None:
            piece, self.backlog = self.backlog[:FEED_SLICE_BYTES], self.backlog[FEED_SLICE_BYTES:]
            self._feed(piece)
            self._flush()

    def _flush(self) -> None:
        if self.waiting is not None:
            return  # replies after a held long-poll wait for it (see _release)
        out = self.out
        if out:
            self.write(b"".join(out))
            out.clear()
        if self.closing:
            self.backlog = b""
            if self.lingering:
                self._linger()
            else:
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
            _slots(category_of(self.url), reply.status, reply.reject),
            body_size,
            ("", self.url.decode("utf-8", "backslashreplace"), reply.status),
        )
        self._sample_error("limit_hit", reply.status, self.url)
        out = self.out
        out.append(reply.head)
        if not keep_alive:
            out.append(CONNECTION_CLOSE)
            self.closing = self.lingering = True  # the server's decision: the client may still be sending
        elif self.keep_alive_asked:
            out.append(CONNECTION_KEEP_ALIVE)  # HTTP/1.0 keep-alive must be confirmed
        out.append(self.state.date_block)
        if not head_only:
            out.append(reply.body)

    # ---- httptools callbacks (only the ones we need: house rule 4) ----

    def _reset_request(self) -> None:
        self.url = b""
        self.head_bytes = 0
        self.header_count = 0
        self.metadata_ok = False
        self.forwarded = False
        self.keep_alive_asked = False
        self.upgrade_asked = False
        self.plain = True  # no body framing: the head alone decides the reply
        self.if_none_match: bytes | None = None
        self.body = b""  # kept whole (up to max_body_bytes): only an approval POST has one

    def on_message_begin(self) -> None:
        self.in_request = True
        # Fixed when the request starts, so trickling bytes cannot extend it.
        self.deadline = self.state.now + self.limits.request_timeout_s
        self.head_done = False
        self.head_pending = _BEGAN_THIS_FEED

    def on_url(self, url: bytes) -> None:
        # httptools may deliver the URL in pieces when it spans reads.
        if self.url:
            url = self.url + url
        self.url = url
        if len(url) > self.limits.max_url_bytes:
            self.reject = _URI_TOO_LONG
            raise _Reject

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        self.head_bytes += len(name) + len(value) + 4
        if self.header_count > self.limits.max_header_count or self.head_bytes > self.limits.max_request_head_bytes:
            self.reject = _HEAD_TOO_LARGE
            raise _Reject
        if len(name) not in _WATCHED_HEADER_SIZES:
            return
        name = name.lower()
        if name == b"metadata":
            self.metadata_ok = value.lower() == b"true"
        elif name == b"x-forwarded-for":
            self.forwarded = True
        elif name == b"connection":
            self.keep_alive_asked = b"keep-alive" in value.lower()
        elif name == b"upgrade":
            # We never switch protocols, and httptools stops parsing after an
            # upgrade request, so its reply must announce the close (and
            # linger: never remembered, since the memo closes at once).
            self.upgrade_asked = True
            self.plain = False
        elif name == b"if-none-match":
            self.if_none_match = value
        elif name in _BODY_FRAMING_HEADERS:
            self.plain = False
            if name == b"expect" and value.lower() == b"100-continue" and not self.closing:
                # Let a client that waits for it send its body (the limit still applies).
                self.out.append(CONTINUE)

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > self.limits.max_body_bytes:
            self.reject = _BODY_TOO_LARGE
            raise _Reject
        self.body += body

    def on_message_complete(self) -> None:
        if self.closing:
            return  # a request after one that closed the connection is not answered
        self.in_request = False
        state = self.state
        method = self.parser.get_method()
        url = self.url
        window = self.window
        fault = None
        # The window is the wall-clock second the last tick fired in (ticks fire just after
        # each one); the loop clock's whole seconds are offset from ticks, so one could span two.
        if window is not None and not window.allow(category_of(url) == "identity", int(state.now_unix)):
            reply = _THROTTLED  # decided before any routing: cheaper than serving
        elif state.faults.active and (fault := state.faults.match(self.vm.vm_id, url, time())) is not None:
            injected = self._inject(fault, method, url)
            if injected is None:
                return  # the connection was reset
            reply = injected
        else:
            reply = resolve(self.vm.current, method, url, self.metadata_ok, self.forwarded, body=self.body)
        if (
            self.parser.should_keep_alive()
            and not reply.close
            and not state.draining
            and not self.upgrade_asked
            and method != b"CONNECT"
        ):
            # HTTP/1.0 keep-alive must be confirmed; HTTP/1.1's is implicit.
            connection = CONNECTION_KEEP_ALIVE if self.keep_alive_asked else b""
            closes = False
        else:
            connection = CONNECTION_CLOSE
            closes = self.closing = True
            # Lingering unless the client itself asked to close (see the module rules).
            self.lingering = reply.close or state.draining or self.upgrade_asked or self.parser.should_keep_alive()
        if WAIT_MARK in url and reply.status == 200:
            self.plain = False  # its answer depends on time: never remembered
            wait = wait_spec(url)
            if isinstance(wait, Reply):
                reply = wait
            elif (
                wait is not None
                and self.waiting is None  # one held per connection: one pipelined behind it is answered now, in order
                and (wait.last_etag is None or wait.last_etag == reply.etag)
            ):
                self._hold(_Wait(method, url, self.metadata_ok, self.forwarded, reply.etag, connection, closes))
                self.deadline = state.now + wait.timeout_s
                self._reset_request()
                return
        head, body = self._append_reply(reply, method, connection, self.if_none_match)
        if reply.status >= 400:
            self._sample_error("request_error", reply.status, url)
        status = 304 if head is reply.not_modified else reply.status
        slots = _slots(category_of(url), status, reply.reject)
        stub = (method.decode("latin-1"), url.decode("utf-8", "backslashreplace"), status)
        self._note(slots, len(body), stub)
        if fault is not None and fault.latency_s:
            self._delay(fault.latency_s)
        if self.captured is not None:
            if self.plain and method in _REMEMBERED_METHODS and not reply.volatile and fault is None:
                self.captured.append((head + connection, body, closes, *slots, (stub, len(body))))
            else:
                self.captured = None
        self._reset_request()

    def _inject(self, fault: Fault, method: bytes, url: bytes) -> Reply | None:
        """A fault's reply to this request (for latency: the real one, delayed later); None after a reset."""
        if self.counters is not None:
            self.counters[LAYOUT.fault_slot(fault.kind)] += 1
        if fault.reply is not None:
            if fault.identity_reply is not None and category_of(url) == "identity":
                return fault.identity_reply
            return fault.reply
        if fault.latency_s:
            return resolve(self.vm.current, method, url, self.metadata_ok, self.forwarded, body=self.body)
        # A reset: what was answered before it goes out first (and may be lost to the RST, as on a real network).
        self.closing = True
        self._reset_request()
        if self.out and self.waiting is None:  # replies behind a held one (long-poll, latency) never overtake it
            self.write(b"".join(self.out))
            self.out.clear()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.transport.abort()
        return None

    def _delay(self, seconds: float) -> None:
        """Hold this reply, and any behind it, for `seconds` (injected latency)."""
        if self.waiting is not None:
            return  # already held (a long-poll or an earlier delay): this reply waits behind it, in order
        self.waiting = _DELAYED
        self.transport.pause_reading()
        asyncio.get_running_loop().call_later(seconds, self._end_delay)

    def _end_delay(self) -> None:
        if self.waiting is not _DELAYED:
            return  # the connection was lost meanwhile
        self.waiting = None
        self._resume_after_hold()

    def _resume_after_hold(self) -> None:
        """A held reply (long-poll or injected latency) is answered: send it and those behind it, read on."""
        if not self.closing:
            self.deadline = self.state.now + self.limits.keep_alive_timeout_s
            self.transport.resume_reading()
        self._flush()
        self._account(None)  # what the hold kept back: its latency is the wait, not ours
        if self.backlog:
            started = perf_counter_ns()
            self._feed_backlog()
            self._account(started)

    def _sample_error(self, event: str, status: int, target: bytes) -> None:
        """Warm path: log a refused request, as often as the event log's rate limit lets it."""
        if EVENT_LOG.allow(event, self.state.now_unix):
            current = self.vm.current
            EVENT_LOG.write(
                event,
                self.state.now_unix,
                {
                    "caller": self.peer,
                    "vm": self.vm.vm_id if current is not None else None,
                    "generation": current.generation if current is not None else None,
                    "status": status,
                    "target": target[:256].decode("latin-1"),
                },
            )

    def _note(self, slots: tuple[int, int, int], size: int, stub: LogStub) -> None:
        """Count a reply (telemetry) and keep it for the request log, when those are on."""
        self.replies_in_read += 1
        counters = self.counters
        if counters is not None:
            counters[slots[0]] += 1
            counters[slots[1]] += size
            if slots[2]:
                counters[slots[2]] += 1
        if self.request_log is not None:
            self.logged.append((stub, size))

    def _append_reply(
        self, reply: Reply, method: bytes, connection: bytes, if_none_match: bytes | None
    ) -> tuple[bytes, bytes]:
        """Queue one reply (a 304 when If-None-Match matches); returns its head and body."""
        if if_none_match is not None and reply.etag is not None and etag_matches(if_none_match, reply.etag):
            head, body = reply.not_modified, b""
        else:
            head, body = reply.head, b"" if method == b"HEAD" else reply.body
        out = self.out
        out.append(head)
        out.append(connection)
        out.append(self.state.date_block)
        out.append(body)
        return head, body

    # ---- long-polling ----

    def _hold(self, wait: _Wait) -> None:
        """Park a long-poll: costs no CPU until the VM publishes or the deadline passes."""
        if self.out:  # replies to the requests before it go now; not _flush: if it closes, its reply must go first
            self.write(b"".join(self.out))
            self.out.clear()
        self.waiting = wait
        self.vm.watchers.add(self)
        self.transport.pause_reading()  # nothing after it is answered before it

    def on_publish(self) -> None:
        """The VM changed: answer the held long-poll if its view did."""
        wait = self.waiting
        if wait is None or wait is _DELAYED:
            return
        reply = resolve(self.vm.current, wait.method, wait.url, wait.metadata_ok, wait.forwarded)
        if reply.etag != wait.awaited:
            self._release(reply)

    def _release(self, reply: Reply) -> None:
        wait = self.waiting
        assert wait is not None
        self.waiting = None
        self.vm.watchers.discard(self)
        later = self.out[:]  # replies to pipelined requests that came after the long-poll
        self.out.clear()
        connection = wait.connection
        if self.state.draining and not wait.closes:
            connection, self.closing, self.lingering = CONNECTION_CLOSE, True, True
        _head, body = self._append_reply(reply, wait.method, connection, None)
        # Counted and logged by _resume_after_hold, without a latency: its wait is the client's choice.
        stub = (wait.method.decode("latin-1"), wait.url.decode("utf-8", "backslashreplace"), reply.status)
        self._note(_slots(category_of(wait.url), reply.status, reply.reject), len(body), stub)
        self.out.extend(later)
        self._resume_after_hold()

    def _release_with_current(self) -> None:
        wait = self.waiting
        assert wait is not None
        self._release(resolve(self.vm.current, wait.method, wait.url, wait.metadata_ok, wait.forwarded))

    # ---- deadlines and shutdown ----

    def check_deadlines(self, now: float) -> None:
        if now < self.deadline or self.waiting is _DELAYED:
            return
        if self.closing and self.waiting is None:
            if self.transport.is_closing():
                self.transport.abort()  # closed, but its last replies never drained: the client stopped reading
            elif self.lingering:
                self._close()  # the linger is over
            return
        if self.waiting is not None:
            self._release_with_current()  # timeout_sec passed: answer with the current value
        elif self.write_paused:
            self.transport.abort()  # the client stopped reading; drop what it did not take
        elif self.in_request:
            self._respond(_REQUEST_TIMEOUT, head_only=False, keep_alive=False)
            self._flush()
            self._account(None)  # logged, but not a read's reply: no latency to record
        else:
            self.closing = self.lingering = True
            self._linger()  # idle keep-alive: a request may be on its way

    def shutdown(self) -> None:
        """Half-close now if idle; otherwise the pending reply closes (state.draining).

        Idle closes in stages (RFC 9112 §9.6): a FIN now, then whatever arrives
        is read and dropped (`closing`) until the client closes its side or
        `finish_shutdown`. A request already on its way meets a clean end of
        stream, never a reset (a close with unread input sends RST).
        """
        if self.waiting is _DELAYED:
            # Its delayed reply goes when the delay ends (the grace period caps it), then a lingering close.
            self.closing = self.lingering = True
            return
        if self.waiting is not None:
            self._release_with_current()
            return
        if not self.in_request and not self.backlog and not self.closing:
            self.closing = True
            self.transport.write_eof()

    def finish_shutdown(self) -> None:
        """The linger is over: fully close a connection that is closing.

        A started request, and a reply held by injected latency, keep the grace period to finish.
        """
        if self.closing and self.waiting is None:
            self._close()

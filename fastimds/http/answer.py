"""The answer path: from a parsed request to queued reply bytes.

Rules of this module:
- One request, in this order: the caller's throttle window (a 429 before
  any routing, in the identity family's shape for identity requests), then
  an injected fault (fastimds.imds.faults; the parser path only: the
  request memo never holds what a fault could match), then
  `routing.resolve`, which decides, and spends the VM's signing budget
  (`state.signing`, fastimds.imds.signing) when it signs afresh. Nothing is
  formatted or encoded here per request: replies are pre-rendered, and
  this queues their bytes.
- Effects leave the request path: a reply that carries one (an
  `Approval`, fastimds.imds.effects) goes with the approving VM's id to the
  worker's approval sink (`state.approvals`), which only notes it and says
  whether it was taken (the VM past its approval rate: Azure's 429 instead).
  The sink writes files and the control publishes later, off the loop's
  parser callbacks: a publish inside one could re-enter this connection (a
  long-poll on it). Finding effects costs one attribute test per parsed
  request (`reply.volatile`, true for the few volatile replies).
- Telemetry costs a few list increments per reply (fastimds.ops.telemetry);
  with --request-log, each read's replies go to the log in one call
  (`_account`). Both can be off, and then cost one `is None` test each.
- Refused requests are sampled into the worker's event log
  (`state.event_log`) under its rate limit.
- A reset fault closes with SO_LINGER 0 (an RST).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from time import time
from typing import Final

from fastimds.http.fields import CLOCK_NS
from fastimds.http.holds import Holds, Wait
from fastimds.http.memo import LogStub, MemoEntry, reply_slots
from fastimds.http.phases import CLOSING, IDLE, IN_BODY, LINGERING
from fastimds.imds.effects import Approval
from fastimds.imds.faults import Fault
from fastimds.imds.identity import ERRORS as IDENTITY_ERRORS
from fastimds.imds.render import CONNECTION_CLOSE, CONNECTION_KEEP_ALIVE, ERRORS, Reply
from fastimds.imds.routing import WAIT_MARK, category_of, etag_matches, resolve, wait_spec
from fastimds.ops.request_log import MAX_BUFFERED_VALUES as _MAX_LOG_VALUES
from fastimds.ops.telemetry import LATENCY_FIRST_BIT, LATENCY_LAST_BUCKET, LAYOUT

_REMEMBERED_METHODS: Final = frozenset({b"GET", b"HEAD"})
_THROTTLED: Final = ERRORS["throttled"]
_THROTTLED_IDENTITY: Final = IDENTITY_ERRORS["throttled"]  # the identity family's shape (spec §7)
# SO_LINGER on, zero seconds: close() sends an RST instead of a FIN.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


# Counter offsets the hot path uses, read once (fastimds.ops.telemetry.LAYOUT).
_LATENCY_SLOT: Final = LAYOUT.latency
_LATENCY_SUM_SLOT: Final = LAYOUT.latency_sum_ns
_LATENCY_FIRST_BIT: Final = LATENCY_FIRST_BIT
_LATENCY_LAST_BUCKET: Final = LATENCY_LAST_BUCKET


class AnswerPath(Holds):
    """HttpProtocol's answer methods (a part in its one chain, fastimds.http.fields)."""

    __slots__ = ()

    def _resolve(self, method: bytes, url: bytes, metadata_ok: bool, forwarded: bool, body: bytes = b"") -> Reply:
        """What this connection's VM answers now (imds.routing.resolve), with the worker's keys and the VM's
        signing budget (a dict lookup, fastimds.imds.signing): the parser path, held long-polls and delays."""
        state = self.state
        return resolve(
            self.vm.current,
            method,
            url,
            metadata_ok,
            forwarded,
            body=body,
            keys=state.keys,
            budget=state.signing.for_vm(self.vm.vm_id),
        )

    def on_message_complete(self) -> None:
        if self.phase is not IN_BODY:
            return  # a request after one that closed the connection is not answered
        self.phase = IDLE
        state = self.state
        method = self.parser.get_method()
        url = self.url
        window = self.window
        fault = None
        # The window is the wall-clock second the last tick fired in (ticks fire just after
        # each one); the loop clock's whole seconds are offset from ticks, so one could span two.
        if window is not None and not window.allow(identity := category_of(url) == "identity", int(state.now_unix)):
            reply = _THROTTLED_IDENTITY if identity else _THROTTLED  # decided before any routing: cheaper
        elif state.faults.active and (fault := state.faults.match(self.vm.vm_id, url, time())) is not None:
            injected = self._inject(fault, method, url)
            if injected is None:
                return  # the connection was reset
            reply = injected
        else:
            reply = self._resolve(method, url, self.metadata_ok, self.forwarded, self.body)
            if reply.volatile and type(reply) is Approval:
                reply = self._hand_off(reply)
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
            closes = True
            # Lingering unless the client itself asked to close (see fastimds.http.connection).
            lingers = reply.close or state.draining or self.upgrade_asked or self.parser.should_keep_alive()
            self.phase = LINGERING if lingers else CLOSING
        if WAIT_MARK in url and reply.status == 200:
            self.rememberable = False  # its answer depends on time: never remembered
            wait = wait_spec(url)
            if isinstance(wait, Reply):
                reply = wait
            elif (
                wait is not None
                and self.hold is None  # one held per connection: one pipelined behind it is answered now, in order
                and (wait.last_etag is None or wait.last_etag == reply.etag)
            ):
                self._hold(Wait(method, url, self.metadata_ok, self.forwarded, reply.etag, connection, closes))
                # From a fresh clock, not the tick's `now`: a wait must never end early (worker_state's rules).
                self.deadline = state.clock() + wait.timeout_s
                self._reset_request()
                return
        head, body = self._append_reply(reply, method, connection, self.if_none_match)
        if reply.status >= 400:
            self._sample_error("request_error", reply.status, url)
        status = 304 if head is reply.not_modified else reply.status
        slots = reply_slots(category_of(url), status, reply.reject)
        stub = (method.decode("latin-1"), url.decode("utf-8", "backslashreplace"), status)
        self._note(slots, len(body), stub)
        if fault is not None and fault.latency_s:
            self._delay(fault.latency_s)
        if self.remembering is not None:
            if self.rememberable and method in _REMEMBERED_METHODS and not reply.volatile and fault is None:
                self.remembering.append(MemoEntry(head + connection, body, closes, slots, (stub, len(body))))
            else:
                self.remembering = None
        self._reset_request()

    def _hand_off(self, approval: Approval) -> Reply:
        """Give an approval, with the VM that sent it, to the sink; the reply to send (see the module rules)."""
        if self.state.approvals.approve(self.vm.vm_id, approval.event_ids):
            return approval
        return _THROTTLED

    def _inject(self, fault: Fault, method: bytes, url: bytes) -> Reply | None:
        """A fault's reply to this request (for latency: the real one, delayed later); None after a reset."""
        if self.counters is not None:
            self.counters[LAYOUT.fault_slot(fault.kind)] += 1
        if fault.reply is not None:
            if fault.identity_reply is not None and category_of(url) == "identity":
                return fault.identity_reply
            return fault.reply
        if fault.latency_s:
            reply = self._resolve(method, url, self.metadata_ok, self.forwarded, self.body)
            if type(reply) is Approval:
                return self._hand_off(reply)
            return reply
        # A reset: what was answered before it goes out first (and may be lost to the RST, as on a real network).
        self.phase = CLOSING
        self._reset_request()
        if self.out and self.hold is None:  # replies behind a held one (long-poll, latency) never overtake it
            self.write(b"".join(self.out))
            self.out.clear()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.transport.abort()
        return None

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

    def _sample_error(self, event: str, status: int, target: bytes) -> None:
        """Warm path: log a refused request, as often as the event log's rate limit lets it."""
        event_log = self.state.event_log
        if event_log.allow(event, self.state.now_unix):
            current = self.vm.current
            event_log.write(
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
            elapsed = CLOCK_NS() - started if started is not None else 0
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

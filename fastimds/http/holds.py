"""Held replies: long-polls (`wait_for_change`) and injected latency.

Rules of this module:
- A long-poll parks its connection in its VM store's watchers (`Hold.LONG_POLL`):
  the replies to requests behind it wait, and the store's next publish (or
  the deadline sweep, or draining) answers it. It costs no CPU while parked.
  One is held per connection: a long-poll pipelined behind a held one is
  answered with the current value, in its place after it.
- Reading goes on while a long-poll is held (issue 16), so a client that
  gives up (closes) is seen at once: `eof_received` drops the hold and the
  connection closes, freeing its caller's connection slot, instead of
  holding it in CLOSE-WAIT until timeout_sec. Input that arrives meanwhile
  is kept unparsed (`_keep_while_held`), up to MAX_HELD_INPUT_BYTES; past
  that reading pauses until the hold ends (and a FIN is seen only then).
  A client that half-closes after a long-poll is taken as gone: it is not
  answered.
- Injected latency (fastimds.imds.faults) holds the connection the same way
  (`Hold.DELAYED`), with a timer: its reply and those behind it wait, in order.
- A released reply is counted and logged without a latency (its wait is the
  client's choice or the fault's, not ours), then reading resumes and any
  input kept meanwhile is fed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

from fastimds.http.fields import CLOCK_NS
from fastimds.http.memo import MemoPath, reply_slots
from fastimds.http.phases import DELAYED, ENDED, LONG_POLL, Phase
from fastimds.imds.render import CONNECTION_CLOSE, Reply
from fastimds.imds.routing import category_of

# Input kept unparsed behind a held long-poll while reading goes on. A client
# waiting on a long-poll sends nothing more, or a few requests (~200 bytes
# each) pipelined behind it: one feed slice (8 KiB) is ample. Past it reading
# pauses until the hold ends, so a client cannot park unbounded input here.
MAX_HELD_INPUT_BYTES: Final = 8 * 1024


@dataclass(slots=True, frozen=True)
class Wait:
    """A held long-poll: the request to re-resolve and the ETag it waits to change from."""

    method: bytes
    url: bytes
    metadata_ok: bool
    forwarded: bool
    awaited: bytes | None
    connection: bytes
    closes: bool


class Holds(MemoPath):
    """HttpProtocol's held-reply methods (a part in its one chain, fastimds.http.fields)."""

    __slots__ = ()

    # ---- long-polling ----

    def _hold(self, wait: Wait) -> None:
        """Park a long-poll: costs no CPU until the VM publishes or the deadline passes."""
        if self.out:  # replies to the requests before it go now; not _flush: if it closes, its reply must go first
            self.write(b"".join(self.out))
            self.out.clear()
        self.hold = LONG_POLL
        self.wait = wait
        self.vm.watchers.add(self)
        # Reading goes on (the client's FIN must be seen), but nothing after it is parsed
        # (`_feed` keeps it, fastimds.http.connection): nothing after it is answered before it.

    def _keep_while_held(self, data: bytes) -> None:
        """Input behind a held long-poll: kept unparsed for after its reply; past the bound, stop reading."""
        self.backlog += data
        if len(self.backlog) > MAX_HELD_INPUT_BYTES:
            self.transport.pause_reading()  # resumed when the held reply goes (_resume_after_hold)

    def eof_received(self) -> bool | None:
        """The client closed its side: a held long-poll is dropped now, not at its timeout_sec (issue 16).

        Returning None lets the transport close; connection_lost then frees
        the caller's connection slot. Without a hold this is asyncio's default.
        """
        if self.hold is LONG_POLL:
            self.hold = self.wait = None
            self.vm.watchers.discard(self)
            self.out.clear()  # replies to requests behind it: nobody will read them
            self.backlog = b""
            self.phase = Phase.CLOSING
        return None

    def on_publish(self) -> None:
        """The VM changed: answer the held long-poll if its view did."""
        wait = self.wait
        if self.hold is not LONG_POLL or wait is None:
            return
        # Re-resolving signs afresh for clock-dependent views (an attested document): within the VM's budget.
        reply = self._resolve(wait.method, wait.url, wait.metadata_ok, wait.forwarded)
        if reply.etag != wait.awaited:
            self._release(reply)

    def _release(self, reply: Reply) -> None:
        wait = self.wait
        assert wait is not None
        self.hold = self.wait = None
        self.vm.watchers.discard(self)
        later = self.out[:]  # replies to pipelined requests that came after the long-poll
        self.out.clear()
        connection = wait.connection
        if self.state.draining and not wait.closes:
            connection, self.phase = CONNECTION_CLOSE, Phase.LINGERING
        _head, body = self._append_reply(reply, wait.method, connection, None)
        # Counted and logged by _resume_after_hold, without a latency: its wait is the client's choice.
        stub = (wait.method.decode("latin-1"), wait.url.decode("utf-8", "backslashreplace"), reply.status)
        self._note(reply_slots(category_of(wait.url), reply.status, reply.reject), len(body), stub)
        self.out.extend(later)
        self._resume_after_hold()

    def _release_with_current(self) -> None:
        wait = self.wait
        assert wait is not None
        self._release(self._resolve(wait.method, wait.url, wait.metadata_ok, wait.forwarded))

    # ---- injected latency ----

    def _delay(self, seconds: float) -> None:
        """Hold this reply, and any behind it, for `seconds` (injected latency)."""
        if self.hold is not None:
            return  # already held (a long-poll or an earlier delay): this reply waits behind it, in order
        self.hold = DELAYED
        self.transport.pause_reading()
        asyncio.get_running_loop().call_later(seconds, self._end_delay)

    def _end_delay(self) -> None:
        if self.hold is not DELAYED:
            return  # the connection was lost meanwhile
        self.hold = None
        self._resume_after_hold()

    def _resume_after_hold(self) -> None:
        """A held reply (long-poll or injected latency) is answered: send it and those behind it, read on."""
        if self.phase is Phase.HELD:
            self.phase = Phase.IDLE
        if self.phase not in ENDED:
            if self.write_paused:
                # A client not reading stays unread, on the send-stall deadline (as pause_writing
                # sets it); resume_writing reads on. Resuming here let its input pile up unbounded.
                self.deadline = self.state.now + self.limits.send_stall_timeout_s
            else:
                self.deadline = self.state.now + self.limits.keep_alive_timeout_s
                self.transport.resume_reading()
        self._flush()
        self._account(None)  # what the hold kept back: its latency is the wait, not ours
        if self.backlog:
            started = CLOCK_NS()
            self._feed_backlog()
            self._account(started)

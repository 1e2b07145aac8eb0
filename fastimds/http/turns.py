"""Taking turns: a connection with a large pipelined backlog gives way to the others.

Rules of this module:
- A read larger than FEED_SLICE_BYTES is fed to the parser in slices
  (fastimds.http.connection `_feed_backlog`). Feeding stops once the
  connection has worked MAX_WORK_PER_TURN_NS in this turn of the loop with
  input left: it pauses reading, and `_take_turn` feeds the rest on the
  loop's next turn (`loop.call_soon`), after the callbacks already due (the
  other connections' reads). One VM pipelining megabytes of requests then
  holds another VM's request for about one turn, not for the whole backlog
  (5.8 s before this; reliability.md "High: one tenant stalling others").
- The bound is a time, checked once per slice where slices are fed, never
  per request and never on the one-read paths (the request memo, a read
  under FEED_SLICE_BYTES): requests cost from ~7 µs (a remembered reply
  through the parser) to ~400 µs (a fresh RSA signature, itself bounded
  per VM by fastimds.imds.signing), so a request count fair to one kind is
  a hundred times too loose or too tight for the other.
- Replies stay in order: the backlog is one byte string, fed front to
  back, and each slice's replies go out in one write before the next.
- Reading stays paused while the backlog is not empty, for whichever
  reason (a turn given way, the transport paused, a held reply); whoever
  ends the pause feeds the backlog: `_take_turn` here, `resume_writing`,
  or a released hold (fastimds.http.holds). A turn that finds the
  connection paused, held or closing does nothing: the input is then fed
  by that path, or dropped with the connection.
- Without a running loop (a direct call in a test), there is nothing to
  give way to: the backlog is fed at once, as before.
"""

from __future__ import annotations

import asyncio

from fastimds.http.caller_owner import CallerOwner
from fastimds.http.fields import CLOCK_NS
from fastimds.http.phases import ENDED

# A connection's work per turn of the loop before it gives way, while input is
# left. Measured on the two-core test machine (reliability.md, "High: one tenant
# stalling others"; CPU time, so other load counts less): an 8 KiB slice costs
# ~0.5 ms of remembered replies through the parser and ~1.2 ms of cached tokens,
# and giving way after every slice cost 1.03-1.04x the CPU of never giving way
# (within the noise), so the bound can be short: another VM's request then waits
# at most ~1 ms plus one slice for this connection.
MAX_WORK_PER_TURN_NS = 1_000_000


class TakingTurns(CallerOwner):
    """HttpProtocol's turn-taking methods (a part in its one chain, fastimds.http.fields)."""

    __slots__ = ()

    def _turn_ends(self) -> int:
        """When the turn that starts now is over (perf_counter_ns); never, without a loop to give way to."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return 1 << 62
        return CLOCK_NS() + MAX_WORK_PER_TURN_NS

    def _give_way(self) -> None:
        """This turn's work is done and input is left: stop reading, feed the rest on the next turn."""
        self.transport.pause_reading()
        if not self.giving_way:
            self.giving_way = True
            asyncio.get_running_loop().call_soon(self._take_turn)

    def _take_turn(self) -> None:
        """The loop's next turn: feed the backlog on, and read again once it is fed."""
        self.giving_way = False
        hold = self.hold  # a local: self.hold is read again after _feed_backlog changes it (mypyc narrowing)
        if self.phase in ENDED or self.write_paused or hold is not None:
            return  # dropped with the connection, or fed by resume_writing or the released hold
        started = CLOCK_NS()
        self._feed_backlog()
        self._account(started)
        if not self.giving_way and not self.write_paused and self.hold is None and self.phase not in ENDED:
            self.transport.resume_reading()

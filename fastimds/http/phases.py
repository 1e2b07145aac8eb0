"""A connection's state, as two small enums instead of flags and sentinels.

Rules of this module:
- `Phase` is where a connection is in its life: between requests, inside
  one (three steps, for the head limits), or ending (three ways). `Hold` is
  whether its replies are held back, and by what. They are two enums, not
  one, because they overlap for real: a long-poll held on a connection that
  will close after it (`Connection: close`), and a request half-parsed
  behind a held long-poll (pipelined in the same read), are both normal.
- Transitions (fastimds.http.connection and its parts):

      IDLE ──on_message_begin──▶ HEAD_BEGUN ──end of that read──▶ IN_HEAD
        ▲                             │                              │
        │                      on_headers_complete ◀─────────────────┘
        │                             ▼
        └──on_message_complete─── IN_BODY

      any live phase ──reply closes, client asked (or reset, upgrade, refused)──▶ CLOSING
      any live phase ──the server decides to close (error, deadline, draining)──▶ LINGERING
      anything ──connection_lost──▶ CLOSED

  A request that begins after a close in the same read leaves the ending
  phase alone (it is not answered). IDLE ──a long-poll held by that read──▶
  HELD ──its reply sent──▶ IDLE: a held connection's reads never take the
  request memo (which answers only IDLE connections) and are kept unparsed. Hold: None ──a long-poll──▶ LONG_POLL,
  None ──injected latency──▶ DELAYED, and back to None when the held reply
  is sent (or the connection is lost).
- Hot paths compare members with `is` against module-level names bound
  once (`_IDLE = Phase.IDLE`): as cheap as the boolean tests they replace.
  `ENDED` (a frozenset: hashing a member is a Python call) is for cold paths.
"""

from __future__ import annotations

from enum import Enum
from typing import Final


class Phase(Enum):
    IDLE = "idle"  # between requests: the keep-alive deadline runs; the request memo may answer
    HEAD_BEGUN = "head begun"  # a request began during this read: its bytes are charged from the next read
    IN_HEAD = "in head"  # a head spans reads: each read is charged against the head limits
    IN_BODY = "in body"  # the head is complete; the body (or the message's end) is due
    # A long-poll is held and nothing after it is parsed: input is kept unparsed (fastimds.http.holds)
    # while reading goes on, so the client's FIN is seen; back to IDLE when the held reply goes.
    HELD = "held"
    CLOSING = "closing"  # the client asked to close (or a reset, an upgrade, a refusal): close once written
    LINGERING = "lingering"  # the server decided to close: a FIN, then input is read and dropped for a while
    CLOSED = "closed"  # the transport is gone


class Hold(Enum):
    LONG_POLL = "long-poll"  # wait_for_change: parked in its VM store's watchers
    DELAYED = "delayed"  # injected latency: a timer sends the held reply


ENDED: Final = frozenset({Phase.CLOSING, Phase.LINGERING, Phase.CLOSED})

# Members bound once as module names: the hot paths import these and compare with `is`
# (a global load, not an attribute load on the enum class).
IDLE: Final = Phase.IDLE
HEAD_BEGUN: Final = Phase.HEAD_BEGUN
IN_HEAD: Final = Phase.IN_HEAD
IN_BODY: Final = Phase.IN_BODY
HELD: Final = Phase.HELD
CLOSING: Final = Phase.CLOSING
LINGERING: Final = Phase.LINGERING
CLOSED: Final = Phase.CLOSED
DELAYED: Final = Hold.DELAYED
LONG_POLL: Final = Hold.LONG_POLL

"""One request's head and body, as httptools reports them, and their limits.

Rules of this module:
- Only the callbacks we need (house rule 4): each records what the answer
  path needs of the request (URL, the header facts, the body) and nothing
  more. Most header names are passed over after one set lookup.
- Limits are checked where the bytes arrive: the URL in `on_url`, header
  count and size in `on_header`, the body in `on_body`. Breaking one raises
  `_Reject` out of the parser with the reply to give on the connection; the
  connection's `_feed` answers it and closes (lingering).
- The phase moves here (fastimds.http.phases): IDLE -> HEAD_BEGUN on a new
  request, -> IN_BODY when its head is complete; a request that begins after
  a close leaves the ending phase alone.
"""

from __future__ import annotations

from typing import Final

from fastimds.http.fields import ConnectionFields
from fastimds.http.phases import ENDED, HEAD_BEGUN, IDLE, IN_BODY, IN_HEAD
from fastimds.imds.render import CONTINUE, ERRORS

# Header names whose presence makes a request's bytes unfit to remember:
# a body may follow them, or a 100 Continue must precede the reply.
_BODY_FRAMING_HEADERS: Final = frozenset({b"content-length", b"transfer-encoding", b"expect"})
# Lengths of every header name on_header looks at, so that most names are
# passed over after one set lookup.
_WATCHED_HEADER_SIZES: Final = frozenset(
    {len(name) for name in (b"metadata", b"x-forwarded-for", b"connection", b"upgrade", b"if-none-match")}
    | {len(name) for name in _BODY_FRAMING_HEADERS}
)

_HEAD_TOO_LARGE: Final = ERRORS["head_too_large"]
_URI_TOO_LONG: Final = ERRORS["uri_too_long"]
_BODY_TOO_LARGE: Final = ERRORS["body_too_large"]


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the reply is on the protocol."""


class RequestHead(ConnectionFields):
    """HttpProtocol's httptools callbacks (the chain's first part over ConnectionFields: one object, one layout)."""

    __slots__ = ()

    def _reset_request(self) -> None:
        self.url = b""
        self.head_bytes = 0
        self.header_count = 0
        self.metadata_ok = False
        self.forwarded = False
        self.keep_alive_asked = False
        self.upgrade_asked = False
        self.rememberable = True
        self.if_none_match = None
        self.body = b""

    def on_message_begin(self) -> None:
        if self.phase is IDLE:  # after a close in the same read, the phase stays: it is not answered
            self.phase = HEAD_BEGUN
        # Fixed when the request starts, so trickling bytes cannot extend it.
        self.deadline = self.state.now + self.limits.request_timeout_s

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
            self.rememberable = False
        elif name == b"if-none-match":
            self.if_none_match = value
        elif name in _BODY_FRAMING_HEADERS:
            self.rememberable = False
            if name == b"expect" and value.lower() == b"100-continue" and self.phase not in ENDED:
                # Let a client that waits for it send its body (the limit still applies).
                self.out.append(CONTINUE)

    def on_headers_complete(self) -> None:
        phase = self.phase
        if phase is HEAD_BEGUN or phase is IN_HEAD:
            self.phase = IN_BODY

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > self.limits.max_body_bytes:
            self.reject = _BODY_TOO_LARGE
            raise _Reject
        self.body += body

"""Pure byte builders: every reply the server sends is made here, ahead of time.

Rules of this module:
- Functions here turn values into finished wire bytes and nothing else: no
  I/O, no clock, no asyncio. They run when a snapshot is built or at import,
  never per request (the exceptions: `method_not_allowed`, an error path
  that echoes the request, and the volatile token replies of
  fastimds.imds.identity, which count down).
- A `Reply` is everything but the two per-response parts: the optional
  `Connection` header and the `Date` line, which the protocol adds from
  constants it refreshes once a second (see `date_block`).
- A `Reply` is immutable once made: everything it is (its reject reason,
  whether it is volatile) is given to the function that makes it.
- JSON is compact and key-sorted, as real IMDS answers; the instance
  document's values are already strings when they reach here
  (fastimds.imds.datafile normalises them; `extended` keeps its JSON types).
- Every error body is JSON, because credential chains treat a non-JSON answer
  as "this is not IMDS" (spec §3.1).
"""

from __future__ import annotations

import hashlib
from dataclasses import KW_ONLY, dataclass, field
from email.utils import formatdate
from typing import Any

import orjson

from fastimds import __version__
from fastimds.imds.versions import API_VERSIONS, NEWEST_VERSIONS

# Clients probe for "IMDS/" in Server (MSAL.NET) or "imds" (MSAL Python).
SERVER_HEADER = f"Server: IMDS/fastimds-{__version__}\r\n".encode()

CONTENT_TYPE_JSON = b"application/json; charset=utf-8"
CONTENT_TYPE_TEXT = b"text/plain; charset=utf-8"

STATUS_LINES: dict[int, bytes] = {
    code: f"HTTP/1.1 {code} {reason}\r\n".encode()
    for code, reason in (
        (200, "OK"),
        (201, "Created"),  # from here on, the admin API's too (fastimds.control.admin_api)
        (304, "Not Modified"),
        (400, "Bad Request"),
        (401, "Unauthorized"),
        (404, "Not Found"),
        (405, "Method Not Allowed"),
        (408, "Request Timeout"),
        (409, "Conflict"),
        (410, "Gone"),
        (413, "Payload Too Large"),
        (414, "URI Too Long"),
        (429, "Too Many Requests"),
        (431, "Request Header Fields Too Large"),
        (500, "Internal Server Error"),
        (503, "Service Unavailable"),
    )
}

CONNECTION_CLOSE = b"Connection: close\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CONNECTION_KEEP_ALIVE = b"Connection: keep-alive\r\n"

JSON_OPTIONS = orjson.OPT_SORT_KEYS


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class Reply:
    """A finished response, but for its Connection header and Date line; immutable once made.

    `head` is the status line and fixed headers (each ending in CRLF, without
    the blank line); `body` is sent after the Date block except for HEAD.
    `close` forces the connection closed after this reply (used by replies to
    requests whose framing can no longer be trusted). A 200 carries an `etag`
    (quoted, as on the wire) and `not_modified`, its finished 304 head.
    `reject` is the telemetry reject reason this reply counts as; `volatile`
    says it depends on more than the request (the clock), so it is never
    memoised.

    Frozen because snapshots, memos and every connection share one Reply:
    assigning to one raises (dataclasses.FrozenInstanceError). Reading a slot
    of a frozen slots dataclass costs what a plain slot does (56 ns for six
    reads either way, timeit); making one costs ~1 µs more than a plain class
    (~1.3 µs against ~0.3 µs), paid when a snapshot renders, and per request
    only by the replies made per request (tokens, 405s), whose json_reply
    costs ~4.6 µs anyway. Equality stays identity (eq=False), as before.
    """

    status: int
    head: bytes
    body: bytes
    close: bool = False
    etag: bytes | None = None
    _: KW_ONLY
    reject: str | None = None
    volatile: bool = False
    not_modified: bytes = field(init=False)

    def __post_init__(self) -> None:
        etag = self.etag
        not_modified = STATUS_LINES[304] + SERVER_HEADER + b"ETag: " + etag + b"\r\n" if etag is not None else b""
        object.__setattr__(self, "not_modified", not_modified)  # the one write a frozen dataclass allows: here

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:60]!r}{', close' if self.close else ''})"


def make_reply(
    status: int,
    body: bytes,
    content_type: bytes = CONTENT_TYPE_JSON,
    extra_headers: bytes = b"",
    close: bool = False,
    *,
    reject: str | None = None,
    volatile: bool = False,
) -> Reply:
    # A 200's ETag is a hash of its body: it changes exactly when the view
    # does, whatever the generation, so 304s and long-polls wake only on
    # real changes.
    etag = b'"' + hashlib.blake2b(body, digest_size=8).hexdigest().encode() + b'"' if status == 200 else None
    head = b"".join(
        (
            STATUS_LINES[status],
            SERVER_HEADER,
            b"Content-Type: ",
            content_type,
            b"\r\nContent-Length: ",
            str(len(body)).encode(),
            b"\r\n",
            b"ETag: " + etag + b"\r\n" if etag is not None else b"",
            extra_headers,
        )
    )
    return Reply(status, head, body, close, etag, reject=reject, volatile=volatile)


def json_body(value: Any) -> bytes:
    # orjson 3.13 hands back its whole working buffer (16 KiB for the 3.5 KB
    # sample document); rendered bodies live as long as their snapshot, so
    # they are copied to their exact length (~0.2 µs, once per rendering).
    return memoryview(orjson.dumps(value, option=JSON_OPTIONS)).tobytes()


def json_reply(
    status: int,
    value: Any,
    extra_headers: bytes = b"",
    close: bool = False,
    *,
    reject: str | None = None,
    volatile: bool = False,
) -> Reply:
    return make_reply(
        status, json_body(value), CONTENT_TYPE_JSON, extra_headers, close, reject=reject, volatile=volatile
    )


def text_reply(text: str) -> Reply:
    return make_reply(200, text.encode(), CONTENT_TYPE_TEXT)


def error_reply(
    status: int, message: str, close: bool = False, extra: dict[str, Any] | None = None, *, reject: str | None = None
) -> Reply:
    return json_reply(status, {"error": message, **(extra or {})}, close=close, reject=reject)


def render_listing(children: list[tuple[str, bool]]) -> str:
    """The text view of a container: one child per line, "/" on containers.

    No trailing newline, like a leaf's text value, so `$(curl ...)` and line
    readers see the same thing. Array children are listed by index.
    """
    return "\n".join(name + "/" if is_container else name for name, is_container in children)


def date_block(unix_time: float) -> bytes:
    """The Date header plus the blank line that ends a response head."""
    return b"Date: " + formatdate(unix_time, usegmt=True).encode() + b"\r\n\r\n"


def method_not_allowed(path: str, method: str, allow: bytes) -> Reply:
    # Wording from the Azure docs' error table (spec §3.5).
    message = f'Http method isn\'t allowed: Path = "{path}", Method = "{method}"'
    return json_reply(405, {"error": message}, extra_headers=b"Allow: " + allow + b"\r\n")


BAD_API_VERSION_MESSAGE = (
    "Bad request. api-version is invalid or was not specified in the request. "
    "For more information refer to aka.ms/azureimds"
)


def bad_version_reply(newest: tuple[str, ...]) -> Reply:
    """The 400 for a missing or invalid api-version, listing `newest` (newest first) as Azure does (spec §3.3)."""
    return error_reply(400, BAD_API_VERSION_MESSAGE, extra={"newest-versions": list(newest)}, reject="bad_version")


# A 429's words and header, shared by both families' bodies (identity's shape: fastimds.imds.identity).
THROTTLED_MESSAGE = "Too many requests. Retry after the time in Retry-After"
RETRY_AFTER_1 = b"Retry-After: 1\r\n"

# Request-time failures, one pre-rendered reply per kind (house rule 10). A `reject`
# is the telemetry reason the reply counts under (fastimds.ops.telemetry REJECT_REASONS).
ERRORS: dict[str, Reply] = {
    "missing_metadata_header": error_reply(
        400, "Bad request. Required metadata header not specified", reject="missing_header"
    ),
    "forwarded": error_reply(400, "Bad request. Requests with X-Forwarded-For are not accepted", reject="forwarded"),
    # Every listed version's three newest; an endpoint with versions of its own lists its own
    # (fastimds.imds.routing `Versions`).
    "bad_api_version": bad_version_reply(NEWEST_VERSIONS),
    "duplicate_parameter": error_reply(400, "Bad request. Duplicate query parameter names are not allowed"),
    "bad_format": error_reply(400, "Bad request. format must be json or text"),
    "bad_extended": error_reply(400, "Bad request. extended must be true or false"),
    "bad_wait": error_reply(
        400, "Bad request. wait_for_change must be true or false and timeout_sec a whole number from 1 to 3600"
    ),
    "leaf_needs_text": error_reply(400, "Bad request. Leaf nodes can only be requested with format=text"),
    "not_found": error_reply(404, "Not found"),
    "no_vm": error_reply(404, "Not found. No VM is registered for this caller's address"),
    # Wording from Azure's load balancer troubleshooting page (spec §3.5).
    "no_loadbalancer": error_reply(
        404,
        "No load balancer metadata is found. Please check if your VM is using any non-basic SKU load balancer "
        "and retry later.",
    ),
    "json_only": error_reply(400, "Bad request. This endpoint only serves format=json"),
    "bad_nonce": error_reply(400, "Bad request. nonce must be 1 to 32 letters, digits, - or _"),
    "bad_approval": error_reply(
        400, 'Bad request. The body must be JSON: {"StartRequests": [{"EventId": "<id>"}, ...]}'
    ),
    "unknown_event": error_reply(400, "Bad request. An EventId in StartRequests is not a scheduled event of this VM"),
    "throttled": json_reply(429, {"error": THROTTLED_MESSAGE}, extra_headers=RETRY_AFTER_1, reject="throttled"),
    # The same bytes, counted apart: a VM past its signing budget (fastimds.imds.signing). Volatile:
    # the budget refills with time, so no URL cache or memo may keep it.
    "signing_budget": json_reply(
        429, {"error": THROTTLED_MESSAGE}, extra_headers=RETRY_AFTER_1, reject="signing_budget", volatile=True
    ),
    "malformed": error_reply(400, "Bad request. Malformed HTTP request", close=True, reject="parse_error"),
    "head_too_large": error_reply(431, "Request header fields too large", close=True, reject="too_large"),
    "uri_too_long": error_reply(414, "Request-URI too long", close=True, reject="too_large"),
    "body_too_large": error_reply(413, "Request body too large", close=True, reject="too_large"),
    "request_timeout": error_reply(408, "Request not completed in time", close=True),
    # Written on accept, before any request is read (fastimds.http.connection connection limits).
    "worker_connections_full": json_reply(
        503,
        {"error": "Service unavailable. Too many connections are open; retry after the time in Retry-After"},
        extra_headers=b"Retry-After: 1\r\n",
        close=True,
        reject="connection_limit",
    ),
    "caller_connections_full": json_reply(
        503,
        {"error": "Service unavailable. This caller has too many connections open; close one or retry later"},
        extra_headers=b"Retry-After: 1\r\n",
        close=True,
        reject="caller_connection_limit",
    ),
}

VERSIONS_REPLY = json_reply(200, {"apiVersions": list(API_VERSIONS)})

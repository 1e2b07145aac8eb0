"""Hostile input through the real HttpProtocol: Hypothesis fuzzing, without sockets.

Rules of this file:
- Every input goes through `HttpProtocol.data_received` on the fake transport
  (tests.support.fakes), with the clock pinned: the Date block never moves, and the
  two replies that read the wall clock (identity tokens, attested documents)
  see a fixed time, and a token reply's x-ms-request-id a fixed random draw,
  so equal inputs must give equal bytes.
- The budget is fixed and derandomised, sized for CI (a few seconds for the
  whole file on the 2-core machine). `FUZZ_EXAMPLES=N` gives every test N
  examples drawn at random instead, for the documented long run of both
  fuzz suites (reliability.md; the statistics say how many inputs each
  test tried, and a failure prints the blob that reproduces it):
      make fuzz-long FUZZ_EXAMPLES=4000
  which is
      FUZZ_EXAMPLES=4000 .venv/bin/pytest -p no:cacheprovider \
          --hypothesis-show-statistics tests/fuzz/test_fuzz_protocol.py tests/fuzz/test_fuzz_admin.py
- Inputs are built from a corpus of good requests (each with a known answer:
  the one it gets alone on a fresh connection) and hostile pieces: mutated
  good requests (bytes inserted, deleted, flipped, duplicated, cut),
  mutated IMDS targets, odd methods and versions, hostile headers
  (control characters, huge, duplicated Metadata / Content-Length /
  Transfer-Encoding), chunked bodies (valid and broken), raw bytes, bursts
  bigger than a feed slice, and blank-line noise aimed at the request memo.
- A long-poll is held until its deadline: while the transport is paused the
  feeder, like a real event loop, delivers nothing; it then moves the loop
  clock (not the Date) past the deadline so the sweep answers it.

What must hold, for every input:
- no exception leaves data_received (the fake transport also refuses a write
  after close);
- the output is a sequence of well-formed responses: known status line,
  known headers once each, the pinned Date, Content-Length framing, a JSON
  body on every error; never a 5xx;
- a response that closes is the last, and the transport ends (closed, or
  half-closed by a lingering close) exactly when one did; a protocol-level
  refusal (400 malformed, 408, 413, 414, 431) always closes;
- no response was invented: at most one final response per blank line that
  ends a head in the input (plus one refusal), at most one 100 Continue per
  `100-continue` asked;
- good requests before the first hostile piece get exactly their solo answers;
- the served snapshot is the same object at the same generation, a reference
  request on a new connection gets the same bytes, and every head the
  request memo remembered is answered from it exactly as the parser answers
  it on a cold snapshot;
- the same bytes give the same output however they are split into reads, and
  on a snapshot whose memo earlier reads filled.
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastimds.config import Limits
from fastimds.http.connection import FEED_SLICE_BYTES, HttpProtocol
from fastimds.http.throttle import Throttle, ThrottleLimits
from fastimds.http.worker_state import ServerState
from fastimds.imds import identity, routing
from fastimds.imds.datafile import VmDescription, parse_vm
from fastimds.imds.registry import VmRegistry
from fastimds.imds.render import CONTINUE, ERRORS, SERVER_HEADER
from fastimds.imds.store import DEFAULT_VM_ID, SnapshotStore
from fastimds.ops.telemetry import new_counters
from tests.support.fakes import KEYS, PINNED_DATE, PINNED_UNIX_TIME, FakeTransport, request, sample_vm
from tests.support.fakes import remembered as memo_of
from tests.support.fuzz import budget

# ---- the budget ----


PINNED_RANDOM_BITS = 0x0123456789ABCDEF0123456789ABCDEF


class PinnedTime:
    """The `time` module as fastimds.imds.routing sees it, but for a wall clock that stands still."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def time(self) -> float:
        return PINNED_UNIX_TIME


@pytest.fixture(autouse=True, scope="module")
def pinned_clock() -> Iterator[None]:
    """Identity tokens and attested documents are signed with the time: pin it (house rule 12).

    A token reply's x-ms-request-id is random per reply: pinned to one draw here too.
    """
    with (
        mock.patch.object(routing, "time", PinnedTime()),
        mock.patch.object(identity, "getrandbits", lambda bits: PINNED_RANDOM_BITS),
    ):
        yield


# ---- the VM: the sample plus identities and a load balancer, so every endpoint answers ----

IDENTITIES = {
    "tenantId": "abd8daee-d393-4239-9377-883adda3d40f",
    "systemAssigned": {"clientId": "0d46c104-a85f-49e2-9c96-ae58c6fa927b", "objectId": "11111111-1111-4111-8111-1"},
}
LOADBALANCER = {
    "publicIpAddresses": [{"frontendIpAddress": "51.0.0.1", "privateIpAddress": "10.0.0.4"}],
    "inboundRules": [
        {
            "frontendIpAddress": "50.0.0.1",
            "protocol": "tcp",
            "frontendPort": 80,
            "backendPort": 8080,
            "privateIpAddress": "10.0.0.4",
        }
    ],
    "outboundRules": [],
}


def _fuzz_vm() -> VmDescription:
    document = copy.deepcopy(sample_vm().document)
    document["identities"] = IDENTITIES
    document["loadbalancer"] = LOADBALANCER
    return parse_vm(orjson.dumps(document), "fuzz")


VM = _fuzz_vm()

# ---- the corpus of good requests ----

INSTANCE = "/metadata/instance?api-version=2021-02-01"
TOKEN = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net"
INSTANCE_ETAG = routing.resolve(SnapshotStore(VM).current, b"GET", INSTANCE.encode(), True, False).etag
assert INSTANCE_ETAG is not None
METADATA = ("Metadata", "true")

GOOD: dict[str, bytes] = {
    "instance": request(INSTANCE),
    "leaf_text": request("/metadata/instance/compute/vmId?api-version=2017-04-02&format=text"),
    "listing": request("/metadata/instance/compute?api-version=2021-02-01&format=text"),
    "network": request("/metadata/instance/network/interface/0/ipv4?api-version=2021-02-01"),
    "extended": request("/metadata/instance?api-version=2021-03-01&extended=true"),
    "versions": request("/metadata/versions"),
    "head": request(INSTANCE, method="HEAD"),
    "no_header": request(headers=()),
    "metadata_false": request(headers=(("Metadata", "false"),)),
    "forwarded": request(headers=(METADATA, ("X-Forwarded-For", "10.9.9.9"))),
    "bad_version": request("/metadata/instance?api-version=1999-01-01"),
    "not_found": request("/metadata/instance/compute/nope?api-version=2021-02-01"),
    "duplicate_parameter": request(INSTANCE + "&api-version=2021-02-01"),
    "loadbalancer": request("/metadata/loadbalancer?api-version=2020-10-01"),
    "identity_info": request("/metadata/identity/info?api-version=2018-02-01"),
    "token": request(TOKEN),
    "attested": request("/metadata/attested/document?api-version=2021-02-01&nonce=1234567890"),
    "scheduled_events": request("/metadata/scheduledevents?api-version=2020-07-01"),
    "approval": request(
        "/metadata/scheduledevents?api-version=2020-07-01", method="POST", body=b'{"StartRequests":[{"EventId":"x"}]}'
    ),
    "post_body": request(method="POST", body=b'{"a":1}'),
    "post_chunked": request(method="POST", headers=(METADATA, ("Transfer-Encoding", "chunked")))
    + b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n",
    "options": request(method="OPTIONS"),
    "if_none_match": request(headers=(METADATA, ("If-None-Match", INSTANCE_ETAG.decode()))),
    "http10_keep_alive": request("/metadata/versions", version="1.0", headers=(METADATA, ("Connection", "keep-alive"))),
    "expect_continue": request(method="PUT", headers=(METADATA, ("Expect", "100-continue")), body=b"hello"),
    "lowercase_ows": b"GET /metadata/versions HTTP/1.1\r\nhost: x\r\nmetadata:   TRUE  \r\nuser-agent: fuzz\r\n\r\n",
    "absolute_form": request("http://169.254.169.254" + INSTANCE),
    "long_poll": request(INSTANCE + "&wait_for_change=true&timeout_sec=5"),
    "long_poll_leaf": request(
        "/metadata/instance/compute/location?api-version=2021-02-01&format=text&wait_for_change=true&timeout_sec=7"
    ),
    # These close the connection after their reply.
    "close": request("/metadata/versions", headers=(METADATA, ("Connection", "close"))),
    "http10": request("/metadata/versions", version="1.0"),
    "upgrade": request(headers=(METADATA, ("Connection", "Upgrade"), ("Upgrade", "websocket"))),
    "long_poll_close": request(
        INSTANCE + "&wait_for_change=true&timeout_sec=3", headers=(METADATA, ("Connection", "close"))
    ),
}
GOOD_NAMES = sorted(GOOD)

# The targets that mutations start from.
TARGETS = [
    INSTANCE,
    TOKEN,
    "/metadata/instance/compute/vmId?api-version=2017-04-02&format=text",
    "/metadata/instance/network/interface/0/ipv4/ipAddress/0/privateIpAddress?api-version=2021-02-01&format=text",
    "/metadata/instance?api-version=2021-03-01&extended=true",
    "/metadata/versions",
    "/metadata/loadbalancer?api-version=2020-10-01",
    "/metadata/attested/document?api-version=2021-02-01&nonce=abc",
    "/metadata/identity/info?api-version=2018-02-01",
    "/metadata/scheduledevents?api-version=2020-07-01",
    "/METADATA/instance/compute/?api-version=2021-02-01&format=json",
    "/metadata/instance/compute/tagsList/0/name?api-version=2021-02-01&format=text",
    "/metadata/instance/compute/location?api-version=2021-02-01&format=text&wait_for_change=true&timeout_sec=3",
    "/metadata/instance/%63ompute?api-version=2021-02-01#frag",
    "http://169.254.169.254/metadata/versions",
    "*",
    "/",
    "127.0.0.1:443",
]

# Two sets of limits: the defaults, and small ones that short inputs can break.
LIMITS = {
    "default": Limits(),
    "small": Limits(max_url_bytes=200, max_request_head_bytes=600, max_header_count=10, max_body_bytes=64),
}

# ---- the hostile pieces ----

NOISE = [b"\r\n", b"\r\n\r\n", b"\n", b"\n\n", b"\r\n\n", b"\n\r\n", b"\r", b" ", b"\t", b"\x00"]
SPECIAL_BYTES = [
    b"\x00",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b":",
    b"\x7f",
    b"\xff",
    b"\x80",
    b"%",
    b"%00",
    b"?",
    b"#",
    b"&",
    b"=",
    b"/",
    b"\\",
    b"\x1b",
    b"0",
    b"-",
    b",",
    b'"',
]
METHODS = [
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "TRACE",
    "CONNECT",
    "PRI",
    "PURGE",
    "SEARCH",
    "M-SEARCH",
    "get",
    "G ET",
    "",
    "GET\x00",
]
VERSIONS = [
    "HTTP/1.1",
    "HTTP/1.0",
    "HTTP/2.0",
    "HTTP/0.9",
    "HTTP/1.2",
    "HTTP/1.10",
    "http/1.1",
    "HTTP/1",
    "",
    "HTTP/1.1 x",
]
HEADER_LINES = [
    b"Metadata: true",
    b"Metadata: false",
    b"metadata: TRUE",
    b"Metadata:",
    b"Metadata: true, true",
    b"Metadata : true",
    b" Metadata: true",
    b"Content-Length: 0",
    b"Content-Length: 5",
    b"Content-Length: 6",
    b"Content-Length: -1",
    b"Content-Length: +5",
    b"Content-Length: 5, 5",
    b"Content-Length: 0x5",
    b"Content-Length: 18446744073709551616",
    b"Content-Length: 99999999",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: Chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, gzip",
    b"Transfer-Encoding: identity",
    b"Transfer-Encoding:  chunked ",
    b"Expect: 100-continue",
    b"Expect: 100-CONTINUE",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Connection: Upgrade",
    b"Upgrade: websocket",
    b"Upgrade: h2c",
    b"If-None-Match: *",
    b"If-None-Match: " + INSTANCE_ETAG,
    b"If-None-Match: W/" + INSTANCE_ETAG + b', "x"',
    b"X-Forwarded-For: 10.0.0.1",
    b"X-Fold: a\r\n b",
    b"X-Tab: a\tb",
    b"X-High: \xff\xfe",
    b"X-Ctl: a\x01b",
    b"X-Nul: a\x00b",
    b"X-Cr: a\rb",
    b"X-Empty:",
    b": no-name",
    b"No-Colon",
    b"Host: 169.254.169.254",
    b"Host: a\r\nHost: b",
]


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """`base` with 1-4 byte-level mutations."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["insert", "delete", "flip", "replace", "duplicate", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "insert":
            data[at:at] = draw(st.sampled_from(SPECIAL_BYTES) | st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "replace" and data:
            data[at : at + 1] = draw(st.sampled_from(SPECIAL_BYTES))
        elif kind == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 40))]
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


def mutated_good(names: list[str]) -> st.SearchStrategy[bytes]:
    return st.sampled_from(names).flatmap(lambda name: mutated(GOOD[name]))


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    """A chunked body: valid, or broken in one of the ways a parser must refuse."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=24), max_size=4))
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks]
    trailer = draw(st.sampled_from([b"", b"X-Trailer: 1\r\n", b"Content-Length: 5\r\n"]))
    body = b"".join(parts) + b"0\r\n" + trailer + b"\r\n"
    breakage = draw(
        st.sampled_from(["none", "mutate", "cut", "bad_size", "huge_size", "extension", "lf_only", "no_last_chunk"])
    )
    if breakage == "mutate":
        body = draw(mutated(body))
    elif breakage == "cut":
        body = body[: draw(st.integers(0, len(body)))]
    elif breakage == "bad_size":
        body = draw(st.sampled_from([b"g", b"-1", b"0x5", b" 5", b"5 ", b""])) + b"\r\nhello\r\n0\r\n\r\n"
    elif breakage == "huge_size":
        body = draw(st.sampled_from([b"ffffffffffffffffff", b"7fffffffffffffff", b"100000"])) + b"\r\nabc"
    elif breakage == "extension":
        body = b"5;" + draw(st.binary(max_size=12)) + b"\r\nhello\r\n0\r\n\r\n"
    elif breakage == "lf_only":
        body = body.replace(b"\r\n", b"\n")
    elif breakage == "no_last_chunk":
        body = b"".join(parts)
    return body


@st.composite
def hostile_request(draw: st.DrawFn) -> bytes:
    """A request line and headers drawn from hostile choices, with an optional (chunked) body."""
    method = draw(st.sampled_from(METHODS) | st.text(st.characters(codec="latin-1"), max_size=8))
    target = draw(st.sampled_from(TARGETS))
    if draw(st.booleans()):
        target = draw(mutated(target.encode())).decode("latin-1")
    version = draw(st.sampled_from(VERSIONS))
    lines = [f"{method} {target} {version}".encode("latin-1")]
    lines += draw(st.lists(st.sampled_from(HEADER_LINES), max_size=6))
    if draw(st.booleans()):  # duplicated framing headers, the request-smuggling classics
        lines += draw(st.lists(st.sampled_from(HEADER_LINES[7:22]), min_size=2, max_size=3))
    if draw(st.booleans()):
        name = draw(st.binary(min_size=1, max_size=12))
        value = draw(st.binary(max_size=24))
        lines.append(name + b": " + value)
    size = draw(st.sampled_from([0, 0, 0, 300, 700, 3000, 9000, 20000]))
    if size:  # huge: over the small limits, over a feed slice, over the head limit
        lines.append(b"X-Big: " + b"v" * size)
    many = draw(st.sampled_from([0, 0, 11, 70]))
    lines += [b"X-Many-%d: 1" % index for index in range(many)]
    headers = draw(st.permutations(lines[1:]))
    head = b"\r\n".join([lines[0], *headers]) + b"\r\n\r\n"
    body = draw(st.sampled_from([b"", b"hello", b"x" * 100]) | chunked_body())
    return head + body


def burst() -> st.SearchStrategy[bytes]:
    """Many pipelined good requests in one piece: more than a feed slice."""
    return st.tuples(st.sampled_from(["leaf_text", "versions", "no_header"]), st.integers(2, 80)).map(
        lambda pair: GOOD[pair[0]] * pair[1]
    )


def piece(names: list[str] = GOOD_NAMES) -> st.SearchStrategy[bytes]:
    """One piece of a stream: a good request or something hostile."""
    return st.one_of(
        st.sampled_from(names).map(GOOD.__getitem__),
        mutated_good(names),
        hostile_request(),
        st.binary(max_size=64),
        st.sampled_from(NOISE),
        burst(),
    )


def stream(names: list[str] = GOOD_NAMES, max_pieces: int = 6) -> st.SearchStrategy[bytes]:
    return st.lists(piece(names), min_size=1, max_size=max_pieces).map(b"".join)


@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` split into reads: whole, at random points, in fixed chunks, or a byte at a time."""
    kind = draw(st.sampled_from(["whole", "random", "fixed", "bytes"]))
    if kind == "whole" or not data:
        return [data]
    if kind == "bytes" and len(data) <= 2000:
        return [data[i : i + 1] for i in range(len(data))]
    if kind == "fixed":
        size = draw(st.integers(1, 97))
        return [data[i : i + size] for i in range(0, len(data), size)]
    points = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=12))))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# ---- connections and feeding ----

# How the connection is set up: to the VM; from an address no VM claims; with
# throttling on; while the server drains (every reply closes); to a client whose
# transport pauses writing after every write (flow control, the feed backlog).
MODES = ["vm", "nobody", "throttled", "draining", "paused"]
PEER = "127.0.0.1"


def connect(store: SnapshotStore, limits: Limits = LIMITS["default"], mode: str = "vm") -> Connection:
    """A connection from PEER to `store`'s VM, set up as `mode` says (see MODES)."""
    registry = VmRegistry(default_vm_id=None if mode == "nobody" else DEFAULT_VM_ID)
    registry.stores[DEFAULT_VM_ID] = store
    throttle = Throttle(ThrottleLimits(instance_rps=3, identity_rps=2)) if mode == "throttled" else None
    state = ServerState(
        registry, limits, now=0.0, unix_time=PINNED_UNIX_TIME, counters=new_counters(), throttle=throttle, keys=KEYS
    )
    state.draining = mode == "draining"
    protocol = HttpProtocol(state)
    transport = FakeTransport(PEER)
    protocol.connection_made(transport)
    if mode == "paused":

        def write_then_pause(data: bytes | bytearray | memoryview) -> None:
            transport.write(data)
            protocol.pause_writing()  # the socket buffer is full until the feeder drains it

        protocol.write = write_then_pause
    return Connection(protocol, transport, state)


@dataclass
class Connection:
    protocol: HttpProtocol
    transport: FakeTransport
    state: ServerState

    def feed(self, reads: list[bytes]) -> Connection:
        """Deliver `reads` as an event loop would: nothing while paused or after close."""
        for data in reads:
            self.settle()
            if self.transport.ended:
                break
            assert self.transport.reading
            self.protocol.data_received(data)
        self.settle()
        return self

    def settle(self) -> None:
        """Until reading may go on: drain the socket buffer, and let a held long-poll's
        deadline pass (the loop clock moves; the Date stays pinned)."""
        while not self.transport.ended and (self.protocol.hold is not None or self.protocol.write_paused):
            if self.protocol.hold is not None:
                self.state.tick(self.protocol.deadline + 1.0, PINNED_UNIX_TIME)
            else:
                self.protocol.resume_writing()

    @property
    def result(self) -> tuple[bytes, bool]:
        return self.transport.output, self.transport.ended


def run(
    data: bytes | list[bytes], store: SnapshotStore | None = None, limits: str = "default", mode: str = "vm"
) -> tuple[bytes, bool]:
    """The output of one connection that reads `data` (one read, or the given reads), and whether it closed."""
    reads = [data] if isinstance(data, bytes) else data
    return connect(store or SnapshotStore(VM), LIMITS[limits], mode).feed(reads).result


@cache
def solo(name: str, limits: str = "default") -> bytes:
    """What good request `name` gets alone on a fresh connection (its expected answer anywhere)."""
    output, _ = run(GOOD[name], limits=limits)
    return output


def closes_alone(name: str) -> bool:
    return run(GOOD[name])[1]


# ---- reading the output ----

STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [A-Za-z][A-Za-z -]*")
KNOWN_HEADERS = frozenset(
    {
        "server",
        "content-type",
        "content-length",
        "etag",
        "date",
        "connection",
        "allow",
        "retry-after",
        "x-ms-request-id",  # token replies (fastimds.imds.identity)
    }
)
CONTENT_TYPES = frozenset({"application/json; charset=utf-8", "text/plain; charset=utf-8"})
# Refusals decided by the protocol itself: each ends the connection.
PROTOCOL_REFUSALS = {
    ERRORS[name].body: name
    for name in ("malformed", "head_too_large", "uri_too_long", "body_too_large", "request_timeout")
}


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def closes(self) -> bool:
        return self.headers.get("connection") == "close"


def read_responses(data: bytes) -> list[Response]:
    """Parse a server's output, checking that every response in it is well formed.

    A HEAD reply carries Content-Length but no body: one whose next bytes are
    another status line (or nothing) is taken as one. No body the test VM
    serves starts with "HTTP/1.1 ".
    """
    responses: list[Response] = []
    while data:
        if data.startswith(CONTINUE):
            responses.append(Response(100))
            data = data[len(CONTINUE) :]
            continue
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"unterminated response head: {data[:200]!r}"
        status_line, *lines = head.split(b"\r\n")
        match = STATUS_LINE.fullmatch(status_line)
        assert match, f"bad status line {status_line!r}"
        status = int(match[1])
        assert status < 500, f"a server error: {data[:300]!r}"
        headers: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition(b": ")
            key = name.decode("ascii").lower()
            assert sep and key in KNOWN_HEADERS and key not in headers, f"bad header line {line!r}"
            headers[key] = value.decode("latin-1")
        assert headers["date"] == PINNED_DATE.decode()
        assert head.count(SERVER_HEADER.rstrip(b"\r\n")) == 1
        assert headers.get("connection") in (None, "close", "keep-alive")
        body = b""
        if status == 304:
            assert "content-length" not in headers and "etag" in headers
        else:
            assert headers["content-type"] in CONTENT_TYPES
            length = int(headers["content-length"])
            if length and rest and not rest.startswith(b"HTTP/1.1 "):
                assert len(rest) >= length, "body shorter than its Content-Length"
                body, rest = rest[:length], rest[length:]
                if headers["content-type"].startswith("application/json"):
                    value = orjson.loads(body)
                    assert status < 400 or "error" in value
                else:
                    body.decode("utf-8")
        responses.append(Response(status, headers, body))
        data = rest
    return responses


def assert_same_answers(got: tuple[bytes, bool], expected: tuple[bytes, bool], how: str) -> None:
    """The same responses, but for what read boundaries legitimately decide.

    httptools reports a header only once the next one starts, and a
    callback only fires on bytes it has seen whole, so where a read ends
    decides how much of a head is reported before an error stops the
    parser. Two things may therefore differ, and only ahead of a protocol
    refusal that ends the connection: a 100 Continue (sent when the
    Expect header is reported), and which refusal it is (a limit that a
    split let fire, or the malformed byte that stopped a whole read).
    """
    if got == expected:
        return
    assert got[1] == expected[1], how
    got_finals = [response for response in read_responses(got[0]) if response.status != 100]
    expected_finals = [response for response in read_responses(expected[0]) if response.status != 100]
    assert got_finals[:-1] == expected_finals[:-1] and len(got_finals) == len(expected_finals), how
    assert got_finals[-1].body in PROTOCOL_REFUSALS and expected_finals[-1].body in PROTOCOL_REFUSALS, how


HEAD_END = re.compile(rb"\n\r?\n")


def check_output(data: bytes, output: bytes, closed: bool) -> list[Response]:
    """The properties every input must have; returns the responses."""
    responses = read_responses(output)
    finals = [response for response in responses if response.status != 100]
    for index, response in enumerate(finals):
        if response.body in PROTOCOL_REFUSALS:
            assert response.closes, f"a protocol refusal ({PROTOCOL_REFUSALS[response.body]}) that does not close"
        if response.closes:
            assert index == len(finals) - 1, "a response after one that closed"
    assert closed == bool(finals and finals[-1].closes), "closed without announcing it, or announced and kept open"
    # Nothing invented: each answered request ended its head with a blank line.
    refusal = 1 if finals and finals[-1].body in PROTOCOL_REFUSALS else 0
    assert len(finals) - refusal <= len(HEAD_END.findall(data)), "more responses than requests"
    assert len(responses) - len(finals) <= data.lower().count(b"100-continue"), "a 100 Continue nobody asked for"
    return responses


# ---- the served snapshot ----

REFERENCE = GOOD["instance"]


@cache
def reference_answer() -> bytes:
    return run(REFERENCE)[0]


def served(store: SnapshotStore) -> tuple[object, int]:
    return store.current, store.generation


def check_served_unchanged(store: SnapshotStore, before: tuple[object, int]) -> None:
    """Same snapshot object, same generation, and a new connection gets the reference bytes."""
    assert served(store) == before
    assert run(REFERENCE, store) == (reference_answer(), False)


class ExplodingParser:
    """Stands in for httptools: a parse means the request memo was not used."""

    def feed_data(self, data: bytes) -> None:
        raise AssertionError(f"parsed {data[:60]!r} although it was remembered")

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"parser.{name} used although the request was remembered")


def check_memo_matches_parser(store: SnapshotStore, limits: str = "default") -> None:
    """Every remembered head gets, from the memo, exactly what the parser gives it on a cold snapshot."""
    snapshot = store.current
    assert snapshot is not None
    for head in list(memo_of(snapshot)):
        data = head + b"\r\n\r\n"
        remembered = connect(store, LIMITS[limits])
        remembered.protocol.parser = ExplodingParser()
        assert remembered.feed([data]).result == run(data, limits=limits), f"memo differs for {head!r}"


# ---- the tests ----


@budget(200)
@given(
    prefix=st.lists(st.sampled_from(GOOD_NAMES), max_size=6),
    tail=st.lists(piece(), max_size=4),
    limits=st.sampled_from(sorted(LIMITS)),
    data=st.data(),
)
def test_good_requests_before_hostile_bytes_get_their_solo_answers(
    prefix: list[str], tail: list[bytes], limits: str, data: st.DataObject
) -> None:
    store = SnapshotStore(VM)
    before = served(store)
    stream_bytes = b"".join(GOOD[name] for name in prefix) + b"".join(tail)
    reads = data.draw(cut(stream_bytes))
    output, closed = connect(store, LIMITS[limits]).feed(reads).result

    expected = b""
    for name in prefix:
        expected += solo(name, limits)
        if closes_alone(name):
            assert output == expected and closed  # nothing after a reply that closed
            break
    assert output.startswith(expected)
    if not tail:
        assert output == expected
    check_output(stream_bytes, output, closed)
    check_served_unchanged(store, before)
    check_memo_matches_parser(store, limits)


@budget(200)
@given(
    data_bytes=stream(),
    mode=st.sampled_from(MODES),
    limits=st.sampled_from(sorted(LIMITS)),
    data=st.data(),
)
def test_the_same_bytes_get_the_same_answers_however_they_are_split(
    data_bytes: bytes, mode: str, limits: str, data: st.DataObject
) -> None:
    if mode == "throttled":
        # The loop clock decides throttle windows, and releasing a long-poll moves it: no long-polls.
        data_bytes = data_bytes.replace(b"wait_for_change", b"wait_for_chang3")
    whole = run(data_bytes, limits=limits, mode=mode)
    check_output(data_bytes, *whole)
    if mode == "paused":
        assert whole == run(data_bytes, limits=limits), "flow control changed the output"
    reads = data.draw(cut(data_bytes))
    assert_same_answers(run(reads, limits=limits, mode=mode), whole, f"split into {len(reads)} reads")
    if len(data_bytes) <= 1000:
        one_byte_reads = [data_bytes[i : i + 1] for i in range(len(data_bytes))]
        assert_same_answers(run(one_byte_reads, limits=limits, mode=mode), whole, "a byte at a time")

    # Twice on one snapshot: the second read may be answered from the request memo.
    store = SnapshotStore(VM)
    before = served(store)
    assert run(data_bytes, store, limits, mode) == whole
    assert run(data_bytes, store, limits, mode) == whole
    check_served_unchanged(store, before)
    check_memo_matches_parser(store, limits)


async def _feed_taking_turns(connection: Connection, reads: list[bytes]) -> None:
    """Connection.feed on a running loop: every turn a connection gives way is taken before the next read."""
    protocol, transport = connection.protocol, connection.transport
    for data in [*reads, None]:
        while True:
            connection.settle()
            if not protocol.giving_way:
                break
            while protocol.giving_way:
                await asyncio.sleep(0)
        if data is None or transport.ended:
            break
        assert transport.reading, "reading left paused with nothing to resume it"
        protocol.data_received(data)


@budget(100)
@given(
    data_bytes=stream(),
    mode=st.sampled_from(MODES),
    limits=st.sampled_from(sorted(LIMITS)),
    slice_bytes=st.sampled_from([1, 7, 64]),
    data=st.data(),
)
def test_giving_way_between_slices_never_changes_the_answers(
    data_bytes: bytes, mode: str, limits: str, slice_bytes: int, data: st.DataObject
) -> None:
    # fastimds.http.turns: every slice its own turn of a real loop, slices a few bytes long,
    # so any read takes the backlog path and gives way between any two bytes.
    if mode == "throttled":
        data_bytes = data_bytes.replace(b"wait_for_change", b"wait_for_chang3")  # as above: no long-polls
    whole = run(data_bytes, limits=limits, mode=mode)
    reads = data.draw(cut(data_bytes))
    connection = connect(SnapshotStore(VM), LIMITS[limits], mode)
    with (
        mock.patch("fastimds.http.connection.FEED_SLICE_BYTES", slice_bytes),
        mock.patch("fastimds.http.turns.MAX_WORK_PER_TURN_NS", 0),
    ):
        asyncio.run(_feed_taking_turns(connection, reads))
    assert_same_answers(connection.result, whole, f"{len(reads)} reads in {slice_bytes}-byte turns")


@budget(25)
@given(data_bytes=stream(max_pieces=3).filter(lambda data: len(data) <= 500), limits=st.sampled_from(sorted(LIMITS)))
def test_every_two_piece_split_gets_the_same_answers(data_bytes: bytes, limits: str) -> None:
    whole = run(data_bytes, limits=limits)
    for at in range(1, len(data_bytes)):
        assert_same_answers(run([data_bytes[:at], data_bytes[at:]], limits=limits), whole, f"split at {at}")


@budget(120)
@given(reads=st.lists(stream(max_pieces=3), min_size=2, max_size=6), limits=st.sampled_from(sorted(LIMITS)))
def test_no_read_changes_what_another_connection_is_answered(reads: list[bytes], limits: str) -> None:
    # Every connection shares one snapshot (its URL and request memos fill as they go);
    # each must get exactly what it gets alone on a snapshot nothing has touched.
    store = SnapshotStore(VM)
    before = served(store)
    for read in [*reads, *reads]:
        assert run(read, store, limits) == run(read, limits=limits)
    check_served_unchanged(store, before)
    check_memo_matches_parser(store, limits)


@budget(150)
@given(data_bytes=st.binary(max_size=600) | st.text(max_size=300).map(lambda text: text.encode()), data=st.data())
def test_arbitrary_bytes_get_responses_or_a_400_and_a_close(data_bytes: bytes, data: st.DataObject) -> None:
    store = SnapshotStore(VM)
    before = served(store)
    reads = data.draw(cut(data_bytes))
    output, closed = run(reads, store)
    responses = check_output(data_bytes, output, closed)
    if responses and responses[-1].closes and responses[-1].body == ERRORS["malformed"].body:
        assert responses[-1].status == 400
    check_served_unchanged(store, before)


@budget(60)
@given(
    hostile=hostile_request(),
    smuggled=st.sampled_from(["instance", "leaf_text", "versions"]),
    limits=st.sampled_from(sorted(LIMITS)),
    data=st.data(),
)
def test_hostile_framing_never_desynchronises_the_next_request(
    hostile: bytes, smuggled: str, limits: str, data: st.DataObject
) -> None:
    # Whatever the hostile head and body were, the good request after them is
    # either answered exactly as alone, as the last response, or never answered
    # (the hostile one closed the connection first).
    stream_bytes = hostile + GOOD[smuggled]
    output, closed = run(data.draw(cut(stream_bytes)), limits=limits)
    responses = check_output(stream_bytes, output, closed)
    if not closed:
        assert output.endswith(solo(smuggled, limits)) or not responses or responses[-1].status == 100


def test_the_corpus_answers_as_intended() -> None:
    # The good requests get real answers (not all refusals), the closing ones close,
    # and the small limits refuse none of them.
    statuses = {name: read_responses(solo(name))[-1].status for name in GOOD}
    assert statuses["instance"] == statuses["token"] == statuses["attested"] == statuses["loadbalancer"] == 200
    assert statuses["if_none_match"] == 304
    assert statuses["post_chunked"] == 405
    assert [name for name in GOOD if closes_alone(name)] == ["close", "http10", "upgrade", "long_poll_close"]
    assert all(solo(name, "small") == solo(name) for name in GOOD)
    assert len(GOOD["leaf_text"]) * 80 > FEED_SLICE_BYTES  # a burst can span feed slices


def test_the_checks_catch_what_they_claim_to() -> None:
    # The output checks are not vacuous: each broken output is refused.
    good = solo("versions")
    broken = {
        "extra response": (GOOD["versions"], good + good, False),
        "close not announced": (GOOD["versions"], good, True),
        "response after close": (GOOD["close"] * 2, solo("close") * 2, True),
        "server error": (GOOD["versions"], good.replace(b"200 OK", b"500 Internal Server Error"), False),
        "bad framing": (GOOD["versions"], good[:-1], False),
    }
    for name, (data_bytes, output, closed) in broken.items():
        with pytest.raises(AssertionError):
            check_output(data_bytes, output, closed)
            pytest.fail(name)
    # Split comparisons let through only a 100 Continue or a different refusal ahead of the close.
    refused = run(b"\x00 not http\r\n\r\n")
    assert read_responses(refused[0])[-1].status == 400
    assert_same_answers((CONTINUE + refused[0], True), refused, "a 100 Continue before a refusal")
    too_long = run(request("/metadata/versions?" + "x" * 300), limits="small")
    assert read_responses(too_long[0])[-1].status == 414
    assert_same_answers(too_long, refused, "another refusal")
    for other in ((solo("instance"), False), (good, True), (good + refused[0], True), (CONTINUE + good, False)):
        with pytest.raises(AssertionError):
            assert_same_answers(other, (good, False), "")
            pytest.fail(repr(other[0][:60]))

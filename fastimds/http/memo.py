"""The request memo: whole request heads this snapshot has answered, and their finished replies.

Rules of this module:
- Known requests skip the parser. A read that starts between requests and
  ends with a blank line is split at blank lines; when every piece is a
  request head the caller's snapshot has already answered, the remembered
  replies are written without parsing. Only heads of body-less GET/HEAD
  requests, parsed whole in one read, with no fault, long-poll or volatile
  reply, are remembered: for them the bytes alone decide the reply.
  Anything else takes the parser. Measured in tuning.md ("request memo").
- The memo belongs to this layer: it lives in the snapshot's opaque
  `http_cache` slot (fastimds.imds.snapshot), so it dies with the snapshot
  on every publish and needs no clearing for VM changes.
- Fault changes clear it by construction: a new memo registers with its
  worker's fault table (`FaultTable.depend`), whose every load empties the
  memos registered with it; nobody else has to remember to forget, and a
  lookup pays nothing for it. A worker has one fault table, so a memo is
  filled and read under that one table.
- The one-reply branch is the hottest code in the server (0.84 -> 0.67 µs
  per request once the single request stopped allocating, tuning.md): one
  request per read allocates nothing the cyclic GC tracks, makes no call
  but the dict lookup, three appends and `len`, and stores the keep-alive
  deadline the tick precomputed. Pipelined reads take the same loop, with a
  list of their entries (one code path: nothing to keep in step).
- Entries are `MemoEntry` (a slots class, not a NamedTuple: unpacking a
  tuple subclass takes CPython 3.11's generic path, which allocates an
  iterator per request; a slot read is a specialised LOAD_ATTR_SLOT).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Final

from mypy_extensions import mypyc_attr

from fastimds.http.phases import CLOSING, IDLE
from fastimds.http.request_head import RequestHead
from fastimds.imds.faults import FaultTable
from fastimds.imds.snapshot import Snapshot
from fastimds.ops.telemetry import LAYOUT

# Whole request heads remembered per snapshot, and the longest one kept: a
# real client sends a handful of distinct heads of ~100-300 bytes.
MAX_REQUEST_MEMO_ENTRIES: Final = 1024
MAX_REQUEST_MEMO_KEY_BYTES: Final = 1024

END_OF_HEAD: Final = b"\r\n\r\n"

# What the request log needs of a reply: (method, target, status), decoded once.
LogStub = tuple[str, str, int]
# What the request log keeps of a reply, (LogStub, body size), and a record's head, (caller, vm,
# generation): the shapes are fastimds.ops.request_log_format's Sent and Head. Typed as variadic
# tuples because the mypyc build unboxes fixed-length tuples into C structs and boxes them anew
# wherever they are stored: the remembered ones would be copied on every logged request.
LoggedReply = tuple[Any, ...]
LogHead = tuple[Any, ...]


@lru_cache(maxsize=len(LAYOUT.categories) * (len(LAYOUT.codes) + 1) * (len(LAYOUT.reasons) + 1) * 2)
def reply_slots(category: str, status: int, reject: str | None) -> tuple[int, int, int]:
    """The telemetry slots of one reply: (requests by category and code, bytes, reject or 0)."""
    return (
        LAYOUT.request_slot(category, status),
        LAYOUT.bytes_slot(category),
        LAYOUT.reject_slot(reject) if reject is not None else 0,  # 0: not a reject (slot 0 is never one)
    )


class MemoEntry:
    """One remembered reply, finished but for its Date block."""

    __slots__ = ("head", "body", "closes", "requests_slot", "bytes_slot", "reject_slot", "logged", "joined", "dated")

    def __init__(
        self,
        head: bytes,
        body: bytes,
        closes: bool,
        slots: tuple[int, int, int],
        logged: LoggedReply,
    ) -> None:
        self.head = head  # status line and headers, its Connection header included
        self.body = body  # b"" for HEAD (and 304)
        self.closes = closes  # the client asked to close: the connection closes after it
        # Its telemetry slots (fastimds.ops.telemetry.LAYOUT): requests by category and code, bytes, reject or 0.
        self.requests_slot, self.bytes_slot, self.reject_slot = slots
        self.logged = logged  # what the request log keeps of it: (its stub, its body size), made once
        # head + Date block + body as one object, for the Date block `dated` (see `with_date`).
        self.joined = b""
        self.dated: bytes | None = None

    def with_date(self, date: bytes) -> bytes:
        """The whole reply with `date` as its Date block, kept until the block changes (once a second).

        A read of one known request then writes this one object: bytes.join of
        a single bytes returns it as is, so no body is copied per request.
        """
        joined = self.joined = b"".join((self.head, date, self.body))
        self.dated = date
        return joined


# A Python class in both builds: mypyc's native subclasses of dict never clear their weak
# references when freed, and the fault table holds memos weakly (a memo freed with its
# snapshot left a dangling weak reference, and the next collection crashed).
@mypyc_attr(native_class=False)
class RequestMemo(dict[bytes, MemoEntry]):
    """A snapshot's remembered request heads -> entries, emptied by every fault load.

    A dict itself, not a holder of one: the hot path calls `.get` on it with
    no attribute load in between (typed as a dict there, so that the mypyc
    build calls the dict's C lookup). Weakly referable, for the fault table.
    """

    __slots__ = ("__weakref__",)


def known_requests(snapshot: Snapshot | None) -> dict[bytes, MemoEntry]:
    """What `snapshot`'s memo would answer now (empty when it has none)."""
    memo: RequestMemo | None = snapshot.http_cache if snapshot is not None else None
    return memo if memo is not None else {}


def remember(snapshot: Snapshot, heads: list[bytes], entries: list[MemoEntry], faults: FaultTable) -> None:
    """Keep each head's entry in `snapshot`'s memo (made, and registered with `faults`, if it has none)."""
    memo: RequestMemo | None = snapshot.http_cache
    if memo is None:
        memo = snapshot.http_cache = RequestMemo()
        faults.depend(memo)  # a fault load empties it
    for head, entry in zip(heads, entries, strict=True):
        if len(memo) < MAX_REQUEST_MEMO_ENTRIES and len(head) <= MAX_REQUEST_MEMO_KEY_BYTES:
            memo[head] = entry


class MemoPath(RequestHead):
    """HttpProtocol's memo methods (a part in its one chain, fastimds.http.fields: one object, one layout,
    no extra hop per request)."""

    __slots__ = ()

    def _answer_known(self, data: bytes) -> bool:
        """Answer a read of known request heads from the memo; False if any is new (the parser decides)."""
        snapshot = self.vm.current
        if snapshot is None:
            return False
        memo: dict[bytes, MemoEntry] | None = snapshot.http_cache  # a RequestMemo
        if memo is None:
            return False  # nothing remembered yet
        heads = data[:-4]
        entry = memo.get(heads)
        entries: Sequence[MemoEntry] = ()  # one request per read, the common case: no list
        count = 1
        if entry is None:
            pipelined: list[MemoEntry] = []
            for head in heads.split(END_OF_HEAD):
                known = memo.get(head)
                if known is None:
                    return False  # one unknown head: the whole read takes the parser
                pipelined.append(known)
            entries, count = pipelined, len(pipelined)
            entry = pipelined[0]
        state = self.state
        out = self.out
        date = state.date_block
        counters = self.counters
        request_log = self.request_log
        answered = 1
        while True:  # once per request of the read, in order
            body = entry.body
            out.append(entry.joined if entry.dated is date else entry.with_date(date))
            if counters is not None:
                counters[entry.requests_slot] += 1
                counters[entry.bytes_slot] += len(body)
                reject = entry.reject_slot
                if reject:
                    counters[reject] += 1
            if request_log is not None:
                self.logged.append(entry.logged)
            if entry.closes:
                self.phase = CLOSING
                break  # the parser would refuse what follows a close
            if answered == count:
                break
            entry = entries[answered]
            answered += 1
        self.replies_in_read = answered
        self.deadline = state.keep_alive_deadline
        return True

    def _feed_and_remember(self, data: bytes) -> None:
        """Parse a read that starts between requests; remember its replies if it may be.

        The caller has set `remembering` to an empty list: on_message_complete
        adds each reply's entry to it, or sets it to None (not to be remembered).
        """
        snapshot = self.vm.current
        self._feed(data)
        remembering, self.remembering = self.remembering, None
        if remembering is None or snapshot is None:
            return
        phase = self.phase
        if phase is not IDLE and not (phase is CLOSING and remembering and remembering[-1].closes):
            return  # a request left unfinished, or closed by an error reply (never remembered)
        heads = data[:-4].split(END_OF_HEAD)
        # One reply per blank-line-separated piece proves the pieces are exactly
        # the request heads (a head cannot contain a blank line).
        if len(heads) == len(remembering):
            remember(snapshot, heads, remembering, self.state.faults)

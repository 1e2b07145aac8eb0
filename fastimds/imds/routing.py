"""resolve(): one request in, one finished reply out.

Rules of this module:
- Pure: no I/O, no asyncio, no globals, no clock except for the attested
  document and tokens, which carry their time (volatile Replies, never
  memoised). The connection hands over the method, the raw request target,
  two header facts, the body (only an approval has one), the `Keys` to
  sign with and the caller's VM's `SigningBudget` (fastimds.imds.signing),
  which a fresh signature spends; this returns a pre-rendered Reply. A request with an effect (a
  scheduled event's approval) gets an `Approval` reply that carries it
  (fastimds.imds.effects): recording it is the caller's job, never this
  module's.
- Failures are replies, not exceptions (house rule 10).
- Checks run in a fixed order, because clients depend on it (spec §3.3): the
  Metadata header, X-Forwarded-For, query syntax (duplicates), the category,
  the method, api-version, then format/extended, then the path walk, and
  only last the leaf-needs-text rule. MSAL's region discovery calls a leaf
  without api-version and expects the api-version 400, not the leaf 400.
- The fast path is one dict lookup of the raw target in the snapshot's
  `url_replies` (not the HTTP layer's request memo, fastimds.http.memo);
  only GET/HEAD with a good Metadata header and no X-Forwarded-For use it,
  because only then does the target alone decide the reply.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qsl, unquote

from fastimds.imds import events, identity
from fastimds.imds.attested import NONCE_PATTERN
from fastimds.imds.effects import Approval
from fastimds.imds.keys import Keys
from fastimds.imds.render import (
    ERRORS,
    VERSIONS_REPLY,
    Reply,
    bad_version_reply,
    method_not_allowed,
    render_listing,
    text_reply,
)
from fastimds.imds.signing import SigningBudget
from fastimds.imds.snapshot import Snapshot, newest_view
from fastimds.imds.versions import (
    API_VERSIONS,
    ATTESTED_VERSIONS,
    EXTENDED_FIRST_VERSION,
    IDENTITY_VERSIONS,
    INSTANCE_VERSIONS,
    LOADBALANCER_VERSIONS,
    PREVIEW_VERSION,
    SCHEDULED_EVENTS_VERSIONS,
    newest_of,
)

ALLOW_GET_HEAD = b"GET, HEAD"
ALLOW_GET_HEAD_POST = b"GET, HEAD, POST"

# Long-polling (as GCE's metadata server does it): present in a target that asks to wait.
WAIT_MARK = b"wait_for_change="
DEFAULT_WAIT_TIMEOUT_S = 60
MAX_WAIT_TIMEOUT_S = 3600
READ_METHODS = frozenset({b"GET", b"HEAD"})

_MISSING_HEADER = ERRORS["missing_metadata_header"]
_FORWARDED = ERRORS["forwarded"]
_NOT_FOUND = ERRORS["not_found"]


class Versions:
    """The api-versions one endpoint accepts, and its 400 for any other: that 400's
    `newest-versions` lists this endpoint's own newest, so a client that retries with
    `newest-versions[0]` (MSAL does) is answered (docs/azure-imds.md, "A version valid
    only for another category")."""

    __slots__ = ("valid", "refusal")

    def __init__(self, valid: frozenset[str]) -> None:
        self.valid = valid
        self.refusal = bad_version_reply(newest_of(valid))


# /metadata itself: every listed version (a real VM answered a bare GET with the
# api-version 400 and the three newest of all: spec §3.3, azure-compute-docs PR 289).
ROOT = Versions(frozenset(API_VERSIONS))
INSTANCE = Versions(INSTANCE_VERSIONS)
IDENTITY = Versions(IDENTITY_VERSIONS)
ATTESTED = Versions(ATTESTED_VERSIONS)
LOADBALANCER = Versions(LOADBALANCER_VERSIONS)
SCHEDULED_EVENTS = Versions(SCHEDULED_EVENTS_VERSIONS)
# `/metadata?api-version=...&format=text` lists the one category a 2017-era client's
# mock saw there (docs/azure-imds.md, "GET /metadata").
_ROOT_LISTING = text_reply(render_listing([("instance", True)]))


def resolve(
    snapshot: Snapshot | None,
    method: bytes,
    target: bytes,
    metadata_ok: bool,
    forwarded: bool,
    *,
    body: bytes = b"",
    keys: Keys | None = None,
    budget: SigningBudget | None = None,
) -> Reply:
    """The reply to one request against one VM's snapshot (None: the caller has no VM).

    An `Approval` (a Reply) when the request approves scheduled events.
    `keys` signs tokens and attested documents; without it those endpoints
    raise LookupError (a wiring mistake, not a request's fault). `budget`,
    the VM's signing budget, is spent by a fresh signature; past it, a 429
    (None: no budget, as for a long-poll's re-resolve of its own request).
    """
    if snapshot is not None and metadata_ok and not forwarded and method in READ_METHODS:
        reply = snapshot.url_replies.get(target)
        if reply is None:
            reply = _resolve(snapshot, method, target, metadata_ok, forwarded, body=body, keys=keys, budget=budget)
            snapshot.remember(target, reply)
        return reply
    return _resolve(snapshot, method, target, metadata_ok, forwarded, body=body, keys=keys, budget=budget)


def _signing(keys: Keys | None) -> Keys:
    if keys is None:
        raise LookupError("resolve() needs the server's Keys to sign tokens and attested documents")
    return keys


def _resolve(
    snapshot: Snapshot | None,
    method: bytes,
    target: bytes,
    metadata_ok: bool,
    forwarded: bool,
    *,
    body: bytes,
    keys: Keys | None,
    budget: SigningBudget | None,
) -> Reply:
    if not metadata_ok:
        # The identity family answers in its own error shape (azure-identity reads it).
        return identity.ERRORS["missing_header"] if category_of(target) == "identity" else _MISSING_HEADER
    if forwarded:
        return _FORWARDED
    raw_path, _, raw_query = target.decode("latin-1").partition("?")
    raw_path = raw_path.partition("#")[0]
    params = parse_qsl(raw_query.partition("#")[0], keep_blank_values=True)
    query = dict(params)
    if len(query) != len(params):
        return ERRORS["duplicate_parameter"]

    segments = [unquote(segment) for segment in raw_path.split("/")]
    if segments[-1] == "" and len(segments) > 2:
        segments.pop()  # a trailing "/" is ignored
    # segments[0] is "" (the path starts with "/"); "/metadata" is case-insensitive.
    if len(segments) < 2 or segments[0] != "" or segments[1].lower() != "metadata":
        return _NOT_FOUND
    if len(segments) == 2:
        if method not in READ_METHODS:
            return method_not_allowed(raw_path, method.decode("latin-1"), ALLOW_GET_HEAD)
        return _resolve_root(snapshot, query)
    category, route = segments[2], segments[3:]

    if category == "versions" and not route:
        if method not in READ_METHODS:
            return method_not_allowed(raw_path, method.decode("latin-1"), ALLOW_GET_HEAD)
        return VERSIONS_REPLY
    if category == "identity" and route in (["oauth2", "token"], ["info"]):
        if method not in READ_METHODS:
            return method_not_allowed(raw_path, method.decode("latin-1"), ALLOW_GET_HEAD)
        refused = _refusal(snapshot, query.get("api-version"), IDENTITY)
        if refused is not None:
            return refused
        assert snapshot is not None  # _refusal checked it
        if route == ["info"]:
            return identity.info_reply(snapshot.vm)
        # Tokens count down (expires_in): rendered per request, volatile.
        return identity.token_reply(_signing(keys).issuer, snapshot.vm, query, time.time(), budget)
    if category == "attested" and route == ["document"]:
        if method not in READ_METHODS:
            return method_not_allowed(raw_path, method.decode("latin-1"), ALLOW_GET_HEAD)
        return _resolve_attested(snapshot, query, keys, budget)
    if category == "scheduledevents" and not route:
        if method not in READ_METHODS and method != b"POST":
            return method_not_allowed(raw_path, method.decode("latin-1"), ALLOW_GET_HEAD_POST)
        return _resolve_scheduled_events(snapshot, method, query, body)
    if category == "loadbalancer" and not route:
        if method not in READ_METHODS:
            return method_not_allowed(raw_path, method.decode("latin-1"), ALLOW_GET_HEAD)
        return _resolve_loadbalancer(snapshot, query)
    if category == "instance":
        if method not in READ_METHODS:
            return method_not_allowed(raw_path, method.decode("latin-1"), ALLOW_GET_HEAD)
        return _resolve_instance(snapshot, route, query)
    return _NOT_FOUND


def _resolve_attested(
    snapshot: Snapshot | None, query: dict[str, str], keys: Keys | None, budget: SigningBudget | None
) -> Reply:
    version = query.get("api-version")
    refused = _refusal(snapshot, version, ATTESTED)
    if refused is not None:
        return refused
    assert snapshot is not None and version is not None  # _refusal checked both
    nonce = query.get("nonce")
    if nonce is not None and not NONCE_PATTERN.fullmatch(nonce):
        return ERRORS["bad_nonce"]
    # The one reply that reads the clock: the document is signed with its time.
    return _signing(keys).attestor.reply(snapshot.vm, version, nonce, time.time(), budget)


def _refusal(snapshot: Snapshot | None, version: str | None, versions: Versions) -> Reply | None:
    """What every per-VM endpoint checks first, in this order: its api-version, then that the caller has a VM."""
    if version not in versions.valid:
        return versions.refusal
    if snapshot is None:
        return ERRORS["no_vm"]
    return None


def _checked(
    snapshot: Snapshot | None, query: dict[str, str], versions: Versions, json_only: bool = False
) -> tuple[Snapshot, str, bool] | Reply:
    """(snapshot, api-version, wants text) once `_refusal` and the format check pass; else the error."""
    version = query.get("api-version")
    refused = _refusal(snapshot, version, versions)
    if refused is not None:
        return refused
    assert snapshot is not None and version is not None  # _refusal checked both
    text = _wants_text(query.get("format"))
    if text is None:
        return ERRORS["bad_format"]
    if text and json_only:
        return ERRORS["json_only"]
    return snapshot, version, text


def _resolve_loadbalancer(snapshot: Snapshot | None, query: dict[str, str]) -> Reply:
    checked = _checked(snapshot, query, LOADBALANCER, json_only=True)
    if isinstance(checked, Reply):
        return checked
    reply = checked[0].loadbalancer
    return reply if reply is not None else ERRORS["no_loadbalancer"]


def _resolve_scheduled_events(snapshot: Snapshot | None, method: bytes, query: dict[str, str], body: bytes) -> Reply:
    checked = _checked(snapshot, query, SCHEDULED_EVENTS, json_only=True)
    if isinstance(checked, Reply):
        return checked
    snapshot, version, _text = checked
    if method != b"POST":
        return snapshot.scheduled_events(version)
    approved = events.approval_ids(body)
    if approved is None:
        return ERRORS["bad_approval"]
    state = snapshot.vm.scheduled
    if not set(approved) <= events.event_ids(state):
        return ERRORS["unknown_event"]
    # Only events still Scheduled can change: approving a Started one is answered here, 200 as Azure
    # does (spec §8), with no effect (a flood of them cost a file and an fsync each: reliability.md).
    pending = frozenset(approved) & events.scheduled_ids(state)
    if not pending:
        return events.APPROVED
    return Approval.of(events.APPROVED, pending)  # recorded by the caller: this module writes nothing


def _resolve_instance(snapshot: Snapshot | None, route: list[str], query: dict[str, str]) -> Reply:
    checked = _checked(snapshot, query, INSTANCE)
    if isinstance(checked, Reply):
        return checked
    snapshot, version, text = checked
    extended = query.get("extended", "false").lower()
    if extended not in ("true", "false"):
        return ERRORS["bad_extended"]

    if not route and extended == "true" and version >= EXTENDED_FIRST_VERSION:
        view = newest_view(snapshot.extended_views, version)
        return view.text if text else view.json

    # The preview has its own shape (fastimds.imds.preview), so its own tree.
    node = snapshot.preview_root if version == PREVIEW_VERSION else snapshot.root
    for segment in route:
        child = node.children.get(segment)
        if child is None or child.since > version:
            return _NOT_FOUND
        node = child
    view = node.view_at(version)
    return view.text if text else view.json


def _resolve_root(snapshot: Snapshot | None, query: dict[str, str]) -> Reply:
    """GET /metadata: the api-version 400 without a good one; with one, a text listing, and no JSON document."""
    checked = _checked(snapshot, query, ROOT)
    if isinstance(checked, Reply):
        return checked
    return _ROOT_LISTING if checked[2] else _NOT_FOUND


def _wants_text(fmt: str | None) -> bool | None:
    """True for text, False for JSON (the default), None for anything else."""
    if fmt is None:
        return False
    fmt = fmt.lower()
    if fmt == "json":
        return False
    if fmt == "text":
        return True
    return None


class WaitSpec:
    """What a long-poll asks: wait until the view's ETag is not `last_etag` (or changes), at most `timeout_s`."""

    __slots__ = ("last_etag", "timeout_s")

    def __init__(self, last_etag: bytes | None, timeout_s: int) -> None:
        self.last_etag = last_etag
        self.timeout_s = timeout_s


def wait_spec(target: bytes) -> WaitSpec | Reply | None:
    """The long-poll a target asks for; None for none; an error Reply for bad parameters."""
    query = dict(parse_qsl(target.decode("latin-1").partition("?")[2], keep_blank_values=True))
    wait = query.get("wait_for_change", "false").lower()
    if wait not in ("true", "false"):
        return ERRORS["bad_wait"]
    if wait == "false":
        return None
    timeout = query.get("timeout_sec", str(DEFAULT_WAIT_TIMEOUT_S))
    if not timeout.isdigit() or not 0 < int(timeout) <= MAX_WAIT_TIMEOUT_S:
        return ERRORS["bad_wait"]
    last_etag = query.get("last_etag")
    if last_etag is not None and not last_etag.startswith('"'):
        last_etag = f'"{last_etag}"'  # accept the ETag with or without its quotes
    return WaitSpec(last_etag.encode("latin-1") if last_etag is not None else None, int(timeout))


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """If-None-Match against one ETag (RFC 9110: "*", lists, weak comparison)."""
    if if_none_match == etag:
        return True
    candidates = (candidate.strip() for candidate in if_none_match.split(b","))
    return any(candidate == b"*" or candidate.removeprefix(b"W/") == etag for candidate in candidates)


_CATEGORY_PREFIXES: tuple[tuple[bytes, str], ...] = (
    (b"/metadata/instance", "instance"),
    (b"/metadata/versions", "versions"),
    (b"/metadata/identity", "identity"),
    (b"/metadata/scheduledevents", "scheduledevents"),
    (b"/metadata/attested", "attested"),
    (b"/metadata/loadbalancer", "loadbalancer"),
)


def category_of(target: bytes) -> str:
    """The telemetry category of a request target (lower-cased "/metadata" prefix, as routing accepts it)."""
    lowered = target[:26].lower()
    for prefix, category in _CATEGORY_PREFIXES:
        if lowered.startswith(prefix):
            return category
    return "other"

"""Immutable snapshots: a VM description served as finished replies.

Rules of this module:
- `build_snapshot` only wraps an already validated, normalised
  `VmDescription` (fastimds.imds.datafile validates; nothing here re-validates)
  in a root node. It renders nothing and cannot fail on such a description,
  so a build that fails still raises before anything is published.
- Each view (one node's JSON or text reply at one change point) is rendered
  on first use and then kept as finished bytes: every later request for it is
  a lookup. Rendering sees only normalised data (dicts, lists, strings that
  orjson parsed), which orjson and `str.encode` cannot fail on.
- Why lazy (measured on the sample VM, 2-core bench machine): rendering every
  view of every node at build cost ~3 ms and ~1.1 MB per snapshot, while a
  client asks for a handful of paths and 10,000 VMs must fit in 1 GiB. Now a
  build and publish takes ~0.7 µs (bench rung 7), and a VM asked for its
  whole document and one leaf in two api-versions holds ~14 KB of snapshot
  on top of its ~29 KB parsed description (`python -m bench.bench_scale`:
  ~430 MiB RSS for 10,000 VMs). The price is paid once per view per
  snapshot, by the first request that needs it: ~35 µs for the whole
  document, ~55 µs for it plus a leaf after a fresh build; a walk that misses
  the URL memo costs ~0.7 µs more than with an eager tree (bench rung 3).
  Children are made only for nodes a request walks through (the whole tree
  is ~30 KB per VM).
- A built snapshot's answers never change. Its mutable parts are caches,
  bounded and dying with the snapshot on swap: the node tree (children are
  made on the first walk through a node), the views (at most one per node per
  change point; listings that do not change share one reply), `url_replies`
  (request target -> Reply, filled by the router) and `http_cache`, a slot
  the HTTP layer owns (its request memo, fastimds.http.memo): nothing here
  reads or knows its contents.
- Version gating: a node's change points are the api-versions at which
  something in its subtree appears (from versions.INSTANCE_FIELD_SINCE), so a
  request at any version is a walk plus a short scan to the newest change
  point at or before it. Subtrees with no table field below them are never
  scanned or copied. The 2017-03-01 preview is not a change point but a
  second root (`Snapshot.preview_root`), made on its first request from the
  2017-04-02 document in the preview's shape (fastimds.imds.preview).
- No reference cycles: a view points at what it renders from, never back at
  its node, so a replaced snapshot is freed by reference counting alone
  (workers gc.freeze() their first snapshots; a cycle through a frozen
  object would never be collected).
- No locks: a worker is one single-threaded event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol

from fastimds.imds import events
from fastimds.imds.datafile import VmDescription
from fastimds.imds.preview import preview_document
from fastimds.imds.render import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_TEXT,
    ERRORS,
    Reply,
    json_body,
    make_reply,
    render_listing,
)
from fastimds.imds.versions import (
    EXTENDED_FIRST_VERSION,
    INSTANCE_FIELD_SINCE,
    INSTANCE_FIRST_VERSION,
    PREVIEW_VERSION,
)

# Distinct request targets remembered per snapshot. The sample VM has ~150
# paths; a client uses a handful of spellings (api-version, format) of a few
# of them. 4096 entries of ~200 bytes is under 1 MiB per VM.
MAX_MEMO_ENTRIES = 4096

_LEAF_NEEDS_TEXT = ERRORS["leaf_needs_text"]


def _json_reply(value: Any) -> Reply:
    return make_reply(200, json_body(value), CONTENT_TYPE_JSON)


class _Field:
    """What the since-table says at one field pattern (fastimds.imds.versions), shared by every node there.

    A node with no `_Field` has no table field at or below it: it and its
    whole subtree appear with its parent.
    """

    __slots__ = ("since", "newest_below", "children", "item")

    def __init__(self, since: str) -> None:
        self.since = since  # when the table introduces this field; "" if only on the way to one
        self.newest_below = ""  # the newest since of any table field below; "" if none
        self.children: dict[str, _Field] = {}  # by object key
        self.item: _Field | None = None  # any array element


def _table_fields() -> _Field:
    """The root `_Field`, from the table's patterns (spelled as versions.child_pattern spells them)."""
    patterns = {""}
    for path in INSTANCE_FIELD_SINCE:
        patterns.update(path[:index] for index, char in enumerate(path) if char in ".[")
        patterns.add(path)
    fields = {pattern: _Field(INSTANCE_FIELD_SINCE.get(pattern, "")) for pattern in patterns}
    for pattern, field in fields.items():
        prefix = pattern + "." if pattern else ""
        # A key may hold dots, so a child pattern can be any longer one that starts "pattern.".
        field.children = {
            other[len(prefix) :]: fields[other] for other in fields if other.startswith(prefix) and other != pattern
        }
        field.item = fields.get(pattern + "[]")
        below = [
            since
            for other, since in INSTANCE_FIELD_SINCE.items()
            if other.startswith((prefix, pattern + "[]")) and other != pattern
        ]
        field.newest_below = max(below, default="")
    return fields[""]


_ROOT_FIELD = _table_fields()
_NO_FIELDS: Mapping[str, _Field] = MappingProxyType({})


def _since(field: _Field | None, parent_since: str) -> str:
    """When a child with `field` first shows, under a parent that shows from `parent_since`."""
    return field.since if field is not None and field.since > parent_since else parent_since


def _gated(value: Any, field: _Field | None, since: str, version: str) -> Any:
    """`value` (shown at `version`) with every field newer than `version` removed.

    Subtrees that nothing newer than `version` can hide are returned as they
    are, not copied.
    """
    if field is None or field.newest_below <= version:
        return value
    if isinstance(value, dict):
        fields = field.children
        gated = {}
        for key, child in value.items():
            child_field = fields.get(key)
            if child_field is None:
                gated[key] = child  # shows with its parent, and so does everything below it
                continue
            child_since = child_field.since if child_field.since > since else since
            if child_since <= version:
                gated[key] = _gated(child, child_field, child_since, version) if type(child) is not str else child
        return gated
    if isinstance(value, list) and field.item is not None:
        child_since = _since(field.item, since)
        if child_since > version:
            return []
        return [_gated(child, field.item, child_since, version) for child in value]
    return value


def _visible_children(value: Any, field: _Field | None, since: str, version: str) -> list[tuple[str, bool]]:
    """(name, is_container) of each child shown at `version`, in JSON (sorted) order."""
    if isinstance(value, dict):
        fields = field.children if field is not None else _NO_FIELDS
        return [
            (key, isinstance(value[key], (dict, list)))
            for key in sorted(value)
            if _since(fields.get(key), since) <= version
        ]
    if isinstance(value, list) and _since(field.item if field is not None else None, since) <= version:
        return [(str(index), isinstance(child, (dict, list))) for index, child in enumerate(value)]
    return []


def _collect_change_points(value: Any, field: _Field | None, since: str, points: set[str]) -> None:
    points.add(since)
    if field is None or field.newest_below <= since:
        return  # nothing below shows later than this node
    if isinstance(value, dict):
        fields = field.children
        for key, child in value.items():
            child_field = fields.get(key)
            if child_field is not None:
                child_since = child_field.since if child_field.since > since else since
                if type(child) is str:
                    points.add(child_since)
                else:
                    _collect_change_points(child, child_field, child_since, points)
    elif isinstance(value, list) and field.item is not None:
        child_since = _since(field.item, since)
        for child in value:
            _collect_change_points(child, field.item, child_since, points)


def _shared_text(listing: str, texts: list[Reply]) -> Reply:
    """The text reply for `listing`: one of `texts` if it has that body, else a new one added to them."""
    body = listing.encode()
    for reply in texts:
        if reply.body == body:
            return reply
    reply = make_reply(200, body, CONTENT_TYPE_TEXT)
    texts.append(reply)
    return reply


class _Renderer(Protocol):
    def render_json(self, since: str) -> Reply: ...

    def render_text(self, since: str) -> Reply: ...


class View:
    """One node as seen from `since` on: its JSON and text replies, each rendered on first use."""

    __slots__ = ("since", "_source", "_json", "_text")

    def __init__(self, since: str, source: _Renderer) -> None:
        self.since = since
        self._source = source
        self._json: Reply | None = None
        self._text: Reply | None = None

    @property
    def json(self) -> Reply:
        reply = self._json
        if reply is None:
            reply = self._json = self._source.render_json(self.since)
        return reply

    @property
    def text(self) -> Reply:
        reply = self._text
        if reply is None:
            reply = self._text = self._source.render_text(self.since)
        return reply


class _Subtree:
    """What a node's views render from, and the listings they share.

    Views point here, never back at their node or at each other, so a
    snapshot holds no reference cycles: a replaced snapshot is freed by
    reference counting alone, even where gc.freeze() keeps the collector away.
    """

    __slots__ = ("value", "field", "since", "points", "texts")

    def __init__(self, value: Any, field: _Field | None, since: str) -> None:
        self.value = value
        self.field = field
        self.since = since
        found: set[str] = set()
        _collect_change_points(value, field, since, found)
        self.points = tuple(sorted(found))
        # Listings change only where a direct child appears, so views share them.
        self.texts: list[Reply] = []

    def render_json(self, since: str) -> Reply:
        if isinstance(self.value, (dict, list)):
            return _json_reply(_gated(self.value, self.field, self.since, since))
        return _LEAF_NEEDS_TEXT

    def render_text(self, since: str) -> Reply:
        if isinstance(self.value, (dict, list)):
            listing = render_listing(_visible_children(self.value, self.field, self.since, since))
            return _shared_text(listing, self.texts)
        return make_reply(200, self.value.encode(), CONTENT_TYPE_TEXT)


class Node:
    """A node of the instance document: children by path segment, and views.

    `children` is made on first access and `view_at` renders on first use;
    both are kept for the snapshot's life.
    """

    __slots__ = ("since", "value", "_field", "_children", "_subtree", "_views")

    def __init__(self, since: str, value: Any, field: _Field | None) -> None:
        self.since = since  # first api-version that shows this node
        self.value = value  # the normalised subtree, all versions' fields
        self._field = field  # what the since-table says here; None when it names nothing at or below
        self._children: dict[str, Node] | None = None
        self._subtree: _Subtree | None = None  # made on the first view
        self._views: list[View | None] | None = None  # one slot per change point, filled on use

    @property
    def children(self) -> dict[str, Node]:
        children = self._children
        if children is None:
            children = self._children = self._make_children()
        return children

    def _make_children(self) -> dict[str, Node]:
        value, field, since = self.value, self._field, self.since
        if isinstance(value, dict):
            fields = field.children if field is not None else _NO_FIELDS
            children = {}
            for key, child in value.items():
                child_field = fields.get(key)
                children[key] = Node(_since(child_field, since), child, child_field)
            return children
        if isinstance(value, list):
            item = field.item if field is not None else None
            child_since = _since(item, since)
            return {str(index): Node(child_since, child, item) for index, child in enumerate(value)}
        return {}

    def _source(self) -> _Subtree:
        subtree = self._subtree
        if subtree is None:
            subtree = self._subtree = _Subtree(self.value, self._field, self.since)
        return subtree

    def change_points(self) -> tuple[str, ...]:
        """The api-versions, oldest first, at which this node's subtree changes; the first is `since`."""
        return self._source().points

    def view_at(self, version: str) -> View:
        """The view for `version`; the caller has checked `self.since <= version`."""
        subtree = self._subtree
        if subtree is None:
            subtree = self._source()
        points = subtree.points
        for index in range(len(points) - 1, -1, -1):
            if points[index] <= version:
                break
        else:
            raise LookupError(f"no view at {version}; views start at {points[0]}")
        views = self._views
        if views is None:
            views = self._views = [None] * len(points)
        view = views[index]
        if view is None:
            view = views[index] = View(points[index], subtree)
        return view


def newest_view(views: tuple[View, ...], version: str) -> View:
    """The last of `views` (sorted by `since`) that `version` can see."""
    for view in reversed(views):
        if view.since <= version:
            return view
    raise LookupError(f"no view at {version}; views start at {views[0].since if views else None}")


class _ExtendedDocument:
    """The whole document with `extended=true`: the root's fields plus the extended section."""

    __slots__ = ("root", "extended", "texts")

    def __init__(self, root: Node, extended: dict[str, Any]) -> None:
        self.root = root
        self.extended = extended
        self.texts: list[Reply] = []

    def render_json(self, since: str) -> Reply:
        root = self.root
        return _json_reply({**_gated(root.value, root._field, root.since, since), "extended": self.extended})

    def render_text(self, since: str) -> Reply:
        root = self.root
        children = _visible_children(root.value, root._field, root.since, since)
        return _shared_text(render_listing(sorted([*children, ("extended", True)])), self.texts)


class Snapshot:
    """One published version of one VM."""

    __slots__ = (
        "generation",
        "vm",
        "root",
        "_preview_root",
        "_extended_views",
        "_loadbalancer",
        "_scheduled_events",
        "url_replies",
        "http_cache",
    )

    def __init__(self, generation: int, vm: VmDescription, root: Node) -> None:
        self.generation = generation
        self.vm = vm
        self.root = root
        self._preview_root: Node | None = None
        self._extended_views: tuple[View, ...] | None = None
        self._loadbalancer: Reply | None = None
        self._scheduled_events: dict[str, Reply] = {}  # by api-version
        self.url_replies: dict[bytes, Reply] = {}
        # Opaque here: the HTTP layer's per-snapshot cache (fastimds.http.memo), dying with the snapshot.
        self.http_cache: Any = None

    @property
    def preview_root(self) -> Node:
        """The document at the 2017-03-01 preview (fastimds.imds.preview), made on first use; nothing in it is gated."""
        root = self._preview_root
        if root is None:
            first = _gated(self.root.value, _ROOT_FIELD, INSTANCE_FIRST_VERSION, INSTANCE_FIRST_VERSION)
            root = self._preview_root = Node(PREVIEW_VERSION, preview_document(first), None)
        return root

    @property
    def extended_views(self) -> tuple[View, ...]:
        """Views of the whole document with `extended=true`, from EXTENDED_FIRST_VERSION on (for `newest_view`)."""
        views = self._extended_views
        if views is None:
            document = _ExtendedDocument(self.root, self.vm.extended)
            points = {EXTENDED_FIRST_VERSION} | {p for p in self.root.change_points() if p > EXTENDED_FIRST_VERSION}
            views = self._extended_views = tuple(View(point, document) for point in sorted(points))
        return views

    @property
    def loadbalancer(self) -> Reply | None:
        """/metadata/loadbalancer's reply, rendered on first use; None when the VM has no load balancer."""
        section = self.vm.reserved.get("loadbalancer")
        if section is None:
            return None
        if self._loadbalancer is None:
            # Served as given (ports stay numbers, as Azure sends them), every list present.
            document = {key: section.get(key, []) for key in ("publicIpAddresses", "inboundRules", "outboundRules")}
            self._loadbalancer = _json_reply({"loadbalancer": document})
        return self._loadbalancer

    def scheduled_events(self, version: str) -> Reply:
        """/metadata/scheduledevents' reply at `version` (a valid one), rendered on first use."""
        reply = self._scheduled_events.get(version)
        if reply is None:
            reply = self._scheduled_events[version] = events.reply_at(self.vm.scheduled, version)
        return reply

    def remember(self, url: bytes, reply: Reply) -> None:
        if len(self.url_replies) < MAX_MEMO_ENTRIES and not reply.volatile:
            self.url_replies[url] = reply


def build_snapshot(vm: VmDescription, generation: int) -> Snapshot:
    """A snapshot of an already validated `vm`; its views are rendered on first use."""
    return Snapshot(generation, vm, Node(INSTANCE_FIRST_VERSION, vm.instance, _ROOT_FIELD))

"""Immutable snapshots: a VM description rendered into finished replies.

Rules of this module:
- `build_snapshot` does all the expensive work (version gating, JSON and text
  rendering, header blocks) before anyone can see the snapshot; a build that
  fails raises and publishes nothing.
- A built snapshot's tree never changes. Its two mutable parts are memos
  filled on first use and bounded, so unique junk requests cannot grow
  memory, and both die with the snapshot on swap:
  `url_replies` (request target -> Reply, filled by the router) and
  `request_replies` (a whole request head's bytes -> the finished reply,
  filled by the protocol; see `RequestReply`).
- Version gating is precomputed per node: each node keeps one view per
  api-version at which something in its subtree appeared, so a request at any
  version is a walk plus a short scan, and identical views share one reply.
"""

from __future__ import annotations

from typing import Any

from fastimds.datafile import VmDescription
from fastimds.render import ERRORS, Reply, json_body, json_reply, render_listing, text_reply
from fastimds.versions import EXTENDED_FIRST_VERSION, INSTANCE_FIELD_SINCE, INSTANCE_FIRST_VERSION, child_pattern

# Distinct request targets remembered per snapshot. The sample VM has ~150
# paths; a client uses a handful of spellings (api-version, format) of a few
# of them. 4096 entries of ~200 bytes is under 1 MiB per VM.
MAX_MEMO_ENTRIES = 4096
# Whole request heads remembered per snapshot, and the longest one kept: a
# real client sends a handful of distinct heads of ~100-300 bytes.
MAX_REQUEST_MEMO_ENTRIES = 1024
MAX_REQUEST_MEMO_KEY_BYTES = 1024

# (head with its Connection header, body or b"" for HEAD, closes the connection)
RequestReply = tuple[bytes, bytes, bool]


class View:
    """One node as seen from `since` on: its JSON and text replies."""

    __slots__ = ("since", "json", "text")

    def __init__(self, since: str, json: Reply, text: Reply) -> None:
        self.since = since
        self.json = json
        self.text = text


class Node:
    """A node of the instance document: children by path segment, and views."""

    __slots__ = ("since", "children", "views", "value")

    def __init__(self, since: str, value: Any) -> None:
        self.since = since  # first api-version that shows this node
        self.value = value  # the normalised subtree, all versions' fields
        self.children: dict[str, Node] = {}
        self.views: tuple[View, ...] = ()

    def view_at(self, version: str) -> View:
        """The view for `version`; the caller has checked `self.since <= version`."""
        return newest_view(self.views, version)


def newest_view(views: tuple[View, ...], version: str) -> View:
    """The last of `views` (sorted by `since`) that `version` can see."""
    for view in reversed(views):
        if view.since <= version:
            return view
    raise LookupError(f"no view at {version}; views start at {views[0].since if views else None}")


class Snapshot:
    """One published version of one VM."""

    __slots__ = ("generation", "vm", "root", "extended_views", "url_replies", "request_replies")

    def __init__(self, generation: int, vm: VmDescription, root: Node, extended_views: tuple[View, ...]) -> None:
        self.generation = generation
        self.vm = vm
        self.root = root
        # Views of the whole document with `extended=true`, from EXTENDED_FIRST_VERSION on.
        self.extended_views = extended_views
        self.url_replies: dict[bytes, Reply] = {}
        self.request_replies: dict[bytes, RequestReply] = {}

    def remember(self, url: bytes, reply: Reply) -> None:
        if len(self.url_replies) < MAX_MEMO_ENTRIES:
            self.url_replies[url] = reply

    def remember_request(self, head: bytes, reply: RequestReply) -> None:
        if len(self.request_replies) < MAX_REQUEST_MEMO_ENTRIES and len(head) <= MAX_REQUEST_MEMO_KEY_BYTES:
            self.request_replies[head] = reply


def _build_tree(value: Any, pattern: str, since: str) -> Node:
    node = Node(since, value)
    if isinstance(value, dict):
        # Sorted like the JSON (OPT_SORT_KEYS), so text listings match its order.
        items: list[tuple[str, Any, str]] = [(key, value[key], child_pattern(pattern, key)) for key in sorted(value)]
    elif isinstance(value, list):
        items = [(str(index), child, child_pattern(pattern, index)) for index, child in enumerate(value)]
    else:
        return node
    for key, child, child_pat in items:
        child_since = max(since, INSTANCE_FIELD_SINCE.get(child_pat, since))
        node.children[key] = _build_tree(child, child_pat, child_since)
    return node


def _change_points(node: Node) -> set[str]:
    points = {node.since}
    for child in node.children.values():
        points |= _change_points(child)
    return points


def _gated(node: Node, version: str) -> Any:
    """The node's value with every field newer than `version` removed."""
    if isinstance(node.value, dict):
        return {key: _gated(child, version) for key, child in node.children.items() if child.since <= version}
    if isinstance(node.value, list):
        return [_gated(child, version) for child in node.children.values()]
    return node.value


def _visible_children(node: Node, version: str) -> list[tuple[str, bool]]:
    """(name, is_container) of each child shown at `version`, in JSON order."""
    return [
        (key, isinstance(child.value, (dict, list))) for key, child in node.children.items() if child.since <= version
    ]


class _Interner:
    """Shares one Reply among identical renderings (most views repeat)."""

    def __init__(self) -> None:
        self._json: dict[bytes, Reply] = {}
        self._text: dict[str, Reply] = {}

    def json(self, value: Any) -> Reply:
        body = json_body(value)
        reply = self._json.get(body)
        if reply is None:
            reply = self._json[body] = json_reply(200, value)
        return reply

    def text(self, text: str) -> Reply:
        reply = self._text.get(text)
        if reply is None:
            reply = self._text[text] = text_reply(text)
        return reply


def _render_views(node: Node, interner: _Interner) -> None:
    is_container = isinstance(node.value, (dict, list))
    views = []
    for since in sorted(point for point in _change_points(node) if point >= node.since):
        if is_container:
            views.append(
                View(
                    since,
                    interner.json(_gated(node, since)),
                    interner.text(render_listing(_visible_children(node, since))),
                )
            )
        else:
            views.append(View(since, ERRORS["leaf_needs_text"], interner.text(node.value)))
    node.views = tuple(views)
    for child in node.children.values():
        _render_views(child, interner)


def build_snapshot(vm: VmDescription, generation: int) -> Snapshot:
    """Render every view of `vm`; raises on nothing valid input can cause."""
    interner = _Interner()
    root = _build_tree(vm.instance, "", INSTANCE_FIRST_VERSION)
    _render_views(root, interner)
    extended_views = []
    for view_since in sorted(
        {EXTENDED_FIRST_VERSION} | {v.since for v in root.views if v.since > EXTENDED_FIRST_VERSION}
    ):
        document = {**_gated(root, view_since), "extended": vm.extended}
        listing = render_listing(sorted([*_visible_children(root, view_since), ("extended", True)]))
        extended_views.append(View(view_since, interner.json(document), interner.text(listing)))
    return Snapshot(generation, vm, root, tuple(extended_views))

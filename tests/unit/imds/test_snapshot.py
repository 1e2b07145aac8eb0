"""Properties of built snapshots, checked against an independent reference.

For any VM document, at every api-version of every node: the JSON decodes
back to the node's subtree as gated at that version, every listing line is a
child key with "/" exactly on containers, and every reply's Content-Length
is its body's length. Views are rendered on first use, so the checks force
each one through the public `view_at`; each must then be kept (one per change
point) and nothing may be rendered by the build itself.
"""

from __future__ import annotations

import gc
import re
from dataclasses import FrozenInstanceError
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastimds.imds import snapshot as snapshot_module
from fastimds.imds.datafile import normalise, parse_vm
from fastimds.imds.render import ERRORS, Reply, make_reply
from fastimds.imds.snapshot import Node, View, build_snapshot, newest_view
from fastimds.imds.store import SnapshotStore
from fastimds.imds.versions import (
    API_VERSIONS,
    EXTENDED_FIRST_VERSION,
    INSTANCE_FIELD_KIND,
    INSTANCE_FIELD_SINCE,
    INSTANCE_FIRST_VERSION,
    INSTANCE_VERSIONS,
)
from tests.support.fakes import sample_vm
from tests.support.reference import reference_gate

# Keys a data file may have: no "/" and nothing unprintable (fastimds.imds.datafile).
KEYS = st.text(min_size=1, max_size=8).filter(lambda key: "/" not in key and key.isprintable())
KNOWN_COMPUTE_LEAVES = ["location", "vmId", "zone", "tags", "userData", "physicalZone", "licenseType", "priority"]
LEAVES = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)


def trees(depth: int = 3) -> st.SearchStrategy[Any]:
    return st.recursive(
        LEAVES,
        lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(KEYS, children, max_size=4)),
        max_leaves=12,
    )


@st.composite
def vm_documents(draw: st.DrawFn) -> dict[str, Any]:
    compute = draw(st.dictionaries(KEYS.filter(lambda k: k not in INSTANCE_COMPUTE_KINDS), trees(), max_size=4))
    for name in draw(st.lists(st.sampled_from(KNOWN_COMPUTE_LEAVES), unique=True, max_size=5)):
        compute[name] = draw(LEAVES)
    network = {"interface": draw(st.lists(st.fixed_dictionaries({"macAddress": st.text(max_size=12)}), max_size=2))}
    return {"instance": {"compute": compute, "network": network}}


# Compute keys with a fixed shape in the schema (a version or a kind); random trees avoid them.
INSTANCE_COMPUTE_KINDS = {
    path.split(".")[1].split("[")[0]
    for path in (*INSTANCE_FIELD_SINCE, *INSTANCE_FIELD_KIND)
    if path.startswith("compute.")
}


def walk(node: Node, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Node]]:
    found = [(path, node)]
    for key, child in node.children.items():
        found.extend(walk(child, (*path, key)))
    return found


def subtree(document: Any, path: tuple[str, ...]) -> Any:
    for segment in path:
        document = document[int(segment)] if isinstance(document, list) else document[segment]
    return document


def pattern_of(document: Any, path: tuple[str, ...]) -> str:
    pattern = ""
    for segment in path:
        if isinstance(document, list):
            pattern += "[]"
            document = document[int(segment)]
        else:
            pattern = f"{pattern}.{segment}" if pattern else segment
            document = document[segment]
    return pattern


def assert_framed(reply: Reply) -> None:
    match = re.search(rb"Content-Length: (\d+)\r\n", reply.head)
    assert match is not None
    assert int(match.group(1)) == len(reply.body)


def check_listing(reply: Reply, decoded: Any) -> None:
    """The listing follows the JSON's (sorted) key order, "/" exactly on containers."""
    lines = reply.body.decode().split("\n") if reply.body else []
    children = list(decoded) if isinstance(decoded, dict) else [str(i) for i in range(len(decoded))]
    items = decoded.values() if isinstance(decoded, dict) else decoded
    assert lines == [
        name + "/" if isinstance(child, (dict, list)) else name for name, child in zip(children, items, strict=True)
    ]


def check_view(view: View, value: Any, expected: Any) -> None:
    assert_framed(view.json)
    assert_framed(view.text)
    if isinstance(value, (dict, list)):
        decoded = orjson.loads(view.json.body)
        assert decoded == expected
        check_listing(view.text, decoded)
    else:
        assert view.json is ERRORS["leaf_needs_text"]
        assert view.text.body == value.encode()


def check_snapshot(doc: dict[str, Any]) -> None:
    raw = orjson.dumps(doc)
    vm = parse_vm(raw, "hypothesis")
    snapshot = build_snapshot(vm, generation=1)
    normalised = normalise(orjson.loads(raw)["instance"])
    for path, node in walk(snapshot.root):
        value = subtree(normalised, path)
        pattern = pattern_of(normalised, path)
        points = node.change_points()
        # A node's views start at its own version, one per change point, and
        # each change point changes what the node shows.
        assert points[0] == node.since, path
        assert list(points) == sorted(set(points)), path
        gated_at_points = [orjson.dumps(reference_gate(value, pattern, point)) for point in points]
        assert len(set(gated_at_points)) == len(points), (path, points)
        views: dict[str, View] = {}
        for version in VERSIONS_FROM_FIRST:
            if version < node.since:
                continue
            view = node.view_at(version)
            assert view.since == max(point for point in points if point <= version), (path, version)
            assert node.view_at(view.since) is view, (path, version)  # one view per change point, kept
            views[view.since] = view
            try:
                check_view(view, value, reference_gate(value, pattern, version))
            except AssertionError as error:
                raise AssertionError(f"{path} at {version}") from error
        assert set(views) == set(points), path  # every change point is some version's view

    # The whole document with extended=true, from its first version on.
    for version in VERSIONS_FROM_FIRST:
        if version < EXTENDED_FIRST_VERSION:
            continue
        view = newest_view(snapshot.extended_views, version)
        assert newest_view(snapshot.extended_views, version) is view
        expected = {**reference_gate(normalised, "", version), "extended": vm.extended}
        assert_framed(view.json)
        assert_framed(view.text)
        decoded = orjson.loads(view.json.body)
        assert decoded == expected, version
        check_listing(view.text, dict(sorted(decoded.items())))


VERSIONS_FROM_FIRST = sorted(INSTANCE_VERSIONS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vm_documents())
def test_every_rendering_decodes_back_to_its_gated_subtree(doc: dict[str, Any]) -> None:
    check_snapshot(doc)


def test_the_sample_snapshot_satisfies_the_same_properties() -> None:
    check_snapshot({"instance": orjson.loads(orjson.dumps(sample_vm().instance))})


def test_identical_views_share_one_reply() -> None:
    snapshot = build_snapshot(sample_vm(), generation=1)
    network = snapshot.root.children["network"]
    assert network.change_points() == (INSTANCE_FIRST_VERSION,)  # nothing under network is version-gated
    compute = snapshot.root.children["compute"]
    views = [compute.view_at(point) for point in compute.change_points()]
    assert len(views) > 10
    assert len({id(view.json) for view in views}) == len(views)  # each differs
    # A listing changes only where a direct child appears; between, views share one reply.
    texts: dict[bytes, Reply] = {}
    for view in views:
        assert view.text is texts.setdefault(view.text.body, view.text)
    assert len(texts) < len(views)


def test_build_renders_nothing_and_each_view_renders_once(monkeypatch: pytest.MonkeyPatch) -> None:
    rendered: list[bytes] = []
    make_reply = snapshot_module.make_reply

    def counting_make_reply(status: int, body: bytes, *args: Any) -> Reply:
        rendered.append(body)
        return make_reply(status, body, *args)

    monkeypatch.setattr(snapshot_module, "make_reply", counting_make_reply)
    snapshot = build_snapshot(sample_vm(), generation=1)
    assert snapshot.extended_views  # views exist before anything is asked of them ...
    view = snapshot.root.children["compute"].view_at("2021-02-01")
    assert rendered == []  # ... and render nothing until then
    text = view.text
    assert len(rendered) == 1
    assert view.text is text
    assert snapshot.root.children["compute"].view_at("2021-02-01") is view
    assert snapshot.root.children["compute"].view_at(view.since).text is text
    assert len(rendered) == 1


def test_a_replaced_snapshot_is_freed_by_reference_counting() -> None:
    # Workers gc.freeze() their first snapshots: a cycle through one would never be collected.
    gc.collect()
    gc.disable()
    try:
        snapshot = build_snapshot(sample_vm(), generation=1)
        for _path, node in walk(snapshot.root):
            for point in node.change_points():
                view = node.view_at(point)
                assert view.json.status in (200, 400)
                assert view.text.status == 200
        for view in snapshot.extended_views:
            assert (view.json.status, view.text.status) == (200, 200)
        del snapshot, node, view
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_versions_resolve_to_the_right_view() -> None:
    snapshot = build_snapshot(sample_vm(), generation=1)
    compute = snapshot.root.children["compute"]
    for version in API_VERSIONS[1:]:
        expected = reference_gate(sample_vm().instance, "", version)["compute"]
        assert orjson.loads(compute.view_at(version).json.body) == expected, version


def test_publish_swaps_atomically_and_generations_grow() -> None:
    store = SnapshotStore(sample_vm())
    first = store.current
    second = store.publish(sample_vm())
    assert store.current is second
    assert second.generation == first.generation + 1
    assert first.url_replies is not second.url_replies  # memo dies with its snapshot


@pytest.mark.parametrize("name", ["status", "head", "body", "close", "etag", "not_modified", "reject", "volatile"])
def test_a_reply_cannot_be_changed_once_made(name: str) -> None:
    # Snapshots, memos and every connection share one Reply: a write to it would change them all.
    snapshot = build_snapshot(sample_vm(), generation=1)
    for reply in (snapshot.root.children["compute"].view_at("2021-02-01").json, ERRORS["throttled"]):
        before = getattr(reply, name)
        with pytest.raises(FrozenInstanceError):
            setattr(reply, name, True)
        with pytest.raises(FrozenInstanceError):
            delattr(reply, name)
        assert getattr(reply, name) == before


def test_what_a_reply_is_made_with_is_given_at_construction() -> None:
    volatile = make_reply(200, b"{}", volatile=True)
    assert volatile.volatile and volatile.reject is None and volatile.etag is not None
    assert volatile.not_modified.startswith(b"HTTP/1.1 304 Not Modified\r\n")
    assert volatile.not_modified.endswith(b"\r\nETag: " + volatile.etag + b"\r\n")
    assert ERRORS["throttled"].reject == "throttled" and not ERRORS["throttled"].volatile
    assert ERRORS["not_found"].reject is None

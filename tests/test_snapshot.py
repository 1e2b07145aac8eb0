"""Properties of built snapshots, checked against an independent reference.

For any VM document: every JSON blob decodes back to its subtree as gated at
its version, every listing line is a child key with "/" exactly on
containers, and every reply's Content-Length is its body's length.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastimds.datafile import normalise, parse_vm
from fastimds.render import ERRORS, Reply
from fastimds.snapshot import Node, build_snapshot
from fastimds.store import SnapshotStore
from fastimds.versions import API_VERSIONS, INSTANCE_FIELD_SINCE, INSTANCE_FIRST_VERSION
from tests.fakes import sample_vm

# Keys a data file may have: no "/" and nothing unprintable (fastimds.datafile).
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


# Compute keys with a fixed shape in the schema; random trees avoid them.
INSTANCE_COMPUTE_KINDS = {
    path.split(".")[1].split("[")[0] for path in INSTANCE_FIELD_SINCE if path.startswith("compute.")
}


def reference_gate(value: Any, pattern: str, version: str) -> Any:
    """Gate by the table, written independently of fastimds.snapshot."""
    if isinstance(value, dict):
        out = {}
        for key, child in value.items():
            child_pattern = f"{pattern}.{key}" if pattern else key
            if INSTANCE_FIELD_SINCE.get(child_pattern, INSTANCE_FIRST_VERSION) <= version:
                out[key] = reference_gate(child, child_pattern, version)
        return out
    if isinstance(value, list):
        return [reference_gate(child, pattern + "[]", version) for child in value]
    return value


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


def check_snapshot(doc: dict[str, Any]) -> None:
    raw = orjson.dumps(doc)
    snapshot = build_snapshot(parse_vm(raw, "hypothesis"), generation=1)
    normalised = normalise(orjson.loads(raw)["instance"])
    for path, node in walk(snapshot.root):
        value = subtree(normalised, path)
        for view in node.views:
            assert_framed(view.json)
            assert_framed(view.text)
            expected = reference_gate(value, pattern_of(normalised, path), view.since)
            if isinstance(value, (dict, list)):
                decoded = orjson.loads(view.json.body)
                assert decoded == expected, (path, view.since)
                # The listing follows the JSON's (sorted) key order.
                lines = view.text.body.decode().split("\n") if view.text.body else []
                children = list(decoded) if isinstance(decoded, dict) else [str(i) for i in range(len(decoded))]
                items = decoded.values() if isinstance(decoded, dict) else decoded
                assert lines == [
                    name + "/" if isinstance(child, (dict, list)) else name
                    for name, child in zip(children, items, strict=True)
                ], (path, view.since)
            else:
                assert view.json is ERRORS["leaf_needs_text"]
                assert view.text.body == value.encode()
        # A node's views cover every version from its own on.
        assert node.views[0].since == node.since
        assert [v.since for v in node.views] == sorted(v.since for v in node.views)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vm_documents())
def test_every_rendering_decodes_back_to_its_gated_subtree(doc: dict[str, Any]) -> None:
    check_snapshot(doc)


def test_the_sample_snapshot_satisfies_the_same_properties() -> None:
    check_snapshot({"instance": orjson.loads(orjson.dumps(sample_vm().instance))})


def test_identical_views_share_one_reply() -> None:
    snapshot = build_snapshot(sample_vm(), generation=1)
    network = snapshot.root.children["network"]
    assert len(network.views) == 1  # nothing under network is version-gated
    compute = snapshot.root.children["compute"]
    assert len(compute.views) > 10
    assert len({id(view.json) for view in compute.views}) == len(compute.views)  # each differs


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

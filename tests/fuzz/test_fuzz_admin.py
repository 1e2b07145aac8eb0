"""Hostile writes to the admin API (PUT/PATCH/DELETE /vms/{id}): Hypothesis fuzzing, in process.

Rules of this file:
- Each example gets a fresh control plane: a real `Control` on a real (not
  durable) bus in a temporary directory, seeded with two VMs, "a" and "b",
  that claim caller addresses 10.1.0.4 and 10.2.0.4. Requests go through
  `AdminApi.handle`, or as raw HTTP through `AdminProtocol` on the fake
  transport, split into reads at random: the code the Unix socket runs,
  without the socket.
- The budget is fixed and derandomised for CI; `FUZZ_EXAMPLES=N` gives every
  test N random examples (the long run, `make fuzz-long`, see
  tests/fuzz/test_fuzz_protocol.py); the 1 MiB documents are capped at 200.

What must hold, for every write:
- the answer is one well-formed HTTP response with a JSON body; never a 5xx
  and never an exception;
- a refusal is a 4xx whose JSON names the problem: {"error": text} plus,
  for an invalid description, "problems", each starting with its JSON path;
- a refused write changes nothing: the same snapshot objects at the same
  generations, the same documents, the same bus files, and the same bytes
  served to each VM's callers;
- an accepted write (a mutation that happens to stay valid) is exactly the
  one asked for: the next generation, serving the document sent (PUT) or
  its RFC 7396 merge (PATCH, by the independent oracle in
  tests.support.reference, itself held to the RFC's examples in
  tests/unit/control/test_merge_patch.py), and the other VM untouched.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastimds.control.admin_api import MAX_ADMIN_BODY_BYTES, AdminApi
from fastimds.control.writer import Control
from fastimds.imds.datafile import MAX_NESTING_DEPTH, MAX_VM_FILE_BYTES, VM_ID_PATTERN
from fastimds.imds.versions import INSTANCE_FIELD_KIND, child_pattern
from tests.support.fakes import (
    Response,
    admin_api,
    admin_connection,
    make_connection,
    new_plane,
    request,
    serving,
    split_responses,
)
from tests.support.fuzz import budget
from tests.support.reference import rfc7396_merge_patch
from tests.support.server_process import vm_document

# ---- the world: two VMs on a real control plane ----

SEEDS = {
    "a": vm_document("a", callers=["10.1.0.4"]),
    "b": vm_document("b", callers=["10.2.0.4"]),
}
CALLERS = {"a": "10.1.0.4", "b": "10.2.0.4"}
INSTANCE = "/metadata/instance?api-version=2021-02-01"
JSON_TYPE = "application/json; charset=utf-8"


@dataclass
class World:
    control: Control
    api: AdminApi

    def observed(self) -> dict[str, Any]:
        """Everything a refused write must leave as it was."""
        registry = serving(self.control)
        bus = self.control.bus.directory
        return {
            "summary": registry.summary(),
            "stores": {vm_id: (store.current, store.generation) for vm_id, store in registry.stores.items()},
            # Encoded, so that a change made in place to a stored document would show.
            "documents": {vm_id: orjson.dumps(self.control.document(vm_id)) for vm_id in registry.live()},
            "bus": {path.name: path.read_bytes() for path in sorted(bus.iterdir()) if path.is_file()},
            "served": {vm_id: self.served(caller) for vm_id, caller in CALLERS.items()},
        }

    def served(self, caller: str) -> bytes:
        """What a caller of the VM gets for the instance document, over the real protocol."""
        protocol, transport, _ = make_connection(registry=serving(self.control), peer=caller)
        protocol.data_received(request(INSTANCE))
        return transport.output

    def document(self, vm_id: str) -> Any:
        return self.control.document(vm_id)["vm"]

    def generation(self, vm_id: str) -> int:
        return serving(self.control).stores[vm_id].generation


@contextlib.contextmanager
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="fastimds-fuzz-admin-") as directory:
        plane = new_plane(Path(directory) / "bus")
        control = plane.control
        api = admin_api(plane)
        for vm_id, document in SEEDS.items():
            [created] = split_responses(api.handle("PUT", f"/vms/{vm_id}", None, orjson.dumps(document), False))
            assert created.status == 201
        yield World(control, api)


# ---- sending a request, and what every answer must look like ----


def http_request(method: str, target: bytes, body: bytes, chunked: bool = False) -> bytes:
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body)
    head = b"%s %s HTTP/1.1\r\nHost: localhost\r\n%s\r\n\r\n" % (method.encode(), target, framing)
    if chunked:
        size = max(len(body) // 3, 1)
        pieces = [body[i : i + size] for i in range(0, len(body), size)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
    return head + body


def check_answer(response: Response) -> tuple[int, Any]:
    """One admin answer: JSON, never a 5xx; a refusal names its problem."""
    assert response.status < 500, response.body[:500]
    assert response.headers["content-type"] == JSON_TYPE
    value = orjson.loads(response.body)
    if response.status >= 400:
        assert isinstance(value, dict) and isinstance(value["error"], str) and value["error"], value
        assert set(value) <= {"error", "problems"}, value
        problems = value.get("problems", [])
        assert isinstance(problems, list) and all(isinstance(p, str) and p.startswith("$") for p in problems), value
        if value["error"] == "invalid VM description":
            assert problems, "an invalid description must list its problems"
    return response.status, value


@dataclass
class Sender:
    """How a write reaches the API: through AdminApi.handle, or as raw HTTP in `cuts` reads."""

    via_protocol: bool
    chunked: bool
    cuts: list[int]

    def send(self, w: World, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if not self.via_protocol:
            [response] = split_responses(w.api.handle(method, path, None, body, False))
            return check_answer(response)
        data = http_request(method, path.encode(), body, self.chunked)
        protocol, transport = admin_connection(w.api)
        points = sorted({cut % (len(data) + 1) for cut in self.cuts})
        for start, end in zip([0, *points], [*points, len(data)], strict=True):
            if not transport.ended:
                protocol.data_received(data[start:end])
        [response] = split_responses(transport.output)
        if response.status in (400, 413, 431) and transport.ended:
            assert response.headers["connection"] == "close"  # the framing could not be trusted
        return check_answer(response)


senders = st.builds(Sender, st.booleans(), st.booleans(), st.lists(st.integers(0, 10**6), max_size=4))


def texts_of(answer: Any) -> list[str]:
    return [answer["error"], *answer.get("problems", [])]


def assert_mentions(answer: Any, needle: str) -> None:
    assert any(needle in text for text in texts_of(answer)), (needle, answer)


def assert_refused(w: World, before: dict[str, Any], status: int, answer: Any, *needles: str) -> None:
    assert 400 <= status < 500, (status, answer)
    for needle in needles:
        assert_mentions(answer, needle)
    assert w.observed() == before, "a refused write changed something"


def assert_applied(
    w: World, before: dict[str, Any], vm_id: str, reply: tuple[int, Any], expected: Any, *, no_op: bool = False
) -> None:
    """An accepted write (its `reply`: status, JSON) is exactly the one asked for, and touches no other VM.

    `no_op`: a PATCH that changes nothing, which keeps the generation.
    """
    status, answer = reply
    assert status in (200, 201), (status, answer)
    assert answer == {"id": vm_id, "generation": w.generation(vm_id)}
    assert w.generation(vm_id) == before["stores"].get(vm_id, (None, 0))[1] + (0 if no_op else 1)
    assert w.document(vm_id) == expected
    for other, caller in CALLERS.items():
        if other != vm_id:
            assert w.served(caller) == before["served"][other]
            assert orjson.dumps(w.control.document(other)) == before["documents"][other]


def nested(depth: int, container: str = "list") -> bytes:
    """A JSON value `depth` containers deep (built as text: Python's own encoders stop far sooner)."""
    if container == "list":
        return b"[" * depth + b"1" + b"]" * depth
    return b'{"k":' * depth + b"1" + b"}" * depth


# ---- malformed JSON ----


@st.composite
def malformed_json(draw: st.DrawFn) -> bytes:
    """Bytes that are not one JSON document."""
    valid = orjson.dumps(SEEDS["a"])
    body = draw(
        st.one_of(
            st.binary(max_size=64),
            st.sampled_from(
                [
                    b"",
                    b"{",
                    b"{not json",
                    b"[1,",
                    b"NaN",
                    b"Infinity",
                    b'{"instance": NaN}',
                    b'{"a": 1} {"b": 2}',
                    b"\xef\xbb\xbf{}",
                    b'{"\xff": 1}',
                    b'"\\ud800"',
                    b'{"a": "\\x"}',
                    b"{'a': 1}",
                    b'{"a": 01}',
                    b'{"a": 1,}',
                    b"\x00",
                ]
            ),
            st.integers(0, len(valid) - 1).map(lambda cut: valid[:cut]),
            st.tuples(st.integers(0, len(valid) - 1), st.sampled_from([b"\x00", b"{", b"]", b'"', b",", b"\xff"])).map(
                lambda edit: valid[: edit[0]] + edit[1] + valid[edit[0] :]
            ),
        )
    )
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    return body + b"}"  # valid after all (say, a prefix that is a number): break it for sure


@budget(120)
@given(body=malformed_json(), method=st.sampled_from(["PUT", "PATCH"]), vm_id=st.sampled_from(["a", "b", "new"]))
def test_malformed_json_is_refused_and_changes_nothing(body: bytes, method: str, vm_id: str) -> None:
    with world() as w:
        before = w.observed()
        status, answer = Sender(False, False, []).send(w, method, f"/vms/{vm_id}", body)
        assert status == 400
        assert_refused(w, before, status, answer, "not valid JSON")


# ---- deep nesting and huge documents ----

DEPTHS = [MAX_NESTING_DEPTH + 1, 100, 253, 254, 255, 256, 300, 1000, 1023, 1024, 1025, 5000, 100_000]
# Where the deep value goes: (prefix, suffix) around it as JSON text, and how many containers enclose it.
PLACES = {
    "top": (b"", b"", 0),
    "instance": (b'{"instance":', b"}", 1),
    "unknown_instance_field": (b'{"instance":{"compute":{},"network":{},"custom":', b"}}", 2),
    "compute_field_patch": (b'{"instance":{"compute":{"custom":', b"}}}", 3),
    "callers": (b'{"callers":', b"}", 1),
    "scheduled_events": (b'{"scheduledEvents":', b"}", 1),
    "identities": (b'{"identities":{"systemAssigned":', b"}}", 2),
    "loadbalancer": (b'{"loadbalancer":{"inboundRules":', b"}}", 2),
    "extended": (b'{"extended":{"compute":{"x":', b"}}}", 3),
}
ORJSON_MAX_ENCODE_DEPTH = 254  # orjson.dumps refuses deeper (and so the bus cannot store it)
ORJSON_MAX_DECODE_DEPTH = 1024  # orjson.loads refuses deeper


@budget(80)
@given(
    depth=st.sampled_from(DEPTHS),
    container=st.sampled_from(["list", "object"]),
    place=st.sampled_from(sorted(PLACES)),
    method=st.sampled_from(["PUT", "PATCH"]),
    sender=senders,
)
def test_deep_nesting_is_refused_and_changes_nothing(
    depth: int, container: str, place: str, method: str, sender: Sender
) -> None:
    prefix, suffix, enclosing = PLACES[place]
    body = prefix + nested(depth, container) + suffix
    if enclosing + depth > ORJSON_MAX_DECODE_DEPTH:
        needles: tuple[str, ...] = ("not valid JSON: depth limit exceeded",)
    elif enclosing + depth > ORJSON_MAX_ENCODE_DEPTH:
        needles = ("not storable as JSON",)
    elif place in ("unknown_instance_field", "compute_field_patch"):
        needles = (f"nested deeper than {MAX_NESTING_DEPTH} levels",)
    else:
        needles = ("",)  # refused for its shape, which check_answer saw named
    with world() as w:
        before = w.observed()
        status, answer = sender.send(w, method, "/vms/a", body)
        assert status == 400, answer
        assert any(needle in text for needle in needles for text in texts_of(answer)), answer
        assert_refused(w, before, status, answer)


@budget(12, long_run_cap=200)  # ~80 ms each (1 MiB of JSON), and few shapes to vary
@given(
    shape=st.sampled_from(["string", "keys", "list"]),
    extra=st.integers(1, 64 * 1024),
    method=st.sampled_from(["PUT", "PATCH"]),
    sender=senders,
)
def test_huge_documents_are_refused_and_change_nothing(shape: str, extra: int, method: str, sender: Sender) -> None:
    document = copy.deepcopy(SEEDS["a"]) if method == "PUT" else {"instance": {"compute": {}}}
    compute = document["instance"]["compute"]
    size = MAX_VM_FILE_BYTES + extra
    if shape == "string":
        compute["tags"] = "x" * size
    elif shape == "keys":
        compute.update({f"k{index:07d}": "" for index in range(size // 14 + 1)})
    else:
        compute["publicKeys"] = [{}] * (size // 3 + 1)
    body = orjson.dumps(document)
    with world() as w:
        before = w.observed()
        status, answer = sender.send(w, method, "/vms/a", body)
        assert status == 413, answer
        if len(body) > MAX_ADMIN_BODY_BYTES and sender.via_protocol:
            assert_refused(w, before, status, answer, str(MAX_ADMIN_BODY_BYTES))
        else:
            assert_refused(w, before, status, answer, str(MAX_VM_FILE_BYTES))


# ---- wrong types everywhere ----


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths_of(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths_of(child, (*prefix, index))


EXTRA_TOP_LEVEL = [("id",), ("identities",), ("loadbalancer",), ("scheduledEvents",), ("extended",), ("bogus",)]
PATHS = [path for path in paths_of(SEEDS["a"]) if path] + EXTRA_TOP_LEVEL

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["10.1.0.4", "10.2.0.4", "fd00::4", "", "a/b", "\x00", "Reboot"])
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


def is_ip(value: Any) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return isinstance(value, str)


def json_path(path: tuple[Any, ...]) -> str:
    return "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)


def kind(value: Any) -> str:
    return "object" if isinstance(value, dict) else "array" if isinstance(value, list) else "leaf"


def replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    """`document` with the value at `path` replaced (created, for a missing last key)."""
    result = copy.deepcopy(document)
    node = result
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return result


def as_patch(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A merge patch that puts `value` at `path`: objects merge, so an array on the way is sent whole."""
    for cut, part in enumerate(path):
        if isinstance(part, int):
            head = path[:cut]
            whole = replaced(document, path, value)
            for key in head:
                whole = whole[key]
            value, path = whole, head
            break
    patch: Any = value
    for key in reversed(path):
        patch = {key: patch}
    return patch


def expected_refusal(method: str, path: tuple[Any, ...], value: Any) -> str | None:
    """Text a refusal must contain when putting `value` at `path` must be refused; None if it may pass."""
    # A null in a merge patch deletes; inside an array (sent whole) it is a value.
    deleted = method == "PATCH" and value is None and not any(isinstance(part, int) for part in path)
    top = path[0]
    if top == "id":
        return None if deleted or value == "a" else "does not match"
    if top == "bogus":
        return None if deleted else "$.bogus: unknown top-level key"
    if top == "callers" and not deleted:
        addresses = value if len(path) == 1 else [value]
        if not isinstance(addresses, list):
            return "$.callers: expected an array"
        if not all(is_ip(address) for address in addresses):
            return "is not an IPv4 or IPv6 address"
        return "10.2.0.4" if "10.2.0.4" in addresses else None  # VM b's: a conflict
    if top == "instance":
        if len(path) == 1:
            return "$.instance" if deleted or not isinstance(value, dict) else None
        if deleted:
            return f"{json_path(path)}: required key is missing" if path[1:] in (("compute",), ("network",)) else None
        pattern = ""
        for part in path[1:]:
            pattern = child_pattern(pattern, part)
        expected_kind = INSTANCE_FIELD_KIND.get(pattern)
        if expected_kind is not None and expected_kind != kind(value):
            return f"{json_path(path)}: expected"
    return None


@budget(250)
@given(
    path=st.sampled_from(PATHS),
    value=json_values,
    method=st.sampled_from(["PUT", "PATCH"]),
    sender=senders,
)
def test_wrong_types_anywhere_are_refused_or_applied_exactly(
    path: tuple[Any, ...], value: Any, method: str, sender: Sender
) -> None:
    document = SEEDS["a"]
    sent = replaced(document, path, value) if method == "PUT" else as_patch(document, path, value)
    # json, not orjson: integers past 64 bits are fair game for a client.
    body = json.dumps(sent).encode()
    needle = expected_refusal(method, path, value)
    with world() as w:
        before = w.observed()
        status, answer = sender.send(w, method, "/vms/a", body)
        if status < 400:
            assert needle is None, f"accepted although {needle!r} was expected"
            received = orjson.loads(body)  # what the server parsed
            expected = received if method == "PUT" else rfc7396_merge_patch(document, received)
            no_op = method == "PATCH" and expected == document
            assert_applied(w, before, "a", (status, answer), expected, no_op=no_op)
        elif needle is not None:
            assert_refused(w, before, status, answer, needle)
        else:
            assert_refused(w, before, status, answer)


# ---- merge patches that would make a VM invalid ----

# name: (patch, what refuses it, text the refusal names, group); at most one per group,
# and never one that replaces what another patches inside (EXCLUDES).
INVALID_PATCHES: dict[str, tuple[Any, str, str, str]] = {
    "no_instance": ({"instance": None}, "problem", "$.instance: required key is missing", "instance"),
    "instance_array": ({"instance": [1]}, "problem", "$.instance: expected an object", "instance"),
    "no_compute": (
        {"instance": {"compute": None}},
        "problem",
        "$.instance.compute: required key is missing",
        "compute",
    ),
    "compute_text": ({"instance": {"compute": "x"}}, "problem", "$.instance.compute: expected an object", "compute"),
    "no_network": (
        {"instance": {"network": None}},
        "problem",
        "$.instance.network: required key is missing",
        "network",
    ),
    "interface_object": (
        {"instance": {"network": {"interface": {"0": {}}}}},
        "problem",
        "$.instance.network.interface: expected an array",
        "network",
    ),
    "os_profile_array": (
        {"instance": {"compute": {"osProfile": [1]}}},
        "problem",
        "$.instance.compute.osProfile: expected an object",
        "compute field",
    ),
    "leaf_object": (
        {"instance": {"compute": {"location": {"a": "b"}}}},
        "problem",
        "$.instance.compute.location: expected a string",
        "compute field",
    ),
    "slash_key": (
        {"instance": {"compute": {"a/b": "x"}}},
        "problem",
        "'a/b' is empty or contains '/'",
        "compute field",
    ),
    "empty_key": ({"instance": {"compute": {"": "x"}}}, "problem", "'' is empty or contains '/'", "compute field"),
    "control_key": ({"instance": {"compute": {"a\x01b": "x"}}}, "problem", "control character", "compute field"),
    "too_deep": (
        {"instance": {"compute": {"deep": orjson.loads(nested(MAX_NESTING_DEPTH + 5, "object"))}}},
        "problem",
        f"nested deeper than {MAX_NESTING_DEPTH} levels",
        "compute field",
    ),
    "unstorable": (
        {"instance": {"compute": {"deeper": orjson.loads(nested(300))}}},
        "unstorable",
        "not storable as JSON",
        "compute field",
    ),
    "callers_text": ({"callers": "10.0.0.1"}, "problem", "$.callers: expected an array", "callers"),
    "callers_not_ip": ({"callers": ["not-an-ip"]}, "problem", "$.callers[0]: 'not-an-ip' is not an IPv4", "callers"),
    "callers_conflict": ({"callers": ["10.2.0.4"]}, "conflict", "10.2.0.4", "callers"),
    "network_conflict": (
        {"instance": {"network": {"interface": [{"ipv4": {"ipAddress": [{"privateIpAddress": "10.2.0.4"}]}}]}}},
        "conflict",
        "10.2.0.4",
        "network",
    ),
    "unknown_key": ({"bogus": {}}, "problem", "$.bogus: unknown top-level key", "bogus"),
    "extended_array": ({"extended": {"compute": {"x": [1]}}}, "problem", "$.extended.compute.x", "extended"),
    "extended_key": ({"extended": {"other": {}}}, "problem", "$.extended: expected an object", "extended"),
    "identities": ({"identities": {"systemAssigned": {}}}, "problem", "$.identities.tenantId: required", "identities"),
    "loadbalancer": (
        {"loadbalancer": {"inboundRules": [{"frontendPort": "80"}]}},
        "problem",
        "$.loadbalancer.inboundRules[0]",
        "loadbalancer",
    ),
    "events_text": ({"scheduledEvents": "Reboot"}, "problem", "$.scheduledEvents: expected an array", "events"),
    "id_mismatch": ({"id": "zzz"}, "id", "does not match", "id"),
    "id_number": ({"id": 7}, "id", "does not match", "id"),
}
EXCLUDES = {"instance": {"compute", "network", "compute field"}, "compute": {"compute field"}}


def compatible(names: list[str]) -> bool:
    groups = [INVALID_PATCHES[name][3] for name in names]
    once = [group for group in groups if group != "compute field"]
    if len(once) != len(set(once)):
        return False
    return not any(EXCLUDES.get(group, set()) & set(groups) for group in groups)


def deep_merge(target: Any, patch: Any) -> Any:
    """Merge `patch` into `target` keeping its nulls (a patch made of patches)."""
    if not (isinstance(target, dict) and isinstance(patch, dict)):
        return patch
    result = dict(target)
    for key, value in patch.items():
        result[key] = deep_merge(result.get(key), value)
    return result


@budget(150)
@given(
    names=st.lists(st.sampled_from(sorted(INVALID_PATCHES)), min_size=1, max_size=4, unique=True).filter(compatible),
    method=st.sampled_from(["PATCH", "PUT"]),
    sender=senders,
)
def test_writes_that_would_make_a_vm_invalid_are_refused_naming_every_problem(
    names: list[str], method: str, sender: Sender
) -> None:
    patch: Any = {}
    for name in names:
        patch = deep_merge(patch, INVALID_PATCHES[name][0])
    sent = patch if method == "PATCH" else rfc7396_merge_patch(SEEDS["a"], patch)
    kinds = {INVALID_PATCHES[name][1] for name in names}
    # The order Control checks in: a PATCH too deep to store is refused before it is merged.
    order = ["unstorable", "id"] if method == "PATCH" else ["id", "unstorable"]
    with world() as w:
        before = w.observed()
        # json, not orjson: orjson cannot encode the "unstorable" patch (nor can the server store it).
        status, answer = sender.send(w, method, "/vms/a", json.dumps(sent).encode())
        for first in [*order, "problem", "conflict"]:
            if first in kinds:
                break
        needles = [INVALID_PATCHES[name][2] for name in names if INVALID_PATCHES[name][1] == first]
        assert status == (409 if first == "conflict" else 400), answer
        assert_refused(w, before, status, answer, *(needles if first == "problem" else needles[:1]))


@pytest.mark.parametrize("name", sorted(INVALID_PATCHES))
def test_each_invalid_patch_alone(name: str) -> None:
    patch, _, needle, _ = INVALID_PATCHES[name]
    with world() as w:
        before = w.observed()
        status, answer = Sender(True, False, []).send(w, "PATCH", "/vms/a", json.dumps(patch).encode())
        assert_refused(w, before, status, answer, needle)


# ---- bad ids ----

ID_CHARACTERS = st.characters(codec="utf-8", exclude_characters="?#")


@st.composite
def bad_vm_id(draw: st.DrawFn) -> str:
    """A path segment (or more) that is not a VM id."""
    vm_id = draw(
        st.one_of(
            st.sampled_from(["", ".", "..", "-a", "_a", ".a", "a b", "a%20b", "%2e%2e", "../etc", "a/b", "a\\b", "é"]),
            st.text(ID_CHARACTERS, min_size=1, max_size=16),
            st.integers(129, 400).map(lambda size: "a" * size),
            st.text(st.sampled_from("ab.-_/"), min_size=1, max_size=8),
        )
    )
    effective = vm_id.rstrip("/")  # the router ignores a trailing "/"
    return vm_id if not VM_ID_PATTERN.fullmatch(effective) else vm_id + "!"


@budget(150)
@given(
    vm_id=bad_vm_id(),
    method=st.sampled_from(["PUT", "PATCH", "DELETE"]),
    valid_body=st.booleans(),
    sender=senders,
)
def test_bad_ids_are_refused_and_change_nothing(vm_id: str, method: str, valid_body: bool, sender: Sender) -> None:
    body = orjson.dumps(vm_document("x") if valid_body else {"instance": {"compute": {}}})
    with world() as w:
        before = w.observed()
        status, answer = sender.send(w, method, "/vms/" + vm_id, body if method != "DELETE" else b"")
        assert_refused(w, before, status, answer)  # whatever reached the router: a 4xx, and nothing changed
        if sender.via_protocol and not URL_CHARACTERS.fullmatch(vm_id):
            return  # HTTP parsing decided what (if anything) of the target reached the router
        effective = vm_id.rstrip("/")  # the router ignores a trailing "/"
        if not effective:  # "/vms/" is /vms itself
            assert status == 405 and f"{method} is not allowed on /vms" in answer["error"], answer
        elif status == 404:
            assert method != "PUT" and f"no VM {effective!r}" in answer["error"], answer
        else:
            assert status == 400 and method == "PUT" and f"{effective!r} is not a VM id" in answer["error"], answer


URL_CHARACTERS = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@/%-]*")  # RFC 3986, bar "?" and "#"


@budget(60)
@given(
    vm_id=st.from_regex(VM_ID_PATTERN, fullmatch=True).filter(lambda vm_id: vm_id not in SEEDS),
    method=st.sampled_from(["PUT", "PATCH", "DELETE"]),
    sender=senders,
)
def test_every_good_id_is_a_vm_to_create_or_to_find(vm_id: str, method: str, sender: Sender) -> None:
    # The other side of the id rule: an id the pattern allows is created by PUT,
    # and is an unknown VM (404, naming it) to PATCH and DELETE.
    with world() as w:
        before = w.observed()
        document = vm_document(vm_id)
        status, answer = sender.send(w, method, f"/vms/{vm_id}", orjson.dumps(document) if method != "DELETE" else b"")
        if method == "PUT":
            assert status == 201
            assert_applied(w, before, vm_id, (status, answer), document)
        else:
            assert_refused(w, before, status, answer, f"no VM {vm_id!r}")


# ---- hostile HTTP framing around a write ----

FRAMINGS = [
    b"Content-Length: 5\r\nContent-Length: 6",
    b"Content-Length: 5\r\nTransfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    b"Content-Length: -1",
    b"Content-Length: 0x10",
    b"Content-Length: 99999999999999999999",
    b"Content-Length: %d" % (MAX_ADMIN_BODY_BYTES + 1),
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 2",
    b"X-Fold: a\r\n b\r\nContent-Length: 2",
    b"X-Big: " + b"v" * 17000 + b"\r\nContent-Length: 2",
    b"Content-Length: 2",
]


@budget(100)
@given(
    line=st.tuples(
        st.sampled_from([b"PUT", b"PATCH", b"CONNECT", b"POST", b"BREW"]),
        st.sampled_from([b"/vms/a", b"/vms/a?x=1", b"/vms/a/", b"/vms", b"/vms/%61", b"*", b"/vms/a b"]),
    ),
    framing=st.sampled_from(FRAMINGS),
    # Each is refused however much of it a framing delivers ({} would be a valid PATCH: no change, new generation).
    body=st.sampled_from([b'{"bogus": 1}', b"[]", b'{"instance": 1}', b"\x00\x01", b"5\r\n{}{}{\r\n0\r\n\r\n"]),
    cuts=st.lists(st.integers(0, 10**6), max_size=5),
    trailer=st.booleans(),
)
def test_hostile_framing_of_a_write_gets_json_answers_and_changes_nothing(
    line: tuple[bytes, bytes], framing: bytes, body: bytes, cuts: list[int], trailer: bool
) -> None:
    # None of these bodies is a valid VM, so nothing may change whatever the framing
    # made of them; a following GET is answered after them unless the connection closed.
    data = b"%s %s HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n%s" % (*line, framing, body)
    if trailer:
        data += b"GET /vms/a HTTP/1.1\r\nHost: x\r\n\r\n"
    with world() as w:
        before = w.observed()
        outputs = []
        for reads in ([data], [data[a:b] for a, b in pairwise_cuts(data, cuts)]):
            protocol, transport = admin_connection(w.api)
            for read in reads:
                if not transport.ended:
                    protocol.data_received(read)
            responses = split_responses(transport.output)
            for index, response in enumerate(responses):
                check_answer(response)
                if response.headers.get("connection") == "close":
                    assert index == len(responses) - 1 and transport.ended
            outputs.append([(response.status, response.body) for response in responses])
            assert w.observed() == before
        # Where reads end may change what a head too large or a bad byte is reported as,
        # never how many answers there are nor any answer to a complete request.
        assert len(outputs[0]) == len(outputs[1])


def pairwise_cuts(data: bytes, cuts: list[int]) -> list[tuple[int, int]]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return list(zip([0, *points], [*points, len(data)], strict=True))


def test_the_checks_catch_what_they_claim_to() -> None:
    # A refusal without its problem named, a 5xx, or a change behind a refusal all fail.
    with world() as w:
        before = w.observed()
        with pytest.raises(AssertionError):
            check_answer(Response(500, {"content-type": JSON_TYPE}, b'{"error":"internal error"}'))
        with pytest.raises(AssertionError):
            check_answer(Response(400, {"content-type": JSON_TYPE}, b'{"error":"invalid VM description"}'))
        with pytest.raises(AssertionError):
            assert_refused(w, before, 400, {"error": "x"}, "not there")
        status, answer = Sender(False, False, []).send(w, "DELETE", "/vms/b", b"")
        assert status == 200
        with pytest.raises(AssertionError, match="changed something"):
            assert_refused(w, before, 400, answer)

"""resolve() as a table: every wire rule of the core issue, one row each."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest

from fastimds.imds import events
from fastimds.imds.effects import Approval
from fastimds.imds.render import BAD_API_VERSION_MESSAGE
from fastimds.imds.routing import resolve
from fastimds.imds.snapshot import MAX_MEMO_ENTRIES, Snapshot, build_snapshot
from fastimds.imds.versions import API_VERSIONS
from tests.support.fakes import sample_vm

SAMPLE = sample_vm().instance
COMPUTE = SAMPLE["compute"]
NEWEST = ["2025-04-07", "2024-07-17", "2024-03-15"]
BAD_VERSION = {"error": BAD_API_VERSION_MESSAGE, "newest-versions": NEWEST}
NOT_FOUND = {"error": "Not found"}
LEAF_NEEDS_TEXT = {"error": "Bad request. Leaf nodes can only be requested with format=text"}
MISSING_HEADER = {"error": "Bad request. Required metadata header not specified"}

V = "api-version=2021-02-01"


@pytest.fixture(scope="module")
def snapshot() -> Snapshot:
    return build_snapshot(sample_vm(), generation=1)


def get(
    snapshot: Snapshot, target: str, method: str = "GET", metadata_ok: bool = True, forwarded: bool = False
) -> tuple[int, Any, bytes]:
    reply = resolve(snapshot, method.encode(), target.encode(), metadata_ok, forwarded)
    kind = b"json" if b"application/json" in reply.head else b"text"
    body: Any = orjson.loads(reply.body) if kind == b"json" else reply.body.decode()
    return reply.status, body, reply.head


# (target, status, expected body) — JSON bodies as Python values, text as str.
TABLE: list[tuple[str, int, Any]] = [
    # versions: unversioned, oldest first
    ("/metadata/versions", 200, {"apiVersions": list(API_VERSIONS)}),
    ("/metadata/versions?api-version=junk", 200, {"apiVersions": list(API_VERSIONS)}),
    # api-version required, checked before format and leaf rules
    ("/metadata/instance", 400, BAD_VERSION),
    ("/metadata/instance?api-version=", 400, BAD_VERSION),
    ("/metadata/instance?api-version=2099-01-01", 400, BAD_VERSION),
    ("/metadata/instance?api-version=latest", 400, BAD_VERSION),
    ("/metadata/instance?api-version=2017-07-01", 400, BAD_VERSION),  # well-formed, never published
    ("/metadata/instance/compute/location?format=json", 400, BAD_VERSION),  # MSAL region discovery
    ("/metadata/instance/compute/location?format=text", 400, BAD_VERSION),
    ("/metadata/instance/no/such/path", 400, BAD_VERSION),
    # duplicates
    (f"/metadata/instance?{V}&{V}", 400, {"error": "Bad request. Duplicate query parameter names are not allowed"}),
    (f"/metadata/instance?{V}&format=text&format=json", 400, {"error": "Bad request. Duplicate query parameter names are not allowed"}),
    # format
    (f"/metadata/instance?{V}&format=xml", 400, {"error": "Bad request. format must be json or text"}),
    (f"/metadata/instance?{V}&format=text", 200, "compute/\nnetwork/"),
    (f"/metadata/instance?{V}&format=TEXT", 200, "compute/\nnetwork/"),
    # leaves: text gives the raw value, JSON (explicit or default) is 400
    (f"/metadata/instance/compute/vmId?{V}&format=text", 200, COMPUTE["vmId"]),
    (f"/metadata/instance/compute/vmId?{V}", 400, LEAF_NEEDS_TEXT),
    (f"/metadata/instance/compute/vmId?{V}&format=json", 400, LEAF_NEEDS_TEXT),
    (f"/metadata/instance/compute/userData?{V}&format=text", 200, COMPUTE["userData"]),
    (f"/metadata/instance/compute/customData?{V}&format=text", 200, ""),
    # route parameters walk keys and array indices
    (f"/metadata/instance/network/interface/1/ipv4/ipAddress/0/privateIpAddress?{V}&format=text", 200, "10.0.1.4"),
    (f"/metadata/instance/network/interface/0/ipv6/ipAddress/0/privateIpAddress?{V}&format=text", 200, "fd00:10::4"),
    (f"/metadata/instance/network/interface/0/ipv4/ipAddress/0/publicIpAddress?{V}&format=text", 200, "20.61.15.7"),
    (f"/metadata/instance/compute/tagsList/1/name?{V}&format=text", 200, "owner"),
    (f"/metadata/instance/compute/tagsList?{V}", 200, COMPUTE["tagsList"]),
    (f"/metadata/instance/network?{V}", 200, SAMPLE["network"]),
    (f"/metadata/instance/network/interface/0/ipv4/ipAddress/0?{V}", 200, SAMPLE["network"]["interface"][0]["ipv4"]["ipAddress"][0]),
    # listings: one child per line, "/" on containers, arrays by index
    (f"/metadata/instance/network/interface?{V}&format=text", 200, "0/\n1/"),
    (f"/metadata/instance/network/interface/0?{V}&format=text", 200, "ipv4/\nipv6/\nmacAddress"),
    (f"/metadata/instance/network/interface/1/ipv6/ipAddress?{V}&format=text", 200, ""),
    (f"/metadata/instance/network/interface/1/ipv6/ipAddress?{V}", 200, []),
    (f"/metadata/instance/compute/osProfile?{V}&format=text", 200, "adminUsername\ncomputerName\ndisablePasswordAuthentication"),
    # a trailing "/" is ignored
    (f"/metadata/instance/?{V}&format=text", 200, "compute/\nnetwork/"),
    (f"/metadata/instance/compute/vmId/?{V}&format=text", 200, COMPUTE["vmId"]),
    # missing paths are 404
    (f"/metadata/instance/location?{V}&format=text", 404, NOT_FOUND),  # scylla's bug: missing compute/
    (f"/metadata/instance/network/interface/2?{V}", 404, NOT_FOUND),
    (f"/metadata/instance/network/interface/01?{V}", 404, NOT_FOUND),
    (f"/metadata/instance/network/interface/-1?{V}", 404, NOT_FOUND),
    (f"/metadata/instance/compute/vmId/deeper?{V}&format=text", 404, NOT_FOUND),
    (f"/metadata/instance/Compute?{V}", 404, NOT_FOUND),  # keys are case-sensitive
    (f"/metadata/nosuchcategory?{V}", 404, NOT_FOUND),
    # the bare root: the api-version 400 (a real VM, 2025: azure-compute-docs PR 289); with one, a listing
    ("/metadata", 400, BAD_VERSION),
    ("/metadata/", 400, BAD_VERSION),
    ("/metadata?format=text", 400, BAD_VERSION),
    ("/metadata?api-version=2099-01-01", 400, BAD_VERSION),
    (f"/metadata?{V}&format=text", 200, "instance/"),
    ("/metadata?api-version=2017-03-01&format=text", 200, "instance/"),
    (f"/metadata?{V}", 404, NOT_FOUND),
    (f"/metadata?{V}&format=xml", 400, {"error": "Bad request. format must be json or text"}),
    # the 2017-03-01 preview: its own network key names (docs/azure-imds.md)
    ("/metadata/instance/network/interface/0/ipv4/ipaddress/0/publicip?api-version=2017-03-01&format=text", 200, "20.61.15.7"),
    ("/metadata/instance/network/interface/0/ipv4/ipaddress/0/ipaddress?api-version=2017-03-01&format=text", 200, "10.0.0.4"),
    ("/metadata/instance/network/interface/0/mac?api-version=2017-03-01&format=text", 200, "6045BD8E1A2B"),
    ("/metadata/instance/network/interface/0?api-version=2017-03-01&format=text", 200, "ipv4/\nipv6/\nmac"),
    ("/metadata/instance/network/interface/0/ipv4/subnet/0?api-version=2017-03-01&format=text", 200, "address\ndnsservers/\nprefix"),
    ("/metadata/instance/network/interface/0/macAddress?api-version=2017-03-01&format=text", 404, NOT_FOUND),
    ("/metadata/instance/compute/tags?api-version=2017-03-01&format=text", 404, NOT_FOUND),
    ("/metadata/instance/compute/vmId?api-version=2017-03-01", 400, LEAF_NEEDS_TEXT),
    ("/", 404, NOT_FOUND),
    ("/latest/meta-data/", 404, NOT_FOUND),
    # "/metadata" itself is case-insensitive; categories are not
    (f"/METADATA/instance/compute/vmId?{V}&format=text", 200, COMPUTE["vmId"]),
    (f"/metadata/Instance?{V}", 404, NOT_FOUND),
    # percent-encoded targets
    ("/metadata/instance/compute/%76mId?api-version%3D2021-02-01&format=text", 400, BAD_VERSION),
    (f"/metadata/instance/compute/%76mId?{V}&format=text", 200, COMPUTE["vmId"]),
    # version gating: newer fields are absent and 404 at older versions
    ("/metadata/instance/compute/physicalZone?api-version=2023-07-01&format=text", 404, NOT_FOUND),
    ("/metadata/instance/compute/physicalZone?api-version=2023-11-15&format=text", 200, "westeurope-AZ02"),
    ("/metadata/instance/compute/publicKeys?api-version=2018-02-01", 404, NOT_FOUND),
    ("/metadata/instance/compute/publicKeys/0/path?api-version=2018-04-02&format=text", 200, "/home/azureuser/.ssh/authorized_keys"),
    ("/metadata/instance/compute/osProfile?api-version=2020-09-01&format=text", 200, "adminUsername\ncomputerName"),
    ("/metadata/instance/compute/osProfile/disablePasswordAuthentication?api-version=2020-09-01&format=text", 404, NOT_FOUND),
    ("/metadata/instance/compute/storageProfile/imageReference?api-version=2021-02-01&format=text", 200, "id\noffer\npublisher\nsku\nversion"),
    ("/metadata/instance/compute/storageProfile/dataDisks/0/isUltraDisk?api-version=2021-02-01&format=text", 404, NOT_FOUND),
    ("/metadata/instance/compute/storageProfile/dataDisks/0/isUltraDisk?api-version=2021-05-01&format=text", 200, "false"),
    ("/metadata/instance/compute/securityProfile?api-version=2021-02-01", 200, {"secureBootEnabled": "true", "virtualTpmEnabled": "true"}),
    ("/metadata/instance/network/interface/0/macAddress?api-version=2017-04-02&format=text", 200, "6045BD8E1A2B"),
]  # fmt: skip


@pytest.mark.parametrize(("target", "status", "expected"), TABLE, ids=[row[0] for row in TABLE])
def test_table(snapshot: Snapshot, target: str, status: int, expected: Any) -> None:
    got_status, body, _ = get(snapshot, target)
    assert (got_status, body) == (status, expected)


def test_missing_or_wrong_metadata_header_is_400_json_everywhere(snapshot: Snapshot) -> None:
    for target in ("/metadata/instance?api-version=2021-02-01", "/metadata/versions", "/nowhere", "/metadata/instance"):
        assert get(snapshot, target, metadata_ok=False)[:2] == (400, MISSING_HEADER)


def test_x_forwarded_for_is_refused(snapshot: Snapshot) -> None:
    status, body, _ = get(snapshot, f"/metadata/instance?{V}", forwarded=True)
    assert status == 400
    assert "X-Forwarded-For" in body["error"]


def test_metadata_header_is_checked_before_x_forwarded_for(snapshot: Snapshot) -> None:
    assert get(snapshot, f"/metadata/instance?{V}", metadata_ok=False, forwarded=True)[:2] == (400, MISSING_HEADER)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405_with_allow(snapshot: Snapshot, method: str) -> None:
    for target in (f"/metadata/instance/compute?{V}", "/metadata/versions"):
        status, body, head = get(snapshot, target, method=method)
        assert status == 405
        assert b"Allow: GET, HEAD\r\n" in head
        assert method in body["error"]


def test_head_resolves_like_get(snapshot: Snapshot) -> None:
    assert get(snapshot, f"/metadata/instance?{V}", method="HEAD") == get(snapshot, f"/metadata/instance?{V}")


def test_extended_adds_the_extended_section_from_its_version(snapshot: Snapshot) -> None:
    extended = {"compute": {"hasCustomData": False, "ppsType": "None"}}
    status, body, _ = get(snapshot, "/metadata/instance?api-version=2021-08-01&extended=true")
    assert status == 200
    assert body["extended"] == extended
    assert body["compute"] == get(snapshot, "/metadata/instance/compute?api-version=2021-08-01")[1]
    assert get(snapshot, "/metadata/instance?api-version=2021-08-01&extended=true&format=text")[1] == (
        "compute/\nextended/\nnetwork/"
    )
    # Older versions ignore it (cloud-init falls back to 2019-06-01 without it).
    old = get(snapshot, "/metadata/instance?api-version=2019-06-01&extended=true")
    assert old == get(snapshot, "/metadata/instance?api-version=2019-06-01")
    assert "extended" not in get(snapshot, "/metadata/instance?api-version=2021-08-01&extended=false")[1]
    assert get(snapshot, "/metadata/instance?api-version=2021-08-01&extended=yes")[0] == 400


def test_extended_values_come_from_the_data_file() -> None:
    from fastimds.imds.datafile import parse_vm

    doc = {"instance": SAMPLE, "extended": {"compute": {"ppsType": "Running", "hasCustomData": True}}}
    snap = build_snapshot(parse_vm(orjson.dumps(doc), "test"), 1)
    _, body, _ = get(snap, "/metadata/instance?api-version=2023-11-15&extended=true")
    # Served with the types the file gives them (cloud-init reads hasCustomData as a boolean).
    assert body["extended"] == {"compute": {"hasCustomData": True, "ppsType": "Running"}}


def test_the_oldest_instance_version_shows_only_the_first_fields(snapshot: Snapshot) -> None:
    _, body, _ = get(snapshot, "/metadata/instance?api-version=2017-04-02")
    first_fields = ["location", "name", "offer", "osType", "platformFaultDomain", "platformUpdateDomain"]
    first_fields += ["publisher", "sku", "version", "vmId", "vmSize"]
    assert sorted(body["compute"]) == sorted(first_fields)
    assert body["network"] == SAMPLE["network"]


def test_the_newest_version_shows_the_whole_document(snapshot: Snapshot) -> None:
    for version in ("2023-11-15", "2024-03-15", "2025-04-07"):
        assert get(snapshot, f"/metadata/instance?api-version={version}")[1] == SAMPLE


def test_every_version_is_a_superset_of_the_one_before(snapshot: Snapshot) -> None:
    previous: set[str] = set()
    for version in API_VERSIONS[1:]:
        fields = set(get(snapshot, f"/metadata/instance/compute?api-version={version}")[1])
        assert previous <= fields, version
        previous = fields


def test_json_is_compact_and_key_sorted(snapshot: Snapshot) -> None:
    reply = resolve(snapshot, b"GET", f"/metadata/instance?{V}".encode(), True, False)
    assert b" " not in reply.body.split(b'"keyData"')[0]  # no whitespace between tokens
    keys = list(orjson.loads(reply.body)["compute"])
    assert keys == sorted(keys)


def test_memo_is_bounded_against_unique_junk() -> None:
    snapshot = build_snapshot(sample_vm(), generation=1)
    for i in range(MAX_MEMO_ENTRIES + 500):
        resolve(snapshot, b"GET", f"/metadata/instance?{V}&junk={i}".encode(), True, False)
    assert len(snapshot.url_replies) == MAX_MEMO_ENTRIES
    # Past the bound the answers are still right, just not remembered.
    status, body, _ = get(snapshot, f"/metadata/instance/compute/vmId?{V}&format=text&junk=x")
    assert (status, body) == (200, COMPUTE["vmId"])


def test_memo_never_serves_a_reply_decided_by_headers() -> None:
    snapshot = build_snapshot(sample_vm(), generation=1)
    target = f"/metadata/instance?{V}"
    assert get(snapshot, target)[0] == 200
    assert get(snapshot, target, metadata_ok=False)[0] == 400
    assert get(snapshot, target, forwarded=True)[0] == 400
    assert get(snapshot, target, method="POST")[0] == 405


# ---- purity: an approval is returned as an effect, never recorded here ----


def test_an_approval_is_returned_as_an_effect_and_nothing_is_called_or_written(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ast
    import dataclasses
    from pathlib import Path

    from fastimds.imds import events, routing
    from fastimds.imds.effects import Approval

    monkeypatch.chdir(tmp_path)  # anything written to a relative path would land here
    event = events.make_event({"EventType": "Reboot", "EventId": "E1"}, 2_000_000_000.0, ["vm-name"])
    snapshot = build_snapshot(dataclasses.replace(sample_vm(), scheduled=events.add(None, event)), 1)
    target = b"/metadata/scheduledevents?api-version=2020-07-01"
    body = b'{"StartRequests":[{"EventId":"E1"}]}'

    replies = [resolve(snapshot, b"POST", target, True, False, body=body) for _ in range(2)]

    for reply in replies:
        assert isinstance(reply, Approval) and reply.event_ids == frozenset({"E1"})
        assert (reply.status, reply.body, reply.volatile) == (200, b"", True)  # answered, never remembered
    assert list(tmp_path.iterdir()) == []
    assert target not in snapshot.url_replies
    # The decision layer has no sink to reach: it imports nothing from the bus (or above imds).
    imported = {
        node.module
        for node in ast.walk(ast.parse(Path(routing.__file__).read_text()))
        if isinstance(node, ast.ImportFrom) and node.module is not None
    }
    assert all(name.partition(".")[0] != "fastimds" or name.split(".")[1] in ("imds", "config") for name in imported)


# ---- approvals (issue 16, Medium 3) ----

_EVENTS_NOW = 2_000_000_000.0
_LATER_EVENT = {"EventType": "Reboot", "NotBeforeSeconds": 900}


def test_routing_answers_an_approval_of_started_events_with_no_effect() -> None:
    made = [events.make_event({**_LATER_EVENT, "EventId": i}, _EVENTS_NOW, ["n"], ["default"]) for i in ("E1", "E2")]
    state = events.add(events.add(None, made[0]), made[1])
    started = events.approve(state, frozenset({"E2"}), _EVENTS_NOW)
    snapshot = build_snapshot(replace(sample_vm(), scheduled=started), 1)
    target = b"/metadata/scheduledevents?api-version=2020-07-01"

    def post(body: bytes) -> Any:
        return resolve(snapshot, b"POST", target, True, False, body=body)

    only_started = post(b'{"StartRequests":[{"EventId":"E2"}]}')
    assert type(only_started) is not Approval and only_started is events.APPROVED  # 200, nothing to record
    mixed = post(b'{"StartRequests":[{"EventId":"E1"},{"EventId":"E2"}]}')
    assert type(mixed) is Approval and mixed.event_ids == frozenset({"E1"}) and mixed.status == 200

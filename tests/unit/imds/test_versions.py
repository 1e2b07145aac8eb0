"""api-versions as a client meets them (docs/azure-imds.md, §4 and the differences table).

What /metadata/versions lists is served; the 2017-03-01 preview answers in its
own shape; the bare /metadata answers the api-version 400; and every endpoint's
400 for a bad version lists versions that endpoint itself accepts.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from fastimds.imds import events
from fastimds.imds.preview import preview_document
from fastimds.imds.routing import resolve
from fastimds.imds.snapshot import Snapshot, build_snapshot
from fastimds.imds.versions import API_VERSIONS, PREVIEW_VERSION, SCHEDULED_EVENTS_VERSIONS
from tests.support.fakes import KEYS, sample_vm

SAMPLE = sample_vm().instance
NOW = 2_000_000_000.0


@pytest.fixture(scope="module")
def snapshot() -> Snapshot:
    return build_snapshot(sample_vm(), generation=1)


def get(snapshot: Snapshot, target: str, method: str = "GET") -> tuple[int, Any, bytes]:
    reply = resolve(snapshot, method.encode(), target.encode(), True, False, keys=KEYS)
    body: Any = orjson.loads(reply.body) if b"application/json" in reply.head else reply.body.decode()
    return reply.status, body, reply.head


# ---- item: what /metadata/versions lists, /metadata/instance serves ----


def test_every_listed_version_answers_the_instance_endpoint(snapshot: Snapshot) -> None:
    listed = get(snapshot, "/metadata/versions")[1]["apiVersions"]
    assert listed[0] == PREVIEW_VERSION
    for version in listed:
        status, body, _ = get(snapshot, f"/metadata/instance?api-version={version}")
        assert status == 200, version
        assert body["compute"]["vmId"] == SAMPLE["compute"]["vmId"]


def test_the_preview_document_names_network_keys_as_the_preview_did(snapshot: Snapshot) -> None:
    status, body, head = get(snapshot, "/metadata/instance?api-version=2017-03-01")
    assert status == 200 and b"application/json" in head  # JSON by default, as the 2017 preview doc says
    assert body["compute"] == get(snapshot, "/metadata/instance/compute?api-version=2017-04-02")[1]
    first, second = body["network"]["interface"]
    assert sorted(first) == ["ipv4", "ipv6", "mac"]
    assert first["mac"] == "6045BD8E1A2B"
    assert first["ipv4"]["ipaddress"] == [
        {"ipaddress": "10.0.0.4", "publicip": "20.61.15.7"},
        {"ipaddress": "10.0.0.5", "publicip": ""},
    ]
    assert first["ipv4"]["subnet"] == [{"address": "10.0.0.0", "dnsservers": [], "prefix": "24"}]
    assert first["ipv6"] == {"ipaddress": [{"ipaddress": "fd00:10::4"}]}
    assert second["ipv6"] == {"ipaddress": []}
    # The GA shape is untouched by the preview's (they share the snapshot).
    assert get(snapshot, "/metadata/instance/network?api-version=2017-04-02")[1] == SAMPLE["network"]
    assert get(snapshot, "/metadata/instance?api-version=2017-03-01&format=text")[1] == "compute/\nnetwork/"


def test_preview_shaping_copies_and_keeps_what_it_does_not_rename() -> None:
    document = copy.deepcopy({"compute": SAMPLE["compute"], "network": SAMPLE["network"], "mine": {"a": "1"}})
    document["network"]["interface"][0]["ipv4"]["subnet"][0]["dnsservers"] = [{"ipaddress": "10.0.0.2"}]
    document["network"]["interface"][0]["extra"] = "x"
    before = copy.deepcopy(document)
    shaped = preview_document(document)
    assert document == before  # the input is not changed
    assert shaped["mine"] == {"a": "1"} and shaped["compute"] is document["compute"]
    interface = shaped["network"]["interface"][0]
    assert interface["extra"] == "x"
    assert interface["ipv4"]["subnet"][0]["dnsservers"] == [{"ipaddress": "10.0.0.2"}]  # a subnet's own are kept


def test_scheduled_events_at_the_preview_put_an_underscore_before_resource_names() -> None:
    event = events.make_event({"EventType": "Reboot", "EventId": "E1", "Resources": ["vm1", "vm2"]}, NOW, ["n"])
    state: events.EventsState = {"DocumentIncarnation": 2, "Events": [event]}
    assert PREVIEW_VERSION in SCHEDULED_EVENTS_VERSIONS
    preview = events.document_at(state, PREVIEW_VERSION)["Events"][0]
    assert preview["Resources"] == ["_vm1", "_vm2"]
    assert sorted(preview) == sorted(["EventId", "EventStatus", "EventType", "ResourceType", "Resources", "NotBefore"])
    assert events.document_at(state, "2017-08-01")["Events"][0]["Resources"] == ["vm1", "vm2"]
    assert state["Events"][0]["Resources"] == ["vm1", "vm2"]  # the stored state is not changed


# ---- item: the bare /metadata ----


def test_the_bare_root_answers_the_api_version_400_with_the_newest_of_all(snapshot: Snapshot) -> None:
    for target in ("/metadata", "/metadata/", "/Metadata"):
        status, body, _ = get(snapshot, target)
        assert status == 400, target
        assert body["newest-versions"] == sorted(API_VERSIONS, reverse=True)[:3]
    status, body, head = get(snapshot, "/metadata", method="POST")
    assert status == 405 and b"Allow: GET, HEAD\r\n" in head


# ---- item: each endpoint's version 400 lists versions it accepts ----

ENDPOINTS = {
    "root": "/metadata?api-version={}&format=text",
    "instance": "/metadata/instance?api-version={}",
    "identity": "/metadata/identity/info?api-version={}",
    "attested": "/metadata/attested/document?api-version={}",
    "loadbalancer": "/metadata/loadbalancer?api-version={}",
    "scheduledevents": "/metadata/scheduledevents?api-version={}",
}
# Versions some other category has, and junk: each endpoint refuses some of them.
CANDIDATES = ("", "latest", "2099-01-01", "2017-03-01", "2017-11-01", "2019-01-01", "2020-07-01", "2021-02-01")


def is_version_refusal(status: int, body: Any) -> bool:
    return status == 400 and isinstance(body, dict) and "newest-versions" in body


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_a_version_refusal_lists_versions_its_own_endpoint_accepts(snapshot: Snapshot, endpoint: str) -> None:
    template = ENDPOINTS[endpoint]
    refusals = []
    for candidate in CANDIDATES:
        status, body, _ = get(snapshot, template.format(candidate))
        if is_version_refusal(status, body):
            refusals.append(body)
    assert refusals, endpoint  # at least a missing version is refused
    for body in refusals:
        newest = body["newest-versions"]
        assert len(newest) == 3 and newest == sorted(newest, reverse=True)
        for version in newest:
            status, answer, _ = get(snapshot, template.format(version))
            assert not is_version_refusal(status, answer), (endpoint, version)


def test_scheduled_events_refuse_an_instance_only_version_listing_their_own() -> None:
    snapshot = build_snapshot(sample_vm(), generation=1)
    status, body, _ = get(snapshot, "/metadata/scheduledevents?api-version=2021-02-01")
    assert status == 400
    assert body["newest-versions"] == ["2020-07-01", "2019-08-01", "2019-04-01"]

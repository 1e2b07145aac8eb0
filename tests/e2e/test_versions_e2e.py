"""api-versions and typed extended values as `requests` sees them from a real server.

The rules without sockets are in tests/unit/imds/test_versions.py; the
decisions and their sources are in docs/azure-imds.md (the differences table).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.server_process import SAMPLE_VM_PATH, ServerProcess, running_server

JSON_TYPE = "application/json; charset=utf-8"
NEWEST_OF_ALL = ["2025-04-07", "2024-07-17", "2024-03-15"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    document: dict[str, Any] = json.loads(SAMPLE_VM_PATH.read_bytes())
    document["extended"] = {"compute": {"ppsType": "None", "hasCustomData": True}}
    document["scheduledEvents"] = [{"EventId": "E1", "EventType": "Reboot", "Resources": ["vm1"]}]
    data: Path = tmp_path_factory.mktemp("versions") / "vm.json"
    data.write_text(json.dumps(document))
    with running_server("--data", str(data)) as process:
        yield process


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as client:
        client.trust_env = False  # never route loopback through an environment proxy
        yield client


def imds(session: requests.Session, server: ServerProcess, target: str) -> requests.Response:
    return session.get(server.url(target), headers={"Metadata": "true"}, timeout=5)


def test_extended_values_reach_the_client_with_their_json_types(
    session: requests.Session, server: ServerProcess
) -> None:
    # cloud-init's request; it tests extended.compute.hasCustomData for truth.
    response = imds(session, server, "/metadata/instance?api-version=2021-08-01&extended=true")
    assert response.status_code == 200
    assert response.json()["extended"]["compute"]["hasCustomData"] is True
    assert b'"hasCustomData":true' in response.content


def test_every_version_versions_lists_is_served(session: requests.Session, server: ServerProcess) -> None:
    listed = imds(session, server, "/metadata/versions").json()["apiVersions"]
    assert listed[0] == "2017-03-01"
    for version in listed:
        response = imds(session, server, f"/metadata/instance?api-version={version}")
        assert response.status_code == 200, (version, response.text)
        assert response.headers["Content-Type"] == JSON_TYPE


def test_the_preview_answers_in_its_own_shape(session: requests.Session, server: ServerProcess) -> None:
    document = imds(session, server, "/metadata/instance?api-version=2017-03-01").json()
    interface = document["network"]["interface"][0]
    assert interface["mac"] == "6045BD8E1A2B"
    assert interface["ipv4"]["ipaddress"][0] == {"ipaddress": "10.0.0.4", "publicip": "20.61.15.7"}
    assert interface["ipv4"]["subnet"][0] == {"address": "10.0.0.0", "dnsservers": [], "prefix": "24"}
    # The preview doc's own example request.
    leaf = "/metadata/instance/network/interface/0/ipv4/ipaddress/0/publicip?api-version=2017-03-01&format=text"
    response = imds(session, server, leaf)
    assert (response.status_code, response.text) == (200, "20.61.15.7")
    # The preview's scheduled events: IaaS resource names with a leading "_" (gone from 2017-08-01 on).
    events = imds(session, server, "/metadata/scheduledevents?api-version=2017-03-01").json()["Events"]
    assert [event["Resources"] for event in events] == [["_vm1"]]
    events = imds(session, server, "/metadata/scheduledevents?api-version=2017-08-01").json()["Events"]
    assert [event["Resources"] for event in events] == [["vm1"]]


def test_the_bare_root_answers_like_a_real_vm(session: requests.Session, server: ServerProcess) -> None:
    # A real VM, 2025 (azure-compute-docs pull request 289): curl .../metadata -> the api-version 400.
    response = imds(session, server, "/metadata")
    assert response.status_code == 400
    assert response.headers["Content-Type"] == JSON_TYPE
    assert response.json()["newest-versions"] == NEWEST_OF_ALL
    listing = imds(session, server, "/metadata?api-version=2021-02-01&format=text")
    assert (listing.status_code, listing.text) == (200, "instance/")


@pytest.mark.parametrize(
    "endpoint",
    ["/metadata/scheduledevents", "/metadata/instance", "/metadata/attested/document", "/metadata"],
)
def test_retrying_with_newest_versions_0_is_answered(
    session: requests.Session, server: ServerProcess, endpoint: str
) -> None:
    # MSAL's recovery from the api-version 400: retry with newest-versions[0].
    for wrong in ("2021-02-01" if endpoint.endswith("scheduledevents") else "2020-07-01", ""):
        refused = imds(session, server, f"{endpoint}?api-version={wrong}")
        assert refused.status_code == 400
        newest = refused.json()["newest-versions"][0]
        suffix = "&format=text" if endpoint == "/metadata" else ""
        retried = imds(session, server, f"{endpoint}?api-version={newest}{suffix}")
        assert retried.status_code == 200, (endpoint, wrong, newest, retried.text)

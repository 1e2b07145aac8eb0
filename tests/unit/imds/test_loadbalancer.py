"""/metadata/loadbalancer: from the VM's "loadbalancer" section, ports as numbers (spec §10).

The section served by a real server is in tests/e2e/test_loadbalancer_e2e.py.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from fastimds.imds.datafile import DataError, parse_vm
from fastimds.imds.render import BAD_API_VERSION_MESSAGE
from fastimds.imds.routing import resolve
from fastimds.imds.snapshot import build_snapshot
from tests.support.fakes import sample_vm
from tests.support.loadbalancer import SECTION, document_with

LB = "/metadata/loadbalancer?api-version=2020-10-01"


def get(document: dict[str, Any], target: str, method: bytes = b"GET") -> tuple[int, Any]:
    snapshot = build_snapshot(parse_vm(orjson.dumps(document), "test"), 1)
    reply = resolve(snapshot, method, target.encode(), True, False)
    return reply.status, orjson.loads(reply.body) if reply.body else None


def test_the_documented_example_is_served_with_numeric_ports() -> None:
    status, body = get(document_with(SECTION), LB)
    assert status == 200
    assert body == {"loadbalancer": SECTION}
    assert body["loadbalancer"]["inboundRules"][0]["frontendPort"] == 80  # a number, not "80"


def test_missing_lists_are_served_empty_and_format_json_is_accepted() -> None:
    status, body = get(document_with({"outboundRules": SECTION["outboundRules"]}), LB + "&format=json")
    assert status == 200
    assert body["loadbalancer"] == {
        "publicIpAddresses": [],
        "inboundRules": [],
        "outboundRules": SECTION["outboundRules"],
    }


def test_a_vm_without_a_load_balancer_gets_the_documented_404() -> None:
    status, body = get(copy.deepcopy(sample_vm().document), LB)
    assert status == 404
    assert body["error"].startswith("No load balancer metadata is found.")


@pytest.mark.parametrize("target", ["/metadata/loadbalancer", "/metadata/loadbalancer?api-version=2020-09-01"])
def test_api_version_is_required_from_2020_10_01(target: str) -> None:
    status, body = get(document_with(SECTION), target)
    assert (status, body["error"]) == (400, BAD_API_VERSION_MESSAGE)
    assert get(document_with(SECTION), "/metadata/loadbalancer?api-version=2023-11-15")[0] == 200


def test_text_format_post_and_sub_paths_are_refused() -> None:
    assert get(document_with(SECTION), LB + "&format=text")[0] == 400
    assert get(document_with(SECTION), LB, method=b"POST")[0] == 405
    assert get(document_with(SECTION), "/metadata/loadbalancer/inboundRules?api-version=2020-10-01")[0] == 404


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ([], "$.loadbalancer: expected an object, got an array"),
        ({"inboundRules": {}}, "$.loadbalancer.inboundRules: expected an array, got an object"),
        ({"bogus": []}, "$.loadbalancer.bogus: unknown key"),
        (
            {"inboundRules": [{**SECTION["inboundRules"][0], "frontendPort": "80"}]},
            "$.loadbalancer.inboundRules[0].frontendPort: expected a number, got a string",
        ),
        (
            {"publicIpAddresses": [{"frontendIpAddress": "51.0.0.1"}]},
            "$.loadbalancer.publicIpAddresses[0].privateIpAddress: required key is missing",
        ),
    ],
)
def test_a_bad_section_is_refused_naming_the_problem(section: Any, problem: str) -> None:
    with pytest.raises(DataError) as caught:
        parse_vm(orjson.dumps(document_with(section)), "test")
    assert any(found.startswith(problem) for found in caught.value.problems), caught.value.problems

"""Managed identity tokens: the wire rules.

Real azure-identity and MSAL clients against a real server are in tests/e2e/test_identity_e2e.py.
"""

from __future__ import annotations

import copy
import os
import re
import time
import uuid
from typing import Any

import orjson
import pytest

from fastimds.imds import identity
from fastimds.imds.datafile import DataError, parse_vm
from fastimds.imds.routing import resolve
from fastimds.imds.snapshot import build_snapshot
from tests.support.fakes import KEYS
from tests.support.identities import IDENTITIES, SYSTEM, TENANT, UAMI, claims, document_with

TOKEN = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net"
NOT_FOUND = {"error": "invalid_request", "error_description": "Identity not found"}


def get(target: str, metadata_ok: bool = True, identities: Any = IDENTITIES) -> tuple[int, Any]:
    snapshot = build_snapshot(parse_vm(orjson.dumps(document_with(identities)), "t"), 1)
    reply = resolve(snapshot, b"GET", target.encode(), metadata_ok, False, keys=KEYS)
    return reply.status, orjson.loads(reply.body)


def test_a_token_for_the_system_assigned_identity() -> None:
    status, body = get(TOKEN)
    assert status == 200
    assert all(isinstance(value, str) for value in body.values())
    assert body["resource"] == "https://vault.azure.net" and body["token_type"] == "Bearer"
    assert body["client_id"] == SYSTEM["clientId"]
    assert int(body["expires_on"]) - int(body["not_before"]) == 86_400
    token = claims(body["access_token"])
    assert (token["aud"], token["oid"], token["appid"], token["tid"]) == (
        "https://vault.azure.net",
        SYSTEM["objectId"],
        SYSTEM["clientId"],
        TENANT,
    )


@pytest.mark.parametrize(
    "selector", [f"client_id={UAMI['clientId']}", f"object_id={UAMI['objectId']}", f"msi_res_id={UAMI['resourceId']}"]
)
def test_a_user_assigned_identity_by_each_selector(selector: str) -> None:
    status, body = get(f"{TOKEN}&{selector}")
    assert status == 200
    token = claims(body["access_token"])
    assert (token["oid"], token["xms_mirid"]) == (UAMI["objectId"], UAMI["resourceId"])


@pytest.mark.parametrize(
    ("target", "metadata_ok", "identities", "expected"),
    [
        (f"{TOKEN}&client_id=99999999-9999-4999-8999-999999999999", True, IDENTITIES, (400, NOT_FOUND)),
        (TOKEN, True, {"tenantId": TENANT, "userAssigned": [UAMI]}, (400, NOT_FOUND)),  # no system identity
        (TOKEN.split("&resource", maxsplit=1)[0], True, IDENTITIES, (400, "resource")),
        (f"{TOKEN}&client_id=a&object_id=b", True, IDENTITIES, (400, "Only one")),
        (TOKEN, False, IDENTITIES, (400, "Required metadata header not specified")),
        (TOKEN.replace("2018-02-01", "2017-12-01"), True, IDENTITIES, (400, "api-version")),
    ],
)
def test_refusals(target: str, metadata_ok: bool, identities: Any, expected: tuple[int, Any]) -> None:
    status, body = get(target, metadata_ok, identities)
    assert status == expected[0]
    if isinstance(expected[1], dict):
        assert body == expected[1]
    else:
        assert expected[1] in str(body)


@pytest.mark.parametrize("selector", ["msi_res_id=", "client_id=", "object_id=", "msi_res_id=%20"])
def test_an_empty_selector_is_identity_not_found(selector: str) -> None:
    # Regression (issue 16, item 10): `msi_res_id=` compared "" with the system identity's missing
    # resourceId and returned the system-assigned token. An empty selector names no identity.
    assert get(f"{TOKEN}&{selector}") == (400, NOT_FOUND)


def test_the_identity_family_missing_header_body() -> None:
    assert get(TOKEN, metadata_ok=False) == (
        400,
        {"error": "invalid_request", "error_description": "Required metadata header not specified"},
    )


def test_info_gives_the_tenant() -> None:
    assert get("/metadata/identity/info?api-version=2018-02-01") == (200, {"tenantId": TENANT})


def test_tokens_are_reused_until_near_expiry_and_never_memoised() -> None:
    snapshot = build_snapshot(parse_vm(orjson.dumps(document_with(IDENTITIES)), "t"), 1)
    first = resolve(snapshot, b"GET", TOKEN.encode(), True, False, keys=KEYS)
    second = resolve(snapshot, b"GET", TOKEN.encode(), True, False, keys=KEYS)
    assert orjson.loads(first.body)["access_token"] == orjson.loads(second.body)["access_token"]
    assert first is not second and snapshot.url_replies == {}


def test_vms_at_the_same_generation_never_share_a_token() -> None:
    # Regression: tokens were cached by (generation, client id, object id, resource); every VM's
    # first publish is generation 1, so a VM could get a token naming another VM's tenant or
    # resource id. They are now cached by every claim they sign.
    other = copy.deepcopy(document_with(IDENTITIES))
    other["identities"]["tenantId"] = "99999999-9999-4999-8999-999999999999"
    other["instance"]["compute"]["resourceId"] = "/subscriptions/s/resourceGroups/rg/providers/x/virtualMachines/b"
    tokens = []
    for document in (document_with(IDENTITIES), other, document_with(IDENTITIES)):
        snapshot = build_snapshot(parse_vm(orjson.dumps(document), "t"), 1)
        reply = resolve(snapshot, b"GET", TOKEN.encode(), True, False, keys=KEYS)
        tokens.append(claims(orjson.loads(reply.body)["access_token"]))
    assert [token["tid"] for token in tokens] == [TENANT, other["identities"]["tenantId"], TENANT]
    assert tokens[1]["xms_mirid"] == other["instance"]["compute"]["resourceId"] != tokens[0]["xms_mirid"]


@pytest.mark.parametrize(
    ("identities", "problem"),
    [
        ({"systemAssigned": SYSTEM}, "$.identities.tenantId: required"),
        ({"tenantId": TENANT, "userAssigned": [{"clientId": "x"}]}, "$.identities.userAssigned[0].objectId"),
        ({"tenantId": TENANT, "bogus": 1}, "$.identities.bogus: unknown key"),
    ],
)
def test_bad_identities_are_refused(identities: Any, problem: str) -> None:
    with pytest.raises(DataError) as caught:
        parse_vm(orjson.dumps(document_with(identities)), "t")
    assert any(found.startswith(problem) for found in caught.value.problems), caught.value.problems


def test_tokens_carry_the_claims_of_a_managed_identity_token() -> None:
    # From a token a VM's IMDS issued, decoded (spec §7): ver, idtyp, appidacr, and uti, a
    # random per-token id of 22 base64url characters.
    _, system = get(TOKEN)
    _, user = get(f"{TOKEN}&client_id={UAMI['clientId']}")
    first, second = claims(system["access_token"]), claims(user["access_token"])
    for token in (first, second):
        assert (token["ver"], token["idtyp"], token["appidacr"]) == ("1.0", "app", "2")
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", token["uti"])
    assert first["uti"] != second["uti"]


def test_ext_expires_in_stays_at_the_full_lifetime_while_expires_in_counts_down() -> None:
    vm = parse_vm(orjson.dumps(document_with(IDENTITIES)), "t")
    issuer = identity.TokenIssuer(KEYS.issuer.key)
    query = {"resource": "https://vault.azure.net"}
    minted_at = float(int(time.time()))
    fresh = orjson.loads(identity.token_reply(issuer, vm, query, minted_at).body)
    later = orjson.loads(identity.token_reply(issuer, vm, query, minted_at + 1000).body)
    assert later["access_token"] == fresh["access_token"]  # the cached token
    assert claims(later["access_token"])["uti"] == claims(fresh["access_token"])["uti"]
    assert (fresh["expires_in"], fresh["ext_expires_in"]) == ("86400", "86400")
    assert (later["expires_in"], later["ext_expires_in"]) == ("85400", "86400")


def test_every_token_reply_has_its_own_request_id() -> None:
    snapshot = build_snapshot(parse_vm(orjson.dumps(document_with(IDENTITIES)), "t"), 1)
    ids = set()
    for _ in range(3):  # one cached token, three replies
        reply = resolve(snapshot, b"GET", TOKEN.encode(), True, False, keys=KEYS)
        found = re.search(rb"\r\nx-ms-request-id: ([0-9a-f-]{36})\r\n", reply.head)
        assert found, reply.head
        assert uuid.UUID(found.group(1).decode()).version == 4
        ids.add(found.group(1))
    assert len(ids) == 3


def test_a_forked_worker_never_repeats_its_parents_request_ids() -> None:
    # Workers are forked from one process; the random module reseeds in a child, so ids differ.
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only writes its id and leaves
        os.write(write_end, identity.request_id_header())
        os._exit(0)
    os.close(write_end)
    mine = identity.request_id_header()
    with os.fdopen(read_end, "rb") as pipe:
        theirs = pipe.read()
    os.waitpid(child, 0)
    assert theirs.startswith(b"x-ms-request-id: ") and theirs != mine

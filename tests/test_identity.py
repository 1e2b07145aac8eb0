"""Managed identity tokens: the wire rules, and real azure-identity and MSAL clients, unmodified."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any
from unittest import mock

import jwt
import orjson
import pytest
import requests

from fastimds.imds.datafile import DataError, parse_vm
from fastimds.imds.routing import resolve
from fastimds.imds.snapshot import build_snapshot
from tests.fakes import KEYS, sample_vm
from tests.server_process import admin_unix, running_server

TENANT = "abd8daee-d393-4239-9377-883adda3d40f"
SYSTEM = {"clientId": "0d46c104-a85f-49e2-9c96-ae58c6fa927b", "objectId": "11111111-1111-4111-8111-111111111111"}
UAMI = {
    "clientId": "22222222-2222-4222-8222-222222222222",
    "objectId": "33333333-3333-4333-8333-333333333333",
    "resourceId": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app",
}
IDENTITIES = {"tenantId": TENANT, "systemAssigned": SYSTEM, "userAssigned": [UAMI]}
TOKEN = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net"
NOT_FOUND = {"error": "invalid_request", "error_description": "Identity not found"}


def document_with(identities: Any) -> dict[str, Any]:
    document = copy.deepcopy(sample_vm().document)
    document["identities"] = identities
    return document


def get(target: str, metadata_ok: bool = True, identities: Any = IDENTITIES) -> tuple[int, Any]:
    snapshot = build_snapshot(parse_vm(orjson.dumps(document_with(identities)), "t"), 1)
    reply = resolve(snapshot, b"GET", target.encode(), metadata_ok, False, keys=KEYS)
    return reply.status, orjson.loads(reply.body)


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


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


@pytest.fixture
def identity_server(tmp_path: Path) -> Any:
    data = tmp_path / "vm.json"
    data.write_bytes(orjson.dumps(document_with(IDENTITIES)))
    with running_server("--data", str(data), "--admin-socket", str(tmp_path / "a.sock")) as server:
        yield server, tmp_path / "a.sock"


def test_azure_identity_gets_tokens_and_reports_unknown_identities(identity_server: Any) -> None:
    from azure.identity import CredentialUnavailableError, ManagedIdentityCredential

    server, socket_path = identity_server
    with mock.patch.dict(os.environ, {"AZURE_POD_IDENTITY_AUTHORITY_HOST": server.base_url}):
        system = ManagedIdentityCredential().get_token("https://vault.azure.net/.default")
        user = ManagedIdentityCredential(client_id=UAMI["clientId"]).get_token("https://storage.azure.com/.default")
        with pytest.raises(CredentialUnavailableError):
            ManagedIdentityCredential(client_id="99999999-9999-4999-8999-999999999999").get_token(
                "https://vault.azure.net/.default"
            )
    status, jwks = admin_unix(socket_path, "GET", "/jwks")
    assert status == 200
    key = jwt.PyJWK(jwks["keys"][0]).key
    verified = jwt.decode(system.token, key, algorithms=["RS256"], audience="https://vault.azure.net")
    assert verified["oid"] == SYSTEM["objectId"]
    verified = jwt.decode(user.token, key, algorithms=["RS256"], audience="https://storage.azure.com")
    assert verified["oid"] == UAMI["objectId"]
    assert system.expires_on > 0


def test_msal_gets_tokens_and_reports_unknown_identities(identity_server: Any) -> None:
    import msal

    server, _ = identity_server
    with (
        mock.patch.dict(os.environ, {"AZURE_POD_IDENTITY_AUTHORITY_HOST": server.base_url}),
        requests.Session() as session,
    ):
        system = msal.ManagedIdentityClient(msal.SystemAssignedManagedIdentity(), http_client=session)
        result = system.acquire_token_for_client(resource="https://vault.azure.net")
        assert "access_token" in result, result
        assert claims(result["access_token"])["oid"] == SYSTEM["objectId"]
        user = msal.ManagedIdentityClient(
            msal.UserAssignedManagedIdentity(client_id=UAMI["clientId"]), http_client=session
        )
        assert (
            claims(user.acquire_token_for_client(resource="https://vault.azure.net")["access_token"])["oid"]
            == (UAMI["objectId"])
        )
        unknown = msal.ManagedIdentityClient(
            msal.UserAssignedManagedIdentity(client_id="99999999-9999-4999-8999-999999999999"), http_client=session
        )
        failed = unknown.acquire_token_for_client(resource="https://vault.azure.net")
        assert "access_token" not in failed
        assert failed.get("error") == "invalid_request" and "Identity not found" in failed.get("error_description", "")

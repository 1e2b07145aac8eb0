"""Managed identity tokens from a real server, through real azure-identity and MSAL clients, unmodified.

The wire rules, without sockets, are in tests/unit/imds/test_identity.py.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import jwt
import orjson
import pytest
import requests

from tests.support.identities import IDENTITIES, SYSTEM, UAMI, claims, document_with
from tests.support.server_process import admin_unix, running_server


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


def test_tokens_carry_azures_claims_and_every_reply_its_own_request_id(tmp_path: Path) -> None:
    from azure.identity import ManagedIdentityCredential

    data = tmp_path / "vm.json"
    data.write_bytes(orjson.dumps(document_with(IDENTITIES)))
    socket_path = tmp_path / "a.sock"
    with running_server("--data", str(data), "--admin-socket", str(socket_path), "--workers", "2") as server:
        with mock.patch.dict(os.environ, {"AZURE_POD_IDENTITY_AUTHORITY_HOST": server.base_url}):
            token = ManagedIdentityCredential().get_token("https://vault.azure.net/.default").token
        status, jwks = admin_unix(socket_path, "GET", "/jwks")
        assert status == 200
        verified = jwt.decode(
            token, jwt.PyJWK(jwks["keys"][0]).key, algorithms=["RS256"], audience="https://vault.azure.net"
        )
        assert (verified["ver"], verified["idtyp"], verified["appidacr"]) == ("1.0", "app", "2")
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", verified["uti"])
        request_ids, tokens = set(), {token}
        for _ in range(20):  # a new connection each: both workers answer, each from its cached token
            reply = requests.get(
                server.url("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net"),
                headers={"Metadata": "true", "Connection": "close"},
                timeout=10,
            )
            assert reply.status_code == 200
            tokens.add(reply.json()["access_token"])
            assert reply.json()["ext_expires_in"] == "86400"
            assert uuid.UUID(reply.headers["x-ms-request-id"]).version == 4
            request_ids.add(reply.headers["x-ms-request-id"])
        assert len(request_ids) == 20
        assert len(tokens) <= 2  # a token per worker (each mints its own), reused for every reply

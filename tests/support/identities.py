"""Managed identities for test VM documents: a tenant, one system-assigned and one user-assigned identity.

Rules of this module: plain data, valid by the data file's rules (ids are
GUIDs, the resource id is an ARM path); tests copy before they change it.
Tokens are read here without checking signatures: a test that checks one
fetches the key from the server's /jwks.
"""

from __future__ import annotations

import copy
from typing import Any

import jwt

from tests.support.fakes import sample_vm

TENANT = "abd8daee-d393-4239-9377-883adda3d40f"
SYSTEM = {"clientId": "0d46c104-a85f-49e2-9c96-ae58c6fa927b", "objectId": "11111111-1111-4111-8111-111111111111"}
UAMI = {
    "clientId": "22222222-2222-4222-8222-222222222222",
    "objectId": "33333333-3333-4333-8333-333333333333",
    "resourceId": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app",
}
IDENTITIES = {"tenantId": TENANT, "systemAssigned": SYSTEM, "userAssigned": [UAMI]}


def document_with(identities: Any) -> dict[str, Any]:
    """The sample VM's document with its "identities" section replaced (a copy)."""
    document = copy.deepcopy(sample_vm().document)
    document["identities"] = identities
    return document


def claims(token: str) -> dict[str, Any]:
    """A token's claims, signature unchecked."""
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded

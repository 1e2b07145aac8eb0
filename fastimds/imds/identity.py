"""Managed identity: /metadata/identity/oauth2/token and /metadata/identity/info (spec §7).

Rules of this module:
- A VM's identities come from its description's optional "identities"
  section: {"tenantId", "systemAssigned": {"clientId", "objectId"},
  "userAssigned": [{"clientId", "objectId", "resourceId"}]}.
- A token request names its identity by at most one of client_id, object_id
  or msi_res_id; none means the system-assigned identity, and an empty one
  (`msi_res_id=`) names no identity: "Identity not found". `resource` is
  required. Errors use the identity family's shape, {"error",
  "error_description"}: "Identity not found" for an identity the VM does
  not have, as Azure answers and as azure-identity and MSAL recognise.
- Tokens are real JWTs, RS256, signed with a key made at start (or given);
  `aud` is the resource, with oid, appid, tid, sub and xms_mirid claims,
  and the claims every managed-identity token carries (spec §7): ver "1.0",
  idtyp "app", appidacr "2", and uti, a random id per token (22 base64url
  characters, 16 random bytes). The public key is published as a JWKS on
  the admin listener (/jwks), so a test service can validate them.
- A token is minted once per set of claims (identity, tenant, resource,
  xms_mirid: never per VM or generation alone, which VMs share) and reused
  until REMINT_BEFORE_S before it expires; every reply is rendered at
  request time (expires_in counts down; ext_expires_in stays at the full
  lifetime, as Azure's replies show) and is volatile: never memoised.
- Every value in a token reply is a string, `resource` always present.
- Every token reply carries its own `x-ms-request-id` (a random version-4
  GUID), as Azure's replies do: made here, with the reply, which is
  rendered per request anyway; the memo path never sees a token reply.
- A token not in the cache costs a fresh signature, charged to the VM's
  signing budget (fastimds.imds.signing) when one is given; past it the
  request gets the identity family's 429 (ERRORS["signing_budget"], the
  same bytes as the throttle's ERRORS["throttled"]), and nothing is signed.
  A cached token costs nothing.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from random import getrandbits
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from fastimds.imds.render import RETRY_AFTER_1, THROTTLED_MESSAGE, Reply, json_reply
from fastimds.imds.signing import SigningBudget

# Managed identity tokens live about a day (Azure's `expires_in` ≈ 86,300).
TOKEN_LIFETIME_S = 86_400
# A cached token is replaced when it has less than this left.
REMINT_BEFORE_S = 300
MAX_CACHED_TOKENS = 4096

SELECTORS = ("client_id", "object_id", "msi_res_id")

# Claims every managed-identity token carries, whoever it is for (spec §7: a token
# from a VM's IMDS, decoded): a v1 token, issued to an app, whose client
# authenticated with a certificate (appidacr "2").
MANAGED_IDENTITY_CLAIMS = {"ver": "1.0", "idtyp": "app", "appidacr": "2"}
# Random bytes in a token's `uti` (Entra's are 22 base64url characters: 16 bytes).
UTI_BYTES = 16

# A version-4 GUID's fixed bits (version 4, RFC 4122 variant) over 128 random ones.
_GUID_FIXED_BITS = (0x4 << 76) | (0x8 << 60)
_GUID_RANDOM_BITS = ~((0xF << 76) | (0xC << 60)) & ((1 << 128) - 1)


def request_id_header() -> bytes:
    """`x-ms-request-id: <random version-4 GUID>`, for one reply.

    random.getrandbits, not uuid4: a request id is a correlation id, not a
    secret, and this costs ~0.8 µs against uuid4's ~3 µs (its urandom
    syscall), timeit on the dev box. The random module reseeds itself in a
    forked child, so workers never repeat each other's ids.
    """
    digits = b"%032x" % ((getrandbits(128) & _GUID_RANDOM_BITS) | _GUID_FIXED_BITS)
    groups = (digits[:8], digits[8:12], digits[12:16], digits[16:20], digits[20:])
    return b"x-ms-request-id: %s-%s-%s-%s-%s\r\n" % groups


def identity_error(description: str, error: str = "invalid_request", status: int = 400) -> Reply:
    return json_reply(status, {"error": error, "error_description": description})


ERRORS: dict[str, Reply] = {
    "missing_header": identity_error("Required metadata header not specified"),
    "not_found": identity_error("Identity not found"),
    "no_resource": identity_error("Required query variable 'resource' is missing"),
    "several_selectors": identity_error("Only one of client_id, object_id or msi_res_id may be given"),
    # One 429 body for the family (the shape azure-identity and MSAL parse), counted apart by its cause.
    "throttled": json_reply(
        429,
        {"error": "throttled", "error_description": THROTTLED_MESSAGE},
        extra_headers=RETRY_AFTER_1,
        reject="throttled",
    ),
    # Volatile: it depends on the clock (the budget refills), so no URL cache or memo may keep it.
    "signing_budget": json_reply(
        429,
        {"error": "throttled", "error_description": THROTTLED_MESSAGE},
        extra_headers=RETRY_AFTER_1,
        reject="signing_budget",
        volatile=True,
    ),
}


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class TokenIssuer:
    def __init__(self, key: rsa.RSAPrivateKey | None = None) -> None:
        self.key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        numbers = self.key.public_key().public_numbers()
        self.kid = uuid.uuid5(uuid.NAMESPACE_OID, str(numbers.n)).hex
        self.jwks = {
            "keys": [
                {
                    "kty": "RSA",
                    "use": "sig",
                    "alg": "RS256",
                    "kid": self.kid,
                    "n": _b64url_uint(numbers.n),
                    "e": _b64url_uint(numbers.e),
                }
            ]
        }
        self._tokens: dict[tuple[Any, ...], tuple[str, int, int]] = {}  # -> (token, not_before, expires_on)

    def token(
        self, key: tuple[Any, ...], claims: dict[str, Any], now: float, budget: SigningBudget | None = None
    ) -> tuple[str, int, int] | None:
        """The token for these claims: cached, or signed now (None: `budget` has no signature left)."""
        second = int(now)
        cached = self._tokens.get(key)
        if cached is not None and cached[2] - second > REMINT_BEFORE_S:
            return cached
        if budget is not None and not budget.take(now):
            return None
        expires_on = second + TOKEN_LIFETIME_S
        uti = secrets.token_urlsafe(UTI_BYTES)  # per mint: every reply of a cached token shows the same one
        payload = {**claims, "iat": second, "nbf": second, "exp": expires_on, "uti": uti}
        token = jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": self.kid})
        if len(self._tokens) >= MAX_CACHED_TOKENS:
            self._tokens.clear()
        self._tokens[key] = minted = (token, second, expires_on)
        return minted


def find_identity(section: dict[str, Any], query: dict[str, str]) -> dict[str, Any] | None:
    """The identity a token request selects (by client_id, object_id or msi_res_id; else system-assigned)."""
    system = section.get("systemAssigned")
    candidates = [*section.get("userAssigned", []), *([system] if isinstance(system, dict) else [])]
    for selector, field in (("client_id", "clientId"), ("object_id", "objectId"), ("msi_res_id", "resourceId")):
        if selector in query:
            wanted = query[selector].lower()  # GUIDs and ARM ids compare without case
            if not wanted:  # `msi_res_id=` names no identity (it once matched one without a resourceId)
                return None
            return next((i for i in candidates if str(i.get(field, "")).lower() == wanted), None)
    return system if isinstance(system, dict) else None


def token_reply(
    issuer: TokenIssuer, vm: Any, query: dict[str, str], now: float, budget: SigningBudget | None = None
) -> Reply:
    section = vm.reserved.get("identities") or {}
    if sum(selector in query for selector in SELECTORS) > 1:
        return ERRORS["several_selectors"]
    resource = query.get("resource")
    if not resource:
        return ERRORS["no_resource"]
    identity = find_identity(section, query)
    if identity is None:
        return ERRORS["not_found"]
    tenant = str(section.get("tenantId", ""))
    object_id = str(identity.get("objectId", ""))
    client_id = str(identity.get("clientId", ""))
    mirid = str(identity.get("resourceId") or vm.instance.get("compute", {}).get("resourceId", ""))
    claims = {
        "aud": resource,
        "iss": f"https://sts.windows.net/{tenant}/",
        "oid": object_id,
        "sub": object_id,
        "appid": client_id,
        "tid": tenant,
        "xms_mirid": mirid,
        **MANAGED_IDENTITY_CLAIMS,
    }
    second = int(now)
    # Keyed by every claim it signs: two VMs (or two versions of one) share a token only if it says the same.
    minted = issuer.token(tuple(sorted(claims.items())), claims, now, budget)
    if minted is None:
        return ERRORS["signing_budget"]
    token, not_before, expires_on = minted
    return json_reply(
        200,
        {
            "access_token": token,
            "client_id": client_id,
            "expires_in": str(expires_on - second),
            "expires_on": str(expires_on),
            "ext_expires_in": str(expires_on - not_before),  # the full lifetime, while expires_in counts down
            "not_before": str(not_before),
            "resource": resource,
            "token_type": "Bearer",
        },
        extra_headers=request_id_header(),
        volatile=True,
    )


def info_reply(vm: Any) -> Reply:
    section = vm.reserved.get("identities") or {}
    if "tenantId" not in section:
        return ERRORS["not_found"]
    return json_reply(200, {"tenantId": str(section["tenantId"])})

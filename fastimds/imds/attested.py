"""The attested document: a PKCS#7 SignedData over the VM's identity (spec §9).

Rules of this module:
- `/metadata/attested/document` answers {"encoding":"pkcs7","signature":
  base64(DER)}: a CMS SignedData with the content attached, digest SHA-256,
  signed by this server's certificate and key (given with --attested-cert
  and --attested-key, or a self-signed pair made at start). Clients that
  verify with `openssl smime -verify -noverify` and compare the nonce, as
  Microsoft's samples do, accept it; clients that check the chain up to
  DigiCert rightly do not.
- The signer info carries no signed attributes (no authenticatedAttributes:
  the RSA signature is over the content's digest itself), as in Azure's
  production signatures and the docs' example (spec §9).
- The signed content is compact JSON with the fields of the requested
  api-version: nonce, plan, timeStamp {createdOn, expiresOn} (format
  "MM/DD/YY HH:MM:SS -0000") and vmId from 2018-10-01, subscriptionId from
  2019-04-30, sku from 2019-11-01, licenseType from 2020-09-01, always,
  "" when the VM has none (production signatures carry "licenseType":"").
- A document is valid for VALIDITY_S (6 hours, as every production capture
  shows).
- A nonce is 1 to 32 letters, digits, "-" or "_" (the Swagger's bound, and
  the base64url alphabet real clients send); anything else is a 400.
  Without one the document carries its own expiry, YYYYMMDD-HHMMSS (the
  expiresOn instant), as Azure's production documents do (spec §9).
- The reply depends on the clock and the nonce, so it is never memoised (a
  volatile Reply). Signing costs ~1 ms (RSA 2048): this endpoint is for
  provisioning, not for load; replies are kept in a bounded cache keyed by
  the signed content itself (which holds the VM's fields, the nonce and the
  second), never by generation: VMs share generation numbers, and one VM's
  document must never answer another's request. Because the key holds the
  second it was signed in, a cached document is reused only within that
  second, and no reply waits longer than faults.MAX_LATENCY_MS (a fault's
  injected latency) before it is sent: far inside VALIDITY_S, so no document
  is ever served past its expiry.
- A document not in the cache costs a fresh signature, charged to the VM's
  signing budget (fastimds.imds.signing) when one is given; past it the
  request gets the instance family's 429 (render's ERRORS["signing_budget"])
  and nothing is signed. A cached document costs nothing.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from fastimds.imds.render import ERRORS, Reply, json_body, make_reply
from fastimds.imds.signing import SigningBudget

# 1 to 32 (the Swagger's bound) letters, digits, "-" and "_": Teleport's Azure join sends
# 24 random bytes as unpadded base64url (32 characters) to real IMDS (spec §9).
NONCE_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")
# How long the signed document says it is valid: 6 hours, as in every production
# signature found (2018 docs capture, 2022 metadata.azure.com, 2023 metadata.azure.us;
# spec §9). The docs' 5 s and 45 s examples are from a test signer.
VALIDITY_S = 6 * 60 * 60
# The nonce Azure fills in when none is given: the expiresOn instant, in this format.
DEFAULT_NONCE_FORMAT = "%Y%m%d-%H%M%S"
STAMP_FORMAT = "%m/%d/%y %H:%M:%S -0000"
# Replies kept for reuse within their second, per signed content.
MAX_CACHED_DOCUMENTS = 1024

_PAST_BUDGET = ERRORS["signing_budget"]

_FIELDS_SINCE = (
    ("subscriptionId", "2019-04-30"),
    ("sku", "2019-11-01"),
    ("licenseType", "2020-09-01"),
)


class Attestor:
    """Signs attested documents with one certificate and key."""

    def __init__(self, key: rsa.RSAPrivateKey, certificate: x509.Certificate) -> None:
        self.key = key
        self.certificate = certificate
        self._cache: OrderedDict[bytes, Reply] = OrderedDict()  # signed content -> its reply

    @classmethod
    def self_signed(cls) -> Attestor:
        """A fresh RSA 2048 key and a certificate for it, valid for a year (made at start, ~50 ms)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastimds attested document signer")])
        now = dt.datetime.now(dt.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365))
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @classmethod
    def from_files(cls, certificate_path: Path, key_path: Path) -> Attestor:
        """A PEM certificate and its PEM RSA key; ValueError naming the problem."""
        try:
            certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the attested-document signer: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the attested-document key must be an RSA key")
        return cls(key, certificate)

    def reply(self, vm: Any, version: str, nonce: str | None, now: float, budget: SigningBudget | None = None) -> Reply:
        """The signed document for one request (from the cache when this content was signed before).

        A 429 instead when it is not cached and `budget` has no signature left.
        """
        content = signed_content(vm, version, nonce, int(now))
        reply = self._cache.get(content)
        if reply is None:
            if budget is not None and not budget.take(now):
                return _PAST_BUDGET
            signature = (
                pkcs7.PKCS7SignatureBuilder()
                .set_data(content)
                .add_signer(self.certificate, self.key, hashes.SHA256())
                # NoAttributes: no signed attributes, as Azure signs (spec §9).
                .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoAttributes])
            )
            body = json_body({"encoding": "pkcs7", "signature": base64.b64encode(signature).decode()})
            reply = make_reply(200, body, volatile=True)
            self._cache[content] = reply
            while len(self._cache) > MAX_CACHED_DOCUMENTS:
                self._cache.popitem(last=False)
        return reply


def signed_content(vm: Any, version: str, nonce: str | None, now: int) -> bytes:
    """The JSON the signature covers, with the fields of `version`."""
    compute = vm.instance.get("compute", {})
    plan = compute.get("plan", {}) if isinstance(compute.get("plan"), dict) else {}
    created = dt.datetime.fromtimestamp(now, dt.UTC)
    expires = created + dt.timedelta(seconds=VALIDITY_S)
    content: dict[str, Any] = {
        "nonce": nonce if nonce is not None else expires.strftime(DEFAULT_NONCE_FORMAT),
        "plan": {key: str(plan.get(key, "")) for key in ("name", "product", "publisher")},
        "timeStamp": {"createdOn": created.strftime(STAMP_FORMAT), "expiresOn": expires.strftime(STAMP_FORMAT)},
        "vmId": str(compute.get("vmId", "")),
    }
    for field, since in _FIELDS_SINCE:
        if version >= since:
            content[field] = str(compute.get(field, ""))  # "" when the VM has none, as Azure signs it
    return json_body(content)

"""/metadata/attested/document from a real multi-worker server signing with a configured certificate.

The document's rules, without sockets, are in tests/unit/imds/test_attested.py.
"""

from __future__ import annotations

import base64
import calendar
import re
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from fastimds.imds.attested import Attestor
from tests.support.openssl import cms_structure, verified_content
from tests.support.server_process import fresh_get, running_server

DOCUMENT = "/metadata/attested/document?api-version=2021-02-01"


def test_a_configured_certificate_signs(tmp_path: Path) -> None:
    made = Attestor.self_signed()
    cert = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    cert.write_bytes(made.certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        made.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with running_server("--attested-cert", str(cert), "--attested-key", str(key), "--workers", "2") as server:
        signatures = set()
        for _ in range(6):  # any worker: one signer for all
            status, body = fresh_get(server.port, DOCUMENT + "&nonce=abcde12345")
            assert status == 200
            payload = orjson.loads(body)
            content = verified_content(payload["signature"], tmp_path)
            assert content["nonce"] == "abcde12345"
            signatures.add(payload["signature"])
        signer = tmp_path / "signer.pem"
        der = tmp_path / "signature.der"
        der.write_bytes(base64.b64decode(signatures.pop()))
        subprocess.run(
            ["openssl", "pkcs7", "-inform", "DER", "-in", str(der), "-print_certs", "-out", str(signer)],
            check=True,
            timeout=30,
            capture_output=True,
        )
        assert made.certificate.public_bytes(serialization.Encoding.PEM) in signer.read_bytes()


@pytest.mark.parametrize("command", ["smime", "cms"])
def test_a_document_without_a_nonce_is_shaped_as_azure_signs_it(tmp_path: Path, command: str) -> None:
    # Production documents (spec §9): six hours valid, the expiry as the default nonce,
    # "licenseType":"" when the VM has none, and no signed attributes in the signature.
    with running_server() as server:
        before = int(time.time())
        status, body = fresh_get(server.port, "/metadata/attested/document?api-version=2020-09-01")
        after = int(time.time())
    assert status == 200
    signature = orjson.loads(body)["signature"]
    content = verified_content(signature, tmp_path, command)
    assert content["licenseType"] == ""
    stamps = content["timeStamp"]
    created = calendar.timegm(time.strptime(stamps["createdOn"], "%m/%d/%y %H:%M:%S -0000"))
    expires = calendar.timegm(time.strptime(stamps["expiresOn"], "%m/%d/%y %H:%M:%S -0000"))
    assert before <= created <= after
    assert expires - created == 6 * 3600
    assert content["nonce"] == time.strftime("%Y%m%d-%H%M%S", time.gmtime(expires))
    assert re.search(r"^ *signedAttrs:\s*<ABSENT>", cms_structure(signature, tmp_path), re.MULTILINE)

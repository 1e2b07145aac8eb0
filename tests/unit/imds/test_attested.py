"""/metadata/attested/document: a PKCS#7 SignedData that openssl verifies, as Microsoft's samples do.

A configured certificate signing in a real multi-worker server is in tests/e2e/test_attested_e2e.py.
"""

from __future__ import annotations

import calendar
import copy
import json
import re
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastimds.imds.attested import VALIDITY_S, Attestor, signed_content
from fastimds.imds.datafile import parse_vm
from fastimds.imds.faults import MAX_LATENCY_MS
from fastimds.imds.render import BAD_API_VERSION_MESSAGE
from fastimds.imds.routing import resolve
from fastimds.imds.snapshot import build_snapshot
from tests.support.fakes import KEYS, sample_vm
from tests.support.openssl import cms_structure, verified_content
from tests.support.server_process import vm_document, vm_uuid

DOCUMENT = "/metadata/attested/document?api-version=2021-02-01"
VM_ID = sample_vm().instance["compute"]["vmId"]


def get(target: str) -> tuple[int, Any]:
    snapshot = build_snapshot(sample_vm(), 1)
    reply = resolve(snapshot, b"GET", target.encode(), True, False, keys=KEYS)
    return reply.status, orjson.loads(reply.body)


def test_the_signature_verifies_and_carries_the_nonce_and_vm(tmp_path: Path) -> None:
    status, body = get(DOCUMENT + "&nonce=1234567890")
    assert status == 200
    assert body["encoding"] == "pkcs7"
    content = verified_content(body["signature"], tmp_path)
    assert content["nonce"] == "1234567890"
    assert content["vmId"] == VM_ID
    assert content["subscriptionId"] == sample_vm().instance["compute"]["subscriptionId"]
    assert content["sku"] == sample_vm().instance["compute"]["sku"]
    assert set(content["plan"]) == {"name", "product", "publisher"}
    assert content["licenseType"] == ""  # the sample has none: signed as "", as Azure does


def test_fields_follow_the_api_version(tmp_path: Path) -> None:
    document = copy.deepcopy(sample_vm().document)
    document["instance"]["compute"]["licenseType"] = "Windows_Server"
    vm = parse_vm(orjson.dumps(document), "t")
    now = int(time.time())
    oldest = json.loads(signed_content(vm, "2018-10-01", "n1", now))
    assert set(oldest) == {"nonce", "plan", "timeStamp", "vmId"}
    assert "subscriptionId" in json.loads(signed_content(vm, "2019-04-30", "n1", now))
    assert "sku" not in json.loads(signed_content(vm, "2019-04-30", "n1", now))
    assert json.loads(signed_content(vm, "2020-09-01", "n1", now))["licenseType"] == "Windows_Server"


def test_without_a_nonce_the_expiry_is_the_nonce_and_the_stamps_are_azures_format(tmp_path: Path) -> None:
    now = int(time.time())
    content = json.loads(signed_content(sample_vm(), "2021-02-01", None, now))
    expires = now + 6 * 3600  # every production document is valid for six hours
    assert content["nonce"] == time.strftime("%Y%m%d-%H%M%S", time.gmtime(expires))
    assert content["timeStamp"] == {
        "createdOn": time.strftime("%m/%d/%y %H:%M:%S -0000", time.gmtime(now)),
        "expiresOn": time.strftime("%m/%d/%y %H:%M:%S -0000", time.gmtime(expires)),
    }


# The signed content of a production document (signer CN=metadata.azure.com, 2022-04-19, no
# nonce given), decoded from the signature in coder/coder's coderd/azureidentity/azureidentity_test.go.
PRODUCTION_CONTENT = (
    b'{"licenseType":"","nonce":"20220419-072721","plan":{"name":"","product":"","publisher":""},'
    b'"sku":"20_04-lts-gen2","subscriptionId":"5f130ffc-0a3e-4795-b691-4f56a12a5547",'
    b'"timeStamp":{"createdOn":"04/19/22 01:27:21 -0000","expiresOn":"04/19/22 07:27:21 -0000"},'
    b'"vmId":"bd8e7443-24a0-41f3-b949-8baf4fd1c573"}'
)


def test_the_content_matches_a_production_document_byte_for_byte() -> None:
    document = copy.deepcopy(sample_vm().document)
    compute = document["instance"]["compute"]
    compute.update(
        vmId="bd8e7443-24a0-41f3-b949-8baf4fd1c573",
        sku="20_04-lts-gen2",
        subscriptionId="5f130ffc-0a3e-4795-b691-4f56a12a5547",
        licenseType="",
        plan={"name": "", "product": "", "publisher": ""},
    )
    vm = parse_vm(orjson.dumps(document), "t")
    created = calendar.timegm((2022, 4, 19, 1, 27, 21, 0, 0, 0))
    assert signed_content(vm, "2021-02-01", None, created) == PRODUCTION_CONTENT


def test_the_signature_has_no_signed_attributes(tmp_path: Path) -> None:
    # Azure's production signatures and the docs' example carry none: the RSA signature is
    # over the content's digest itself (no authenticatedAttributes), which openssl verifies.
    _, body = get(DOCUMENT + "&nonce=noattributes")
    structure = cms_structure(body["signature"], tmp_path)
    assert re.search(r"^ *signedAttrs:\s*<ABSENT>", structure, re.MULTILINE), structure
    assert verified_content(body["signature"], tmp_path)["nonce"] == "noattributes"


def test_a_cached_document_is_never_served_past_its_expiry(tmp_path: Path) -> None:
    signer = Attestor.self_signed()
    vm = sample_vm()
    now = float(int(time.time()))
    first = signer.reply(vm, "2021-02-01", "1234", now)
    assert signer.reply(vm, "2021-02-01", "1234", now + 0.5) is first  # reused within its second
    later = signer.reply(vm, "2021-02-01", "1234", now + VALIDITY_S + 1)
    assert later is not first
    stamps = verified_content(orjson.loads(later.body)["signature"], tmp_path)["timeStamp"]
    assert stamps["createdOn"] == time.strftime("%m/%d/%y %H:%M:%S -0000", time.gmtime(now + VALIDITY_S + 1))
    # No reply waits longer than a fault's injected latency before it is sent: far inside the validity.
    assert MAX_LATENCY_MS / 1000 < VALIDITY_S / 10


@pytest.mark.parametrize("nonce", ["", "12345678901234567890123456789012x", "abc.def", "a%20b", "a%2Bb"])
def test_a_bad_nonce_is_400(nonce: str) -> None:
    status, body = get(DOCUMENT + f"&nonce={nonce}")
    assert status == 400
    assert "nonce" in body["error"]


def test_api_version_starts_at_2018_10_01() -> None:
    assert get("/metadata/attested/document?api-version=2018-04-02") == (
        400,
        {"error": BAD_API_VERSION_MESSAGE, "newest-versions": ["2025-04-07", "2024-07-17", "2024-03-15"]},
    )


def test_it_is_never_memoised() -> None:
    snapshot = build_snapshot(sample_vm(), 1)
    resolve(snapshot, b"GET", (DOCUMENT + "&nonce=abc").encode(), True, False, keys=KEYS)
    assert snapshot.url_replies == {}


def test_vms_at_the_same_generation_never_share_a_document(tmp_path: Path) -> None:
    # Regression: the signer's cache was keyed by (generation, version, nonce, second), and
    # every VM's first publish is generation 1, so VM b got VM a's signed vmId in that second.
    signer = Attestor.self_signed()
    now = time.time()
    for name in ("a", "b", "a"):
        vm = parse_vm(orjson.dumps(vm_document(name)), name)
        reply = signer.reply(vm, "2021-02-01", "1234", now)
        content = verified_content(orjson.loads(reply.body)["signature"], tmp_path)
        assert content["vmId"] == vm_uuid(name)


def test_a_base64url_nonce_is_signed_as_given(tmp_path: Path) -> None:
    # Teleport's Azure join sends 24 random bytes as unpadded base64url; real IMDS signs it
    # (its RFD shows a production document with this nonce).
    status, body = get(DOCUMENT + "&nonce=Yi09ymh-yIl4_zkmA6kIki4mDPpUlVxK")
    assert status == 200
    assert verified_content(body["signature"], tmp_path)["nonce"] == "Yi09ymh-yIl4_zkmA6kIki4mDPpUlVxK"

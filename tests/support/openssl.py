"""Attested documents checked the way Microsoft's samples check them: with the openssl binary.

Rules of this module: openssl, not the cryptography package fastimds signs
with, does the verifying, so that a signature both sides misread the same
way cannot pass; every run has a timeout.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any


def verified_content(signature_b64: str, tmp_path: Path, command: str = "smime") -> dict[str, Any]:
    """What `openssl smime -verify -noverify` (or `cms`) extracts from the signature (it fails on a bad one)."""
    der = tmp_path / "signature.der"
    der.write_bytes(base64.b64decode(signature_b64))
    done = subprocess.run(
        ["openssl", command, "-verify", "-noverify", "-inform", "DER", "-in", str(der)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert b"Verification successful" in done.stderr
    content: dict[str, Any] = json.loads(done.stdout)
    return content


def cms_structure(signature_b64: str, tmp_path: Path) -> str:
    """What `openssl cms -cmsout -print` shows of the signature's CMS structure (signer infos included)."""
    der = tmp_path / "structure.der"
    der.write_bytes(base64.b64decode(signature_b64))
    done = subprocess.run(
        ["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in", str(der)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()

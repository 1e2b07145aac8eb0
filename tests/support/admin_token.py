"""Admin token files as `fastimds serve --admin-token-file` accepts them.

Rules of this module: a token file is written owner-only (0600) whatever the
umask, and a token made here is 128 bits as 32 hex characters (what
`openssl rand -hex 16` prints), the shortest the server accepts.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_token_file(path: Path, token: str | None = None) -> str:
    """Write `token` (default: a fresh 128-bit one) and a newline to `path`, mode 0600; returns the token."""
    token = secrets.token_hex(16) if token is None else token
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    path.chmod(0o600)  # also when the file already existed with another mode
    return token

"""The admin API's bearer token file (`serve --admin-token-file`, `admin --token-file`).

Rules of this module:
- The server refuses a token file that anyone but its owner may read, write
  or run (any group or other permission bit): the token is the only thing
  between a local user and every VM's data and identities. The message names
  the file, its mode and the fix, `chmod 600 FILE`.
- The server refuses a token shorter than MIN_ADMIN_TOKEN_CHARS characters.
  Characters are counted, not decoded: 32 characters is 128 bits when they
  are hex (`openssl rand -hex 16`), and more for any richer alphabet.
- The client only reads the token it sends: an exposed file gets a warning
  on stderr, never a refusal (the server is what the token protects).
- A token file is one line: at most MAX_TOKEN_FILE_BYTES are read, so a
  path to /dev/zero cannot take the memory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastimds.config import ConfigError

# 128 bits as hex: what `openssl rand -hex 16` prints.
MIN_ADMIN_TOKEN_CHARS = 32
# A token is one line; anything longer than this is not a token file.
MAX_TOKEN_FILE_BYTES = 4096
# Permission bits that let someone other than the owner at the file.
OTHERS_BITS = stat.S_IRWXG | stat.S_IRWXO


def _read(path: Path) -> tuple[bytes, int]:
    """(the file's first MAX_TOKEN_FILE_BYTES + 1 bytes, its mode); OSError as from open()."""
    with open(path, "rb") as handle:
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)  # the file read, not whatever the name is later
        return handle.read(MAX_TOKEN_FILE_BYTES + 1), mode


def _token(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip()


def exposure_problem(path: Path, mode: int, what: str = "the admin token") -> str | None:
    """Why a file of `mode` at `path` is not private enough for a secret (`what`), or None."""
    if not mode & OTHERS_BITS:
        return None
    return f"{path} is mode {mode:04o}: {what} must be its owner's alone; run `chmod 600 {path}`"


def read_secret(path: Path, flag: str, what: str) -> str:
    """The one-line secret in `flag`'s file (the admin token, an etcd password), refused when others may
    read it, when it is empty or over one line's bytes; ConfigError names the file and the fix."""
    try:
        raw, mode = _read(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {flag} {path}: {exc.strerror}") from None
    exposed = exposure_problem(path, mode, what)
    if exposed:
        raise ConfigError(f"{flag} {exposed}")
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise ConfigError(f"{flag} {path} is over {MAX_TOKEN_FILE_BYTES} bytes: it holds one line")
    secret = _token(raw)
    if not secret:
        raise ConfigError(f"{flag} {path} is empty")
    return secret


def read_admin_token(path: Path) -> str:
    """The token in `serve --admin-token-file PATH`, or ConfigError saying what is wrong and how to fix it."""
    token = read_secret(path, "--admin-token-file", "the admin token")
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise ConfigError(
            f"--admin-token-file {path}: the token is {len(token)} characters; at least {MIN_ADMIN_TOKEN_CHARS} "
            f"are needed (128 bits as hex: `openssl rand -hex 16 > {path}`)"
        )
    return token


def read_client_token(path: Path) -> tuple[str, str | None]:
    """(the token in `admin --token-file PATH`, a warning if others may read it); OSError propagates."""
    raw, mode = _read(path)
    exposed = exposure_problem(path, mode)
    return _token(raw), (f"warning: --token-file {exposed}" if exposed else None)

"""The admin token file: owner-only and at least 128 bits (32 characters) for the server; the client warns.

The real `fastimds serve` refusing such files is in tests/e2e/test_tenant_isolation_e2e.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fastimds.cli.admin_token import MAX_TOKEN_FILE_BYTES, MIN_ADMIN_TOKEN_CHARS, read_admin_token, read_client_token
from fastimds.cli.main import build_parser, settings_from_args
from fastimds.config import ConfigError
from tests.support.admin_token import write_token_file

GOOD = "0123456789abcdef0123456789abcdef"  # 32 hex characters: 128 bits


def serve_args(token_file: Path) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "--admin-port", "0", "--admin-token-file", str(token_file)])


def test_an_owner_only_128_bit_token_is_read(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_token_file(path, GOOD)
    assert read_admin_token(path) == GOOD
    assert settings_from_args(serve_args(path)).admin_token == GOOD
    path.chmod(0o400)
    assert read_admin_token(path) == GOOD


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o666, 0o777])
def test_a_token_file_others_may_get_at_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "token"
    write_token_file(path, GOOD)
    path.chmod(mode)
    with pytest.raises(ConfigError) as caught:
        settings_from_args(serve_args(path))
    message = str(caught.value)
    assert f"--admin-token-file {path} is mode {mode:04o}" in message
    assert f"run `chmod 600 {path}`" in message


@pytest.mark.parametrize("token", ["x", "t0ken", GOOD[:-1], "correct horse battery"])
def test_a_token_under_32_characters_is_refused(tmp_path: Path, token: str) -> None:
    path = tmp_path / "token"
    write_token_file(path, token)
    with pytest.raises(ConfigError) as caught:
        read_admin_token(path)
    assert str(caught.value) == (
        f"--admin-token-file {path}: the token is {len(token)} characters; at least {MIN_ADMIN_TOKEN_CHARS} are "
        f"needed (128 bits as hex: `openssl rand -hex 16 > {path}`)"
    )


def test_an_empty_a_missing_and_an_endless_token_file_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    write_token_file(empty, "  ")
    with pytest.raises(ConfigError, match="is empty"):
        read_admin_token(empty)
    with pytest.raises(ConfigError, match=r"cannot read --admin-token-file .*: No such file"):
        read_admin_token(tmp_path / "missing")
    huge = tmp_path / "huge"
    write_token_file(huge, "a" * (MAX_TOKEN_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match=f"over {MAX_TOKEN_FILE_BYTES} bytes"):
        read_admin_token(huge)


def test_the_client_reads_any_token_but_warns_about_an_exposed_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_token_file(path, "short")
    assert read_client_token(path) == ("short", None)
    path.chmod(0o644)
    token, warning = read_client_token(path)
    assert token == "short"
    assert warning == (
        f"warning: --token-file {path} is mode 0644: the admin token must be its owner's alone; run `chmod 600 {path}`"
    )

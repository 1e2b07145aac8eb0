"""The etcd flags `serve` (fleet mode) and `fleet` share, and the EtcdSettings they make.

Rules of this module:
- One set of names for both commands: --etcd ENDPOINTS (comma-separated,
  every member), --etcd-prefix, the TLS files (--etcd-ca, --etcd-cert,
  --etcd-key, and --etcd-server-name for the name the members' certificates
  share) and user/password auth (--etcd-user, --etcd-password-file).
  `serve` adds --host-id, which defaults to this machine's host name.
- The password is read from its file here, refused like the admin token
  when others may read it (fastimds.cli.admin_token); it never is a flag.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from fastimds.cli.admin_token import read_secret
from fastimds.config import DEFAULT_ETCD_PREFIX, EtcdSettings


def add_etcd_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--etcd",
        required=required,
        metavar="ENDPOINTS",
        help="etcd members, comma-separated: http://10.0.0.5:2379,http://10.0.0.6:2379 (https:// with --etcd-ca)",
    )
    parser.add_argument(
        "--etcd-prefix",
        default=DEFAULT_ETCD_PREFIX,
        help=f"where the fleet lives in etcd: PREFIX/hosts/HOST/vms/VM (default {DEFAULT_ETCD_PREFIX})",
    )
    parser.add_argument("--etcd-ca", type=Path, help="PEM CA that signed etcd's certificates (https endpoints)")
    parser.add_argument("--etcd-cert", type=Path, help="PEM client certificate, for etcd --client-cert-auth")
    parser.add_argument("--etcd-key", type=Path, help="its PEM key")
    parser.add_argument(
        "--etcd-server-name",
        help="the name every member's certificate must carry (default: the first endpoint's host)",
    )
    parser.add_argument("--etcd-user", help="etcd user (with --etcd-password-file)")
    parser.add_argument(
        "--etcd-password-file", type=Path, help="file holding the etcd user's password (mode 0600, one line)"
    )


def etcd_settings(args: argparse.Namespace, host_id: str = "") -> EtcdSettings | None:
    """EtcdSettings from the flags (None without --etcd); ConfigError names what is wrong."""
    if not args.etcd:
        return None
    password = (
        read_secret(args.etcd_password_file, "--etcd-password-file", "the etcd password")
        if args.etcd_password_file is not None
        else None
    )
    return EtcdSettings(
        endpoints=tuple(endpoint.strip() for endpoint in args.etcd.split(",") if endpoint.strip()),
        prefix=args.etcd_prefix,
        host_id=host_id,
        ca_file=args.etcd_ca,
        cert_file=args.etcd_cert,
        key_file=args.etcd_key,
        server_name=args.etcd_server_name,
        user=args.etcd_user,
        password_file=args.etcd_password_file,
        password=password,
    )


def default_host_id() -> str:
    """This machine's host name: what `serve --host-id` defaults to."""
    return socket.gethostname().split(".")[0]

"""`fastimds admin ...`: the admin API from a shell.

Rules of this module:
- A thin client: one HTTP request per command, the server's JSON printed
  as it came (pretty), exit 0 on 2xx, 1 on an error reply, 2 on bad usage or
  no server. `status` prints its report on stdout even when the server is
  not ready (503, exit 1). The server decides everything; nothing is validated here.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from fastimds.cli.admin_token import read_client_token

DEFAULT_SOCKET = Path("/run/fastimds/admin.sock")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, help=f"the admin Unix socket (default {DEFAULT_SOCKET})")
    where.add_argument("--url", help="the admin TCP listener, e.g. http://127.0.0.1:9080")
    parser.add_argument("--token-file", type=Path, help="bearer token for --url")
    parser.add_argument("--timeout", type=float, default=10.0)
    commands = parser.add_subparsers(dest="admin_command", required=True)
    commands.add_parser("list", help="every VM with its generation and caller addresses")
    for name, text in (("get", "one VM's description"), ("delete", "remove a VM")):
        commands.add_parser(name, help=text).add_argument("vm_id")
    for name, text in (("put", "replace a VM with FILE"), ("patch", "apply the JSON merge patch in FILE")):
        command = commands.add_parser(name, help=text)
        command.add_argument("vm_id")
        command.add_argument("file", help="a JSON file, or - for standard input")
    commands.add_parser("health", help="GET /healthz")
    commands.add_parser(
        "status", help="readiness and where each source stands (etcd: connected, revision, last contact); GET /readyz"
    )
    call = commands.add_parser(
        "call", help="any admin route, e.g. `call POST /vms/a/scheduledevents event.json` or `call GET /faults`"
    )
    call.add_argument("method", choices=("GET", "POST", "PUT", "PATCH", "DELETE"))
    call.add_argument("path", help="the route, starting with /")
    call.add_argument("file", nargs="?", help="a JSON body file, or - for standard input")


def run(args: argparse.Namespace) -> int:
    try:
        method, path, body = _request_of(args)
    except OSError as exc:
        print(f"fastimds admin: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    headers = {"Content-Type": "application/json"} if body is not None else {}
    try:
        if args.url:
            parts = urlsplit(args.url)
            connection: http.client.HTTPConnection = http.client.HTTPConnection(
                parts.hostname or "127.0.0.1", parts.port or 80, timeout=args.timeout
            )
            if args.token_file is not None:
                token, warning = read_client_token(args.token_file)
                if warning:
                    print(f"fastimds admin: {warning}", file=sys.stderr)
                headers["Authorization"] = "Bearer " + token
        else:
            connection = UnixHTTPConnection(str(args.socket or DEFAULT_SOCKET), args.timeout)
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        connection.close()
    except OSError as exc:
        print(f"fastimds admin: cannot reach the admin API: {exc}", file=sys.stderr)
        return 2
    try:
        shown: Any = orjson.loads(payload)
        text = orjson.dumps(shown, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONDecodeError:
        text = payload.decode("utf-8", "replace")
    ok = 200 <= response.status < 300
    # status answers 503 when not ready: still the report asked for, so stdout (the exit code says not ready).
    print(text, file=sys.stdout if ok or args.admin_command == "status" else sys.stderr)
    return 0 if ok else 1


def _request_of(args: argparse.Namespace) -> tuple[str, str, bytes | None]:
    command = args.admin_command
    if command == "list":
        return "GET", "/vms", None
    if command == "health":
        return "GET", "/healthz", None
    if command == "status":
        return "GET", "/readyz", None
    if command in ("get", "delete"):
        return command.upper(), f"/vms/{args.vm_id}", None
    method, path = (args.method, args.path) if command == "call" else (command.upper(), f"/vms/{args.vm_id}")
    if args.file is None:
        return method, path, None
    source = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    with source:
        return method, path, source.read()

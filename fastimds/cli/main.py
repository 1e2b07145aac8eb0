"""The command line: `fastimds serve`, `validate`, `admin`, `fleet`, `logs` and `probe`.

Rules of this module:
- Parse arguments, build frozen Settings, hand over; no serving logic here.
- Exit codes: 0 success, 2 invalid input (bad data file or bad flags).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastimds import __version__, build_kind
from fastimds.cli import admin as admin_client
from fastimds.cli import fleet, probe
from fastimds.cli import logs as logs_cli
from fastimds.cli.admin_token import read_admin_token
from fastimds.cli.etcd_options import add_etcd_arguments, default_host_id, etcd_settings
from fastimds.config import DEFAULT_HOST, DEFAULT_PORT, ConfigError, Limits, Settings
from fastimds.http.throttle import AZURE_IDENTITY_RPS, AZURE_INSTANCE_RPS
from fastimds.imds.datafile import DataError, load_vm
from fastimds.ops.request_log import prepare_directory
from fastimds.ops.request_log_format import parse_retention

# (flag, Limits field, type, help) for every per-request and per-connection limit.
LIMIT_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--max-request-head-bytes", "max_request_head_bytes", int, "header bytes per request (431 over it)"),
    ("--max-header-count", "max_header_count", int, "headers per request (431 over it)"),
    ("--max-url-bytes", "max_url_bytes", int, "request-target bytes (414 over it)"),
    ("--max-body-bytes", "max_body_bytes", int, "request body bytes (413 over it)"),
    ("--keep-alive-timeout", "keep_alive_timeout_s", float, "seconds an idle connection is kept"),
    ("--request-timeout", "request_timeout_s", float, "seconds a started request has to finish (408)"),
    ("--send-stall-timeout", "send_stall_timeout_s", float, "seconds a client may stop reading"),
    (
        "--max-connections-per-worker",
        "max_connections_per_worker",
        int,
        "open connections per worker (503 over it; lowered to fit the open-files limit)",
    ),
    ("--max-connections-per-caller", "max_connections_per_caller", int, "open connections per caller address (503)"),
    (
        "--max-stalled-buffer-bytes",
        "max_stalled_buffer_bytes_per_worker",
        int,
        "bytes a worker keeps for clients that stopped reading (past it the longest stalled are dropped)",
    ),
    (
        "--signatures-per-vm",
        "signatures_per_vm_per_s",
        float,
        "fresh token mints and attested documents per second per VM and worker (429 past it; throttling aside)",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastimds", description="Azure-compatible instance metadata server")
    parser.add_argument("--version", action="version", version=f"fastimds {__version__} ({build_kind()} build)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a VM description over HTTP")
    serve.add_argument("--data", type=Path, help="VM description file (default: the embedded sample VM)")
    serve.add_argument("--data-dir", type=Path, help="a folder of VM description files, one VM each (watched)")
    serve.add_argument("--default-vm", help="with --data-dir: the VM that answers callers no VM claims")
    serve.add_argument("--state-dir", type=Path, help="keep every accepted VM description here, durably")
    serve.add_argument("--admin-socket", type=Path, help="serve the admin API on this Unix socket (mode 0600)")
    serve.add_argument("--admin-port", type=int, help="serve the admin API on this loopback TCP port")
    serve.add_argument(
        "--admin-token-file",
        type=Path,
        help="the bearer token the TCP admin API requires (mode 0600, at least 32 characters: openssl rand -hex 16)",
    )
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    serve.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to bind, 0 for any (default {DEFAULT_PORT})"
    )
    serve.add_argument("--workers", type=int, default=1, help="worker processes sharing the port (default 1)")
    serve.add_argument("--backlog", type=int, help="listen() backlog")
    serve.add_argument("--log-file", help="event log: a file to append to, or - for stdout (default: stderr)")
    serve.add_argument("--request-log", type=Path, help="log every request to rotated files in this folder")
    serve.add_argument(
        "--throttle", choices=("off", "azure"), default="off", help="per-caller limits: azure = 5 req/s, identity 20"
    )
    serve.add_argument("--throttle-rps", type=int, help="instance-family requests/s per caller (turns throttling on)")
    serve.add_argument("--throttle-identity-rps", type=int, help="identity requests/s per caller (turns it on)")
    serve.add_argument("--attested-cert", type=Path, help="PEM certificate that signs attested documents")
    serve.add_argument("--attested-key", type=Path, help="its PEM RSA key (default: a self-signed pair made at start)")
    serve.add_argument(
        "--request-log-retain", default="48", help="rotated request-log files kept per worker: 48, 7d, or 48,7d"
    )
    serve.add_argument(
        "--no-telemetry",
        action="store_true",
        help="count nothing and serve no /metrics (to measure what counting costs)",
    )
    add_etcd_arguments(serve, required=False)
    serve.add_argument(
        "--host-id", help="fleet mode: the host whose VMs to serve from etcd (default: this machine's host name)"
    )
    for flag, field_name, kind, help_text in LIMIT_FLAGS:
        serve.add_argument(
            flag, dest=field_name, type=kind, help=f"{help_text} (default {getattr(Limits(), field_name)})"
        )

    validate = commands.add_parser("validate", help="check a VM description file")
    validate.add_argument("file", type=Path)

    admin_client.add_arguments(commands.add_parser("admin", help="read and change VMs through the admin API"))
    fleet.add_arguments(commands.add_parser("fleet", help="read, put, move and delete the fleet's VMs in etcd"))
    logs_cli.add_arguments(commands.add_parser("logs", help="filter the request log (--request-log DIR)"))
    probe.add_arguments(commands.add_parser("probe", help="send real IMDS requests; report availability and latency"))
    return parser


def _throttle(args: argparse.Namespace) -> tuple[int, int] | None:
    if args.throttle == "off" and args.throttle_rps is None and args.throttle_identity_rps is None:
        return None
    limits = (
        args.throttle_rps if args.throttle_rps is not None else AZURE_INSTANCE_RPS,
        args.throttle_identity_rps if args.throttle_identity_rps is not None else AZURE_IDENTITY_RPS,
    )
    if min(limits) < 1:
        raise ConfigError(f"throttle limits must be at least 1 request a second, got {limits}")
    return limits


def _retention(text: str) -> tuple[int, float | None]:
    try:
        return parse_retention(text)
    except ValueError as exc:
        raise ConfigError(f"--request-log-retain: {exc}") from None


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.request_log is not None:
        try:
            prepare_directory(args.request_log)  # refuse a bad flag now, not in a worker later
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    overrides = {name: getattr(args, name) for _, name, _, _ in LIMIT_FLAGS if getattr(args, name) is not None}
    extra = {"backlog": args.backlog} if args.backlog is not None else {}
    token = read_admin_token(args.admin_token_file) if args.admin_token_file is not None else None
    return Settings(
        data_path=args.data,
        data_dir=args.data_dir,
        default_vm=args.default_vm,
        state_dir=args.state_dir,
        admin_socket=args.admin_socket,
        admin_port=args.admin_port,
        admin_token=token,
        telemetry=not args.no_telemetry,
        log_file=args.log_file,
        request_log_dir=args.request_log,
        request_log_retain=_retention(args.request_log_retain),
        throttle=_throttle(args),
        attested_cert=args.attested_cert,
        attested_key=args.attested_key,
        etcd=etcd_settings(args, args.host_id or default_host_id()),
        host=args.host,
        port=args.port,
        workers=args.workers,
        limits=Limits(**overrides),
        **extra,
    )


def validate_file(path: Path) -> int:
    try:
        vm = load_vm(path)
    except DataError as exc:
        print(f"{exc.source}: invalid ({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''})")
        for problem in exc.problems:
            print(f"  {problem}")
        return 2
    print(f"{vm.source}: valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "validate":
        return validate_file(args.file)
    if args.command == "admin":
        return admin_client.run(args)
    if args.command == "fleet":
        return fleet.run(args)
    if args.command == "logs":
        return logs_cli.run(args)
    if args.command == "probe":
        return probe.run(args)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"fastimds: {exc}", file=sys.stderr)
        return 2
    from fastimds.process.serve import serve  # uvloop is only needed to serve

    return serve(settings)

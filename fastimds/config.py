"""Settings and limits: every tunable, with its unit and the reason for its default.

Rules of this module:
- Settings are frozen once the server starts; a worker reads them, never writes.
- Every limit is a named constant with its unit in the name (house rule 7),
  and `Limits` lets an operator override each one from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# A real IMDS request head is ~200 bytes (method, target, Host, Metadata,
# User-Agent, a request id). 8 KiB is what nginx allows per header buffer.
MAX_REQUEST_HEAD_BYTES = 8 * 1024
# Real clients send under 10 headers; 64 leaves room for proxies' additions.
MAX_HEADER_COUNT = 64
# The longest real target (a leaf under network/interface/N/ipv4/...) is under
# 200 bytes; 2 KiB covers any legitimate query.
MAX_URL_BYTES = 2 * 1024
# GET requests carry no body; POST endpoints (scheduled events) send ~100
# bytes of JSON. 64 KiB is generous and still cheap to discard.
MAX_BODY_BYTES = 64 * 1024
# Idle keep-alive connections are closed after this. Health checkers call
# once a minute and reconnect; 15 s keeps bursts on one connection while
# bounding what an idle VM holds.
KEEP_ALIVE_TIMEOUT_S = 15.0
# A request whose head or body has started must be complete within this.
REQUEST_TIMEOUT_S = 10.0
# A client that stops reading (transport paused) is dropped after this.
SEND_STALL_TIMEOUT_S = 30.0
# Open connections one worker holds at once (idle, slow or long-polling); the
# next is answered 503 and closed. 64 Ki is 128 VMs at their full per-caller
# allowance: ~170 MiB of worker memory at the ~2.6 KiB an open connection
# costs it (measured over 5,000 connections; the kernel's socket memory aside).
# At start the server raises its open-files limit to the hard limit and
# lowers this to fit under it (fastimds.process.sockets.fit_fd_limit): a refusal needs
# a free descriptor to accept and answer, and accept() past EMFILE cannot.
MAX_CONNECTIONS_PER_WORKER = 64 * 1024
# Open connections one caller address holds per worker. A busy VM (a
# Kubernetes node's 250 pods behind one address, each SDK keeping a
# connection or two alive) stays under 512; one hostile VM can hold under 1%
# of a worker's default allowance.
MAX_CONNECTIONS_PER_CALLER = 512
# Bytes one worker keeps for connections whose client stopped reading (writing
# paused): their unsent replies (the transport's buffer) and the input read
# but not yet answered (the backlog). Each keeps up to ~0.4 MiB (one feed
# slice's replies over the 64 KiB high-water mark, plus the rest of one read),
# and 500 from one address took 110-170 MiB of RSS (issue 16). Past this
# total, the connections paused longest are aborted: their clients are not
# reading, while a client that reads is paused for milliseconds. 16 MiB holds
# ~150 paused connections at the ~110 KiB measured (reliability.md).
MAX_STALLED_BUFFER_BYTES_PER_WORKER = 16 * 1024 * 1024

# Fresh RSA signatures (token mints, attested documents not in their caches)
# one VM may cost a worker per second, with one second's worth at once: Azure's
# managed-identity rate (spec §3.6). A signature costs ~0.4 ms of a core
# (reliability.md, "High: one tenant stalling others"), so one VM at its budget
# takes ~1% of a worker; a cached token costs nothing. Past it: a 429.
SIGNATURES_PER_VM_PER_S = 20.0
# SIGTERM waits this long for connections to finish before aborting them.
SHUTDOWN_GRACE_S = 5.0
# listen() backlog; the kernel caps it at net.core.somaxconn (tuning.md).
LISTEN_BACKLOG = 4096

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080

# Fleet mode (fastimds.sources.etcd). Where a host's VMs live in etcd: {prefix}/hosts/{host}/vms/{vm}.
DEFAULT_ETCD_PREFIX = "/fastimds"
# Reconnecting to etcd: the first wait, doubling per failure up to the cap, each
# drawn between half and all of it (jitter: a fleet that lost etcd together does
# not come back in step). The cap bounds how long after etcd's return a host
# converges: the fleet simulation's target is 5 s (tuning.md).
ETCD_RETRY_FIRST_S = 0.1
ETCD_RETRY_CAP_S = 2.0
# How often the source asks etcd for its revision when the watch is quiet: the
# watch alone cannot tell a quiet store from a lost one. One small range read a
# second per host is 1,000 reads/s for a thousand hosts, a fraction of what one
# etcd member serves.
ETCD_CONTACT_INTERVAL_S = 1.0
# One request to etcd (a range read, a contact, a login) may take this long
# before the member counts as unreachable and the client tries another.
ETCD_REQUEST_TIMEOUT_S = 3.0


class ConfigError(Exception):
    """A setting that cannot work; the message says which and why."""


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd (fleet mode and `fastimds fleet`); the password is read from its file at start."""

    endpoints: tuple[str, ...]  # "http://10.0.0.5:2379" or "https://..."; every member, for failover
    prefix: str = DEFAULT_ETCD_PREFIX
    host_id: str = ""  # the host whose VMs this server serves (serve only)
    ca_file: Path | None = None  # TLS: the CA that signed etcd's certificates
    cert_file: Path | None = None  # TLS client certificate (etcd --client-cert-auth)
    key_file: Path | None = None  # its key
    server_name: str | None = None  # the name every member's certificate is checked against (see etcd_client)
    user: str | None = None  # etcd user/password authentication
    password_file: Path | None = None  # the password's file (never a flag: ps shows flags)
    password: str | None = field(default=None, repr=False)  # read from password_file at start; never logged

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("--etcd needs at least one endpoint (http://HOST:PORT, comma-separated)")
        schemes = {endpoint.partition("://")[0] for endpoint in self.endpoints}
        for endpoint in self.endpoints:
            scheme, sep, rest = endpoint.partition("://")
            host, colon, port = rest.rpartition(":")
            if not sep or scheme not in ("http", "https") or not colon or not host or not port.isdigit():
                raise ConfigError(f"--etcd endpoint {endpoint!r} is not http://HOST:PORT or https://HOST:PORT")
        if len(schemes) > 1:
            raise ConfigError("--etcd endpoints mix http and https: a cluster speaks one")
        if self.tls and self.ca_file is None:
            raise ConfigError("https etcd endpoints need --etcd-ca (the CA that signed etcd's certificates)")
        if not self.tls and (self.ca_file or self.cert_file or self.key_file):
            raise ConfigError("--etcd-ca, --etcd-cert and --etcd-key need https:// etcd endpoints")
        if self.server_name is not None and not self.tls:
            raise ConfigError("--etcd-server-name needs https:// etcd endpoints")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("--etcd-cert and --etcd-key go together")
        if (self.user is None) != (self.password is None):
            raise ConfigError("--etcd-user and --etcd-password-file go together")
        if not self.prefix.startswith("/") or self.prefix.endswith("/") or "//" in self.prefix:
            raise ConfigError(f"--etcd-prefix {self.prefix!r} must start with / and not end with one")
        if self.host_id and ("/" in self.host_id or self.host_id.strip() != self.host_id):
            raise ConfigError(f"--host-id {self.host_id!r} cannot contain / or surrounding spaces")

    @property
    def tls(self) -> bool:
        return self.endpoints[0].startswith("https://")

    @property
    def addresses(self) -> list[str]:
        """HOST:PORT of every endpoint, as the gRPC client takes them."""
        return [endpoint.partition("://")[2].rstrip("/") for endpoint in self.endpoints]


@dataclass(frozen=True)
class Limits:
    max_request_head_bytes: int = MAX_REQUEST_HEAD_BYTES
    max_header_count: int = MAX_HEADER_COUNT
    max_url_bytes: int = MAX_URL_BYTES
    max_body_bytes: int = MAX_BODY_BYTES
    keep_alive_timeout_s: float = KEEP_ALIVE_TIMEOUT_S
    request_timeout_s: float = REQUEST_TIMEOUT_S
    send_stall_timeout_s: float = SEND_STALL_TIMEOUT_S
    max_connections_per_worker: int = MAX_CONNECTIONS_PER_WORKER
    max_connections_per_caller: int = MAX_CONNECTIONS_PER_CALLER
    max_stalled_buffer_bytes_per_worker: int = MAX_STALLED_BUFFER_BYTES_PER_WORKER
    signatures_per_vm_per_s: float = SIGNATURES_PER_VM_PER_S

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ConfigError(f"limit {name} must be positive, got {value}")


@dataclass(frozen=True)
class Settings:
    data_path: Path | None = None  # None serves the embedded sample VM
    data_dir: Path | None = None  # many VMs, one file each; excludes data_path
    default_vm: str | None = None  # with data_dir: the VM for callers no VM claims
    state_dir: Path | None = None  # durable last-good store (and the update bus)
    admin_socket: Path | None = None
    admin_port: int | None = None  # loopback only; needs admin_token
    admin_token: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    workers: int = 1
    backlog: int = LISTEN_BACKLOG
    shutdown_grace_s: float = SHUTDOWN_GRACE_S
    telemetry: bool = True  # hot-path counters and /metrics
    log_file: str | None = None  # event log: None for stderr, "-" for stdout, else a file
    request_log_dir: Path | None = None  # the cold path: every request, in rotated files
    request_log_retain: tuple[int, float | None] = (48, None)  # rotated files kept per worker, max age
    throttle: tuple[int, int] | None = None  # (instance-family, identity) requests/s per caller; None: off
    attested_cert: Path | None = None  # PEM certificate signing attested documents (else self-signed)
    attested_key: Path | None = None  # its PEM RSA key
    etcd: EtcdSettings | None = None  # fleet mode: this host's VMs from etcd (fastimds.sources.etcd)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535, got {self.port}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.data_path is not None and self.data_dir is not None:
            raise ConfigError("--data and --data-dir exclude each other: one VM from a file, or many from a folder")
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise ConfigError(f"--data-dir {self.data_dir} is not a directory")
        if self.default_vm is not None and self.data_dir is None and self.etcd is None:
            raise ConfigError("--default-vm needs --data-dir or --etcd (with --data, the one VM answers everyone)")
        if self.etcd is not None and self.data_path is not None:
            raise ConfigError("--data and --etcd exclude each other: --data answers every caller with one VM")
        if (self.attested_cert is None) != (self.attested_key is None):
            raise ConfigError("--attested-cert and --attested-key go together")
        if self.admin_port is not None and not self.admin_token:
            raise ConfigError("--admin-port needs --admin-token-file: the TCP admin API refuses requests without it")

    def describe(self) -> dict[str, object]:
        """The settings for the startup `config` log line (no secrets)."""
        shown = {name: value for name, value in vars(self).items() if name not in ("admin_token", "limits", "etcd")}
        if self.etcd is not None:
            shown.update({f"etcd_{name}": value for name, value in vars(self.etcd).items() if name != "password"})
        shown["admin_token"] = "set" if self.admin_token else None
        shown.update({f"limit_{name}": value for name, value in vars(self.limits).items()})
        return {name: str(value) if isinstance(value, Path) else value for name, value in shown.items()}

    @property
    def admin_enabled(self) -> bool:
        return self.admin_socket is not None or self.admin_port is not None

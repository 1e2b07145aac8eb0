"""Real etcd processes on loopback, for the fleet tests and bench/fleet_sim.py.

Rules of this module:
- Every etcd here is a real etcd 3.4 process (Debian's /usr/bin/etcd, else `etcd` on PATH) on 127.0.0.1 ports found
  free at start, so a test meets the elections, compactions and auth errors fastimds meets in production. It
  starts processes: for tests/e2e and bench, never tests/unit.
- etcdctl is the one client in here, never etcd3aio: what sets up or checks a test must not go through the client
  library fastimds itself uses, or a bug in it could hide itself.
- Nothing may hang or leak: every etcdctl run has a timeout; a start waits against a deadline, then raises with the
  tail of every member's log; each member runs in its own session (a Ctrl-C reaches pytest, whose teardown kills
  it, not etcd mid-write); close() kills and reaps every member; an atexit hook kills what a crashed script left.
- Each member logs to BASE/member-NAME.log, appended across restarts, so a failing test can show what etcd saw.
- Timings suit a shared 2-core machine: 50 ms heartbeats, and a 500 ms election timeout that replaces a leader in 1 s.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey as _Key
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ETCD_PACKAGES = "etcd-server etcd-client"  # Debian packages

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
CTL_TIMEOUT_S = 20.0
LEADER_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 30
POLL_FLAGS = ("--dial-timeout=500ms", "--command-timeout=500ms")  # a quick "not yet", not the 2 s and 5 s defaults
QUOTA_BACKEND_BYTES = 1 << 30  # a ceiling, not an allocation: room for a bench run that never compacts
# No etcd user: with auth on, etcd takes a client certificate's CN as the user of a request that carries no token,
# so a CN of "root" would let every TLS client past the password checks.
CLIENT_CERT_CN = "fastimds-etcd-client"

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever a developer's http_proxy
# Every etcd process started and not yet reaped, for the atexit hook: a cluster never closed is the one to find.
_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for process in _LIVE:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)


class EtcdStartError(Exception):
    """The members did not form a healthy cluster in time; the message holds their logs' tails."""


class EtcdctlError(subprocess.CalledProcessError):
    """etcdctl exited non-zero; unlike CalledProcessError's, the message shows what etcdctl said."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.output!s}\nstderr: {self.stderr!s}"


def _find(name: str) -> str | None:
    return f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else shutil.which(name)


def _binary(name: str) -> str:
    if (found := _find(name)) is None:
        raise FileNotFoundError(etcd_missing())
    return found


def etcd_missing() -> str | None:
    """None when etcd and etcdctl exist; else a reason naming the Debian packages."""
    if not (missing := [name for name in ("etcd", "etcdctl") if _find(name) is None]):
        return None
    return f"{' and '.join(missing)} not found in /usr/bin or on PATH: apt-get install {ETCD_PACKAGES}"


def require_etcd() -> None:
    """Skip the test when etcd is missing, or fail it under FASTIMDS_CI=1: in CI a skipped etcd test hides a gap."""
    if (reason := etcd_missing()) is not None and os.environ.get("FASTIMDS_CI") == "1":
        pytest.fail(f"FASTIMDS_CI=1 and {reason}", pytrace=False)
    if reason is not None:
        pytest.skip(reason)


def free_ports(count: int) -> list[int]:
    """`count` loopback ports free a moment ago; all stay bound until the last is picked, so none comes twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


# ---- TLS ----


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a TLS cluster, for etcd's --cert-file/--key-file/--trusted-ca-file and etcdctl's flags."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_credentials(self) -> dict[str, bytes]:
        """The keyword arguments etcd3aio's Etcd3Client takes for mutual TLS."""
        pem = {"ca_cert": self.ca, "cert_key": self.client_key, "cert_chain": self.client_cert}
        return {name: path.read_bytes() for name, path in pem.items()}


def _sign(
    subject: str, key: _Key, ca: x509.Certificate | None, ca_key: _Key, usages: Sequence[x509.ObjectIdentifier] = ()
) -> x509.Certificate:
    """A certificate for `key`: the CA's own when `ca` is None, else a leaf for 127.0.0.1 and localhost."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = x509.CertificateBuilder(
        issuer_name=name if ca is None else ca.subject,
        subject_name=name,
        public_key=key.public_key(),
        serial_number=x509.random_serial_number(),
        # A few minutes back, so a clock a little behind ours still accepts the certificate.
        not_valid_before=now - datetime.timedelta(minutes=5),
        not_valid_after=now + datetime.timedelta(days=1),
    ).add_extension(x509.BasicConstraints(ca=ca is None, path_length=0 if ca is None else None), critical=True)
    if ca is None:
        signing = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        return builder.add_extension(signing, critical=True).sign(ca_key, hashes.SHA256())
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False).sign(ca_key, hashes.SHA256())


def make_tls(directory: Path) -> TlsFiles:
    """A throwaway CA, and server and client certificates it signed for 127.0.0.1 and localhost (EC P-256, a day);
    the server's may act as a client too: with --client-cert-auth, etcd's own gRPC gateway dials the server with it."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(*(directory / f"{name}.pem" for name in ("ca", "server", "server-key", "client", "client-key")))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _sign("fastimds test etcd CA", ca_key, None, ca_key)
    files.ca.write_bytes(ca.public_bytes(Encoding.PEM))
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    for subject, cert_path, key_path, usages in [
        ("localhost", files.server_cert, files.server_key, [server, client]),
        (CLIENT_CERT_CN, files.client_cert, files.client_key, [client]),
    ]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert_path.write_bytes(_sign(subject, key, ca, ca_key, usages).public_bytes(Encoding.PEM))
        key_path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        key_path.chmod(0o600)
    return files


# ---- members and clusters ----


class EtcdMember:
    """One etcd process of an EtcdCluster; start() after stop() or kill() brings it back on the same data."""

    def __init__(self, cluster: EtcdCluster, name: str, client_port: int, peer_port: int) -> None:
        self.cluster = cluster  # its TLS files and bootstrap flags are every member's
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = cluster.base / f"member-{name}.etcd"
        self.log_path = cluster.base / f"member-{name}.log"
        # Once the cluster has formed, a restart joins it rather than bootstrapping it; etcd ignores the initial
        # flags when the data dir exists anyway, but a wiped member must not found a second cluster.
        self.formed = False
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{'http' if self.cluster.tls is None else 'https'}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        # Peers stay plain http on loopback even with TLS: the tests are about clients, and it keeps certs simple.
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        command = [
            _binary("etcd"),
            *("--name", self.name, "--data-dir", str(self.data_dir)),
            *("--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint),
            *("--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url),
            *("--initial-cluster", self.cluster.initial_cluster, "--initial-cluster-token", self.cluster.token),
            *("--initial-cluster-state", "existing" if self.formed else "new"),
            *("--heartbeat-interval", "50", "--election-timeout", "500"),
            *("--snapshot-count", "10000", "--quota-backend-bytes", str(QUOTA_BACKEND_BYTES)),
            "--auto-compaction-retention=0",  # the tests compact when they mean to, never behind their back
            # zap: capnslog (3.4's default) warns on every start that it is deprecated.
            *("--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"),
        ]
        if (tls := self.cluster.tls) is not None:
            command += ["--cert-file", str(tls.server_cert), "--key-file", str(tls.server_key)]
            if self.cluster.client_cert_auth:
                # Only here: with a trusted CA, etcd 3.4 demands a certificate of every client, whatever the flags.
                command += ["--client-cert-auth", "--trusted-ca-file", str(tls.ca)]
        return command

    def start(self) -> None:
        """Start the process, without waiting for it to serve: EtcdCluster.start_all waits for the cluster."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        _LIVE.add(self.process)

    def wait_serving_peers(self, timeout_s: float) -> None:
        """Until the peer port answers. A new member asks each peer whether the cluster exists yet, and waits a whole
        second on one that listens but does not serve yet: EtcdCluster.start lets each member serve before the next."""
        deadline = time.monotonic() + timeout_s
        while self.running and time.monotonic() < deadline:
            with contextlib.suppress(OSError), _DIRECT.open(f"{self.peer_url}/version", timeout=0.2):
                return
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL and wait: a crash, no leadership handed over, nothing flushed."""
        self.stop(signal.SIGKILL)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Send `signum` and wait; a member still running STOP_TIMEOUT_S later is killed."""
        if self.process is None:
            return
        self.process.send_signal(signum)  # a no-op once the process is reaped, whose pid may be another's by now
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)
        _LIVE.discard(self.process)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        return f"EtcdMember({self.name!r}, {self.endpoint}, running={self.running})"


class EtcdCluster:
    """`size` etcd members on loopback, their data dirs and logs in `base`; see the module's rules."""

    def __init__(
        self, base: Path, size: int = 1, *, tls: TlsFiles | None = None, client_cert_auth: bool = False
    ) -> None:
        if size < 1 or (client_cert_auth and tls is None):
            raise ValueError(f"no cluster of {size} members with client_cert_auth={client_cert_auth} and tls={tls}")
        self.base = base
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.root_password: str | None = None  # set by enable_auth: etcdctl then runs as root
        self.members: list[EtcdMember] = []
        self.initial_cluster = ""  # every member's name=peer URL
        self.token = ""
        self._pick_members(size)

    def _pick_members(self, size: int) -> None:
        ports = free_ports(2 * size)
        self.members = [EtcdMember(self, f"etcd{i}", ports[2 * i], ports[2 * i + 1]) for i in range(size)]
        self.initial_cluster = ",".join(f"{member.name}={member.peer_url}" for member in self.members)
        # Unique to the cluster, so that a member of another test's cluster that reuses a port cannot join this one.
        self.token = f"fastimds-{uuid.uuid4().hex[:12]}"

    @property
    def endpoints(self) -> str:
        """Every member's client URL, comma-joined, as fastimds's --etcd flag takes them."""
        return ",".join(member.endpoint for member in self.members)

    def client_addresses(self) -> list[str]:
        """Every member as host:port, as etcd3aio's Etcd3Client takes them (no scheme: TLS is by its arguments)."""
        return [f"127.0.0.1:{member.client_port}" for member in self.members]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> EtcdCluster:
        """Start every member and wait until all answer; a failed start leaves no process behind."""
        for attempt in (1, 2):
            for member in self.members:
                member.start()
                member.wait_serving_peers(timeout_s)
            try:
                self._wait_healthy(timeout_s)
                break
            except EtcdStartError:
                clash = any("address already in use" in member.log_tail(10**6) for member in self.members)
                self.close()
                if attempt == 2 or not clash:
                    raise
                # A port taken before etcd bound it: retry on fresh ports, without the old peer URLs in any data dir.
                self.remove_data()
                self._pick_members(len(self.members))
        for member in self.members:
            member.formed = True
        return self

    def start_all(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the members that are down, on their data, and wait until the whole cluster answers."""
        for member in self.members:
            member.start()
        self._wait_healthy(timeout_s)

    def stop_all(self) -> None:
        """SIGTERM every member: the followers, then the leader once it has stepped down. A stopping leader hands its
        leadership over, waiting etcd's whole request timeout (6 s) for a follower that has stopped or is stopping."""
        leader = self._agreed_leader()
        followers = [member for member in self.members if member is not leader]
        for member in followers:
            member.stop()
        deadline = time.monotonic() + LEADER_TIMEOUT_S  # alone, it steps down in an election timeout or two
        while leader is not None and followers and self._agreed_leader() is leader and time.monotonic() < deadline:
            time.sleep(0.05)
        if leader is not None:
            leader.stop()

    def close(self) -> None:
        """Kill and reap every member; safe to call again."""
        for member in self.members:
            member.kill()

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def remove_data(self) -> None:
        """Kill the members and delete their data dirs, keeping the logs: each dir holds 128 MB of preallocated WAL."""
        self.close()
        for member in self.members:
            shutil.rmtree(member.data_dir, ignore_errors=True)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if dead := [member.name for member in self.members if not member.running]:
                problem = f"{', '.join(dead)} exited"
                break
            # A read sent before the first election hangs for its whole timeout: a leader first spares the wait.
            if self._agreed_leader() is None:
                problem = "no leader that every member names"
            else:
                # `endpoint health` commits a read through raft on every endpoint: it proves a working quorum.
                health = self._run(["endpoint", "health", *POLL_FLAGS], check=False)
                if health.returncode == 0:
                    return
                problem = health.stderr.decode(errors="replace").strip()
            if time.monotonic() >= deadline:
                problem = f"not healthy within {timeout_s} s: {problem}"
                break
            time.sleep(0.02)
        logs = "\n".join(f"---- {member.log_path} (last lines) ----\n{member.log_tail()}" for member in self.members)
        raise EtcdStartError(f"etcd cluster at {self.endpoints}: {problem}\n{logs}")

    def _run(
        self, args: Sequence[str], endpoints: str | None = None, *, check: bool = True, stdin: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        command = [_binary("etcdctl"), "--endpoints", endpoints or self.endpoints]
        if (tls := self.tls) is not None:
            command += ["--cacert", str(tls.ca), "--cert", str(tls.client_cert), "--key", str(tls.client_key)]
        if self.root_password is not None:
            command += ["--user", "root", "--password", self.root_password]
        command += args
        # A developer's own ETCDCTL_ENDPOINTS or ETCDCTL_USER must not steer the tests' etcdctl.
        env = {name: value for name, value in os.environ.items() if not name.startswith("ETCDCTL_")}
        env["ETCDCTL_API"] = "3"
        done = subprocess.run(command, input=stdin, capture_output=True, env=env, timeout=CTL_TIMEOUT_S, check=False)
        if check and done.returncode != 0:
            raise EtcdctlError(done.returncode, command, done.stdout, done.stderr)
        return done

    def etcdctl(self, *args: str, check: bool = True, endpoints: str | None = None) -> subprocess.CompletedProcess[str]:
        """`etcdctl ARGS` against every member (or `endpoints`), with the cluster's TLS files and root's password."""
        done = self._run(args, endpoints, check=False)
        text = subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())
        if check and done.returncode != 0:
            raise EtcdctlError(done.returncode, done.args, text.stdout, text.stderr)
        return text

    def put(self, key: str, value: str | bytes) -> int:
        """Put `value` at `key`; returns the revision the put made."""
        # The value goes in on stdin, whole: an argument could neither hold a NUL nor start with "-".
        done = self._run(["-w", "json", "put", "--", key], stdin=value.encode() if isinstance(value, str) else value)
        return int(json.loads(done.stdout)["header"]["revision"])

    def get(self, key: str) -> bytes | None:
        kvs = json.loads(self._run(["-w", "json", "get", "--", key]).stdout).get("kvs")
        return base64.b64decode(kvs[0]["value"]) if kvs else None

    def delete(self, key: str) -> None:
        self._run(["del", "--", key])

    def revision(self) -> int:
        """The cluster's current revision (a linearizable read, so no lagging member's view of it)."""
        return int(json.loads(self._run(["-w", "json", "get", "--", "/"]).stdout)["header"]["revision"])

    def compact(self, revision: int | None = None) -> None:
        """Compact history up to `revision` (default: the current one) and wait until it is physically gone."""
        done = self._run(["compaction", "--physical", str(revision or self.revision())], check=False)
        # Twice to the current revision with no write between is no error for a caller who asked for just that.
        if done.returncode != 0 and not (revision is None and b"has been compacted" in done.stderr):
            raise EtcdctlError(done.returncode, done.args, done.stdout, done.stderr)

    def leader(self, timeout_s: float = LEADER_TIMEOUT_S) -> EtcdMember:
        """The member that leads now, waiting out an election until every running member names the same leader."""
        deadline = time.monotonic() + timeout_s
        while (leader := self._agreed_leader()) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no leader agreed within {timeout_s} s: {self.members}")
            time.sleep(0.05)
        return leader

    def _agreed_leader(self) -> EtcdMember | None:
        """The leader every running member names, or None. `endpoint status` answers locally, without raft (a read
        would wait for a leader); a dead member gives none, so a killed leader is never named. One etcdctl per member,
        all at once: a member not serving yet holds its call for the whole timeout."""
        if not (running := {member.endpoint: member for member in self.members if member.running}):
            return None
        command = ["-w", "json", "endpoint", "status", *POLL_FLAGS]
        with ThreadPoolExecutor(len(running)) as pool:
            done = list(pool.map(lambda endpoint: self._run(command, endpoint, check=False).stdout, running))
        with contextlib.suppress(ValueError, KeyError):
            statuses = [status for stdout in done for status in json.loads(stdout or b"[]")]
            by_id = {status["Status"]["header"]["member_id"]: running[status["Endpoint"]] for status in statuses}
            leaders = {status["Status"]["leader"] for status in statuses}
            if len(statuses) == len(running) and len(leaders) == 1:
                return by_id.get(leaders.pop())
        return None

    def enable_auth(self, user: str, password: str) -> None:
        """Turn on auth: root and `user` (readwrite on every key), both with `password`; etcdctl then runs as root."""
        self.etcdctl("user", "add", "root", "--new-user-password", password, "--interactive=false")
        self.etcdctl("user", "grant-role", "root", "root")  # `auth enable` wants it; the root role needs no adding
        if user != "root":
            role = f"{user}-readwrite"
            self.etcdctl("role", "add", role)
            # An empty key with --prefix is etcdctl's spelling of the whole key space.
            self.etcdctl("role", "grant-permission", role, "readwrite", "--prefix=true", "")
            self.etcdctl("user", "add", user, "--new-user-password", password, "--interactive=false")
            self.etcdctl("user", "grant-role", user, role)
        self.etcdctl("auth", "enable")
        self.root_password = password


# ---- pytest fixtures ----


def _started(base: Path, size: int) -> Iterator[EtcdCluster]:
    require_etcd()
    cluster = EtcdCluster(base, size).start()
    try:
        yield cluster
    finally:
        cluster.remove_data()  # pytest keeps three runs' tmp_path: the logs, not gigabytes of WAL


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A started single-member etcd, killed after the test."""
    yield from _started(tmp_path / "etcd", 1)


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A started three-member etcd cluster, killed after the test."""
    yield from _started(tmp_path / "etcd-cluster", 3)

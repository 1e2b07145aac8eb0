"""Event loop, listeners, workers, the once-a-second tick, signals, shutdown.

Rules of this module:
- One worker is one process running one uvloop loop; with `--workers N` a
  supervisor forks N workers that each bind the same port with SO_REUSEPORT,
  so the kernel spreads connections and no worker shares an accept queue,
  and one control process that owns the admin listeners and the data
  sources (fastimds.control.writer). With one worker, one process does both.
- Everything shared is made before any fork: the port check, the admin
  sockets, the update bus directory and the telemetry area.
- The supervisor never runs an event loop (fork safety). It restarts any
  child that dies unexpectedly (a worker keeps its telemetry region), sends
  SIGHUP to the control process and SIGTERM to everyone.
- SIGHUP re-reads --data (or rescans --data-dir) and publishes what changed;
  an invalid file is refused with a log line naming every problem, and the
  old data keeps serving. SIGTERM stops accepting, lets in-flight replies
  finish (with `Connection: close`), closes idle connections and exits 0.
- Exactly one line goes to stdout, when the server is accepting connections.
- At start, before any fork, the open-files soft limit is raised to the hard
  limit and the per-worker connection limit is lowered, if need be, to fit
  under it with FD_RESERVE to spare (`fit_fd_limit`), so every refusal can
  still be accepted and answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import resource
import select
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import uvloop

from fastimds.bus.approvals import BusApprovals
from fastimds.bus.files import Bus
from fastimds.config import Settings
from fastimds.control.admin_api import AdminApi, admin_factory
from fastimds.control.writer import Control, Follower, UpdateError
from fastimds.http.connection import MAX_LINGERING_REFUSALS, HttpProtocol
from fastimds.http.throttle import Throttle, ThrottleLimits
from fastimds.http.worker_state import ApprovalSink, ServerState
from fastimds.imds import attested
from fastimds.imds.datafile import DataError
from fastimds.imds.keys import Keys
from fastimds.imds.registry import VmRegistry
from fastimds.imds.store import DEFAULT_VM_ID
from fastimds.ops.event_log import EVENT_LOG, log_event
from fastimds.ops.request_log import RequestLog
from fastimds.ops.telemetry import LAYOUT, ScrapeSources, TelemetryArea, VmState, render_metrics

TICK_INTERVAL_S = 1.0
# The request log is written this often, at most this many records at a time
# (~0.75 µs each: a slice is a ~4 ms pause at most), so that at 130k req/s
# the buffer never nears its cap.
REQUEST_LOG_FLUSH_S = 0.25
REQUEST_LOG_SLICE_RECORDS = 5000
# Workers must report ready within this, or the supervisor gives up.
WORKER_START_TIMEOUT_S = 15.0
# A worker that dies this soon after starting, this many times in a row, is
# not restarted again: something is wrong with every start, not with one.
CRASH_LOOP_WINDOW_S = 2.0
CRASH_LOOP_LIMIT = 5
# On SIGTERM an idle keep-alive connection is kept this long, so that a client
# mid-burst (its next request within milliseconds, or a thread descheduled on
# a busy host) gets that request answered, with Connection: close. It ends as
# soon as no connection is left, so an idle server stops at once.
DRAIN_ANSWER_S = 0.25
# Then idle connections are half-closed (a FIN) and read from for this long,
# so a request sent as the FIN crossed it meets a clean end of stream rather
# than a reset (Go's net/http waits 500 ms for the same reason).
DRAIN_LINGER_S = 0.5
# Descriptors a worker keeps out of its connection limit: its own (listener,
# bus and log files, inotify, pipes: well under 64) and the refused
# connections that linger until their 503 is read.
FD_RESERVE = 64 + MAX_LINGERING_REFUSALS


def make_listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def fit_fd_limit(settings: Settings) -> tuple[Settings, dict[str, Any]]:
    """Raise the open-files soft limit to the hard limit; fit the per-worker connection limit under it.

    A distribution's default soft limit (often 1024) would cap a worker near
    1,000 connections, and accept() past it fails with EMFILE instead of a
    clean 503. Called once, before any fork: every worker inherits both.
    Returns the fitted settings and the fields of the `fd_limit` log line.
    """
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if before != hard:
        with contextlib.suppress(ValueError, OSError):  # an unlimited hard limit may not be settable
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    wanted = settings.limits.max_connections_per_worker
    room = wanted if soft == resource.RLIM_INFINITY else max(soft - FD_RESERVE, soft // 2)
    fitted = min(wanted, room)
    report = {
        "open_files_before": before,
        "open_files": soft,
        "open_files_hard": hard,
        "max_connections_per_worker": fitted,
        "lowered_from": wanted if fitted < wanted else None,
    }
    if fitted < wanted:
        settings = replace(settings, limits=replace(settings.limits, max_connections_per_worker=fitted))
    return settings, report


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _ready_line(settings: Settings, port: int, registry: VmRegistry, admin: str) -> str:
    default = registry.default.current
    vm_id = default.vm.instance.get("compute", {}).get("vmId", "") if default is not None else ""
    data = settings.data_dir or (default.vm.source if default is not None else "")
    return (
        f"fastimds listening on {_url(settings.host, port)} workers={settings.workers} "
        f"vms={len(registry.live())} vmId={vm_id} admin={admin or '-'} data={data}"
    )


def reload_sources(settings: Settings, control: Control) -> None:
    """SIGHUP: re-read --data (or rescan --data-dir) and publish what changed, or refuse."""
    if settings.data_dir is not None:
        control.sync_data_dir(settings.data_dir)
        return
    if not serves_data_file(settings, control.bus):
        return  # serving the state dir's VMs: there is no file to re-read
    try:
        control.load_data_file(settings.data_path)
    except (DataError, UpdateError) as exc:
        log_event(
            "reload_refused",
            source=str(settings.data_path),
            problems=exc.problems if exc.problems else [str(exc)],
            serving_generation=control.registry.default.generation,
        )
        return
    log_event("reload_published", source=str(settings.data_path), generation=control.registry.default.generation)


def serves_data_file(settings: Settings, bus: Bus) -> bool:
    """Single-VM mode: --data, or nothing configured and no saved VMs but the default one.

    A restart with only --state-dir serves what was saved, not the embedded sample.
    """
    if settings.data_dir is not None:
        return False
    return settings.data_path is not None or set(bus.ids()) <= {DEFAULT_VM_ID}


def prepare_control(settings: Settings, bus: Bus) -> Control:
    """Load the last good state, then every configured source.

    Raises DataError on a bad --data and UpdateError when it conflicts with saved VMs.
    """
    single = serves_data_file(settings, bus)
    default_vm_id = DEFAULT_VM_ID if single else settings.default_vm
    control = Control(bus, VmRegistry(default_vm_id=default_vm_id))
    control.load_state()
    if settings.data_dir is not None:
        control.sync_data_dir(settings.data_dir)
    elif single:
        control.load_data_file(settings.data_path)
    return control


class Telemetry:
    """One process's telemetry: its counters, its region of the shared area, and the scrape.

    Workers use regions 0..N-1; the control process (or the single process)
    uses its own. The scrape sums every region; readiness reads each worker's.
    """

    def __init__(self, area: TelemetryArea, region: int, enabled: bool, workers: int) -> None:
        self.area = area
        self.region = region
        self.workers = workers
        self.counters: list[int] | None = area.read(region) if enabled else None  # a restart continues
        self.control: Control | None = None

    def publish(self, vms_served: int) -> None:
        if self.counters is not None:
            self.counters[LAYOUT.vms_served] = vms_served
            self.counters[LAYOUT.tick_unix] = int(time.time())
            self.area.publish(self.region, self.counters)

    def _worker_regions(self) -> list[list[int]]:
        live = self.area.live_regions(time.time())
        return [region for index, region in enumerate(live) if index < self.workers] if live else []

    def metrics(self) -> bytes:
        control = self.control
        assert control is not None
        self.publish(len(control.registry.live()))  # this process's own counts, fresh

        def vms() -> list[VmState]:
            now = time.time()
            return [
                VmState(vm_id, store.generation, now - store.changed_at, store.current is not None)
                for vm_id, store in sorted(control.registry.stores.items())
                if store.current is not None
            ]

        def workers() -> int:
            now = time.time()
            return sum(
                1 for index in range(self.workers) if now - self.area.read(index)[LAYOUT.tick_unix] <= WORKER_STALE_S
            )

        return render_metrics(
            ScrapeSources(totals=self.area.total, vms=vms, updates=lambda: dict(control.updates), workers=workers)
        )

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when every worker ticked lately and serves as many VMs as the control plane has."""
        control = self.control
        assert control is not None
        expected = len(control.registry.live())
        if self.workers == 1 and self.region == 0:
            return True, {}  # single process: the worker serves the control plane's own registry
        now = time.time()
        serving = []
        for index in range(self.workers):
            region = self.area.read(index)
            fresh = now - region[LAYOUT.tick_unix] <= WORKER_STALE_S
            serving.append(region[LAYOUT.vms_served] if fresh else None)
        ready = all(count == expected for count in serving)
        return ready, {"workers_serving": serving, "expected_vms": expected}


# A worker whose region has not been published for this long counts as down.
WORKER_STALE_S = 3.0


def _socket_answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class AdminSockets:
    """The admin listeners' sockets, bound once (before any fork) and kept for restarts."""

    def __init__(self, settings: Settings) -> None:
        self.unix: socket.socket | None = None
        self.unix_file: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file bound here
        self.tcp: socket.socket | None = None
        self.token = settings.admin_token
        if settings.admin_socket is not None:
            path = settings.admin_socket
            if path.is_socket():
                if _socket_answers(path):
                    raise OSError(errno.EADDRINUSE, "another server is using the admin socket", str(path))
                path.unlink()  # a stale socket from a previous run
            self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)  # created 0600: only its owner may connect
            try:
                self.unix.bind(str(path))
            finally:
                os.umask(old_umask)
            status = path.lstat()
            self.unix_file = (status.st_dev, status.st_ino)
        if settings.admin_port is not None:
            self.tcp = make_listen_socket("127.0.0.1", settings.admin_port, reuse_port=False)

    def remove_unix_file(self, settings: Settings) -> None:
        """Remove the socket file at stop, if it is still the one bound here: never another server's file."""
        if settings.admin_socket is None or self.unix_file is None:
            return
        with contextlib.suppress(FileNotFoundError):
            status = settings.admin_socket.lstat()
            if (status.st_dev, status.st_ino) == self.unix_file:
                settings.admin_socket.unlink()

    def describe(self, settings: Settings) -> str:
        names = []
        if self.unix is not None:
            names.append(f"unix:{settings.admin_socket}")
        if self.tcp is not None:
            names.append(_url("127.0.0.1", self.tcp.getsockname()[1]))
        return ",".join(names)

    async def serve(self, control: Control, backlog: int, telemetry: Telemetry, keys: Keys) -> list[asyncio.Server]:
        loop = asyncio.get_running_loop()
        api = AdminApi(
            control,
            self.token,
            metrics=telemetry.metrics if telemetry.counters is not None else None,
            readiness=telemetry.readiness,
            counters=telemetry.counters,
            keys=keys,
        )
        servers = []
        if self.unix is not None:
            servers.append(await loop.create_unix_server(admin_factory(api, over_tcp=False), sock=self.unix))
        if self.tcp is not None:
            servers.append(await loop.create_server(admin_factory(api, over_tcp=True), sock=self.tcp, backlog=backlog))
        return servers


async def _run_worker(
    settings: Settings,
    bus: Bus,
    sock: socket.socket,
    on_ready: Callable[[VmRegistry], None],
    *,
    control: Control | None,
    admin: AdminSockets | None,
    telemetry: Telemetry,
    keys: Keys,
) -> None:
    """One process serving VMs. With `control`, it is also the control plane (single-process mode)."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    if control is not None:
        registry = control.registry
        fault_table = control.fault_table
        approvals: ApprovalSink = control  # scheduled-event approvals go to the control plane (next loop turn)
    else:
        registry = VmRegistry(default_vm_id=settings.default_vm if settings.data_dir else DEFAULT_VM_ID)
        follower = Follower(bus, registry)
        fault_table = follower.fault_table
        tasks.append(await follower.start())
        approvals = BusApprovals(bus.directory, bus.durable)  # through the bus to the control process
    request_log = None
    if settings.request_log_dir is not None:
        retain_files, retain_age_s = settings.request_log_retain
        request_log = RequestLog(
            settings.request_log_dir, telemetry.region, retain_files=retain_files, retain_age_s=retain_age_s
        )
    EVENT_LOG.configure(role="server" if control is not None else f"worker {telemetry.region}")
    EVENT_LOG.counters, EVENT_LOG.suppressed_slot = telemetry.counters, LAYOUT.log_suppressed
    state = ServerState(
        registry,
        settings.limits,
        now=loop.time(),
        unix_time=time.time(),
        counters=telemetry.counters,
        request_log=request_log,
        throttle=Throttle(ThrottleLimits(*settings.throttle)) if settings.throttle is not None else None,
        faults=fault_table,
        approvals=approvals,
        keys=keys,
        event_log=EVENT_LOG,
    )
    server = await loop.create_server(lambda: HttpProtocol(state), sock=sock, backlog=settings.backlog)
    admin_servers: list[asyncio.Server] = []
    if control is not None:
        telemetry.control = control
        admin_servers, control_tasks = await _start_control(
            settings, control, admin, telemetry, keys, approvals_watch=False
        )
        tasks.extend(control_tasks)

    def tick() -> None:
        unix_time = time.time()
        state.tick(loop.time(), unix_time)
        EVENT_LOG.tick()
        telemetry.publish(sum(1 for store in registry.stores.values() if store.current is not None))
        # Fire just after the next wall-clock second, so Date is never stale by more than a tick.
        loop.call_later(TICK_INTERVAL_S - unix_time % TICK_INTERVAL_S + 0.001, tick)

    tick()

    def flush_request_log() -> None:
        """The cold path, in slices so that a busy second's records never stall requests for long."""
        assert request_log is not None
        request_log.flush(time.time(), max_records=REQUEST_LOG_SLICE_RECORDS)
        for event, fields in request_log.take_events():
            log_event(event, **fields)
        if request_log.buffered:
            loop.call_soon(flush_request_log)  # more than a slice: the rest after pending I/O
        else:
            loop.call_later(REQUEST_LOG_FLUSH_S, flush_request_log)

    if request_log is not None:
        loop.call_later(REQUEST_LOG_FLUSH_S, flush_request_log)
    stopping = asyncio.Event()
    if control is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_sources, settings, control)
    else:
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the control process reloads
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    # Everything built so far lives as long as the process: keep it out of
    # the collector's generations so collections stay cheap (tuning.md).
    gc.freeze()
    log_event("worker_ready", vms=len(registry.live()))
    on_ready(registry)
    await stopping.wait()

    for task in tasks:
        task.cancel()
    for admin_server in admin_servers:
        admin_server.close()
    state.draining = True  # from here every reply says Connection: close and closes
    server.close()
    give_up_at = loop.time() + settings.shutdown_grace_s
    # Idle keep-alive connections stay open a moment: a request already on its
    # way is answered (and its connection closed) instead of meeting a close.
    answer_until = loop.time() + DRAIN_ANSWER_S
    while state.connections and loop.time() < answer_until:
        await asyncio.sleep(0.02)
    for connection in list(state.connections):
        connection.shutdown()  # idle ones are half-closed: a FIN, reading on
    linger_until = loop.time() + DRAIN_LINGER_S
    while state.connections and loop.time() < give_up_at:
        if loop.time() >= linger_until:
            for connection in list(state.connections):
                connection.finish_shutdown()
        await asyncio.sleep(0.02)
    for connection in list(state.connections):
        connection.transport.abort()
    if request_log is not None:
        request_log.close(time.time())
    log_event("worker_stopped", aborted=len(state.connections))


async def _start_control(
    settings: Settings,
    control: Control,
    admin: AdminSockets | None,
    telemetry: Telemetry,
    keys: Keys,
    *,
    approvals_watch: bool,
) -> tuple[list[asyncio.Server], list[asyncio.Task[None]]]:
    """The control plane's listeners, watches and event clock, on the running loop.

    `approvals_watch`: workers in other processes send scheduled-event approvals through the bus.
    """
    servers = await admin.serve(control, settings.backlog, telemetry, keys) if admin is not None else []
    tasks = [asyncio.ensure_future(control.run_event_clock())]
    if settings.data_dir is not None:
        tasks.append(await control.start_data_dir_watch(settings.data_dir))
    if approvals_watch:
        tasks.append(await control.start_approvals_watch())
    return servers, tasks


async def _run_control(
    settings: Settings,
    bus: Bus,
    admin: AdminSockets | None,
    on_ready: Callable[[], None],
    telemetry: Telemetry,
    *,
    keys: Keys,
) -> None:
    """The control process of a multi-worker server: admin API, data sources, SIGHUP."""
    loop = asyncio.get_running_loop()
    EVENT_LOG.configure(role="control")
    EVENT_LOG.counters, EVENT_LOG.suppressed_slot = telemetry.counters, LAYOUT.log_suppressed
    control = prepare_control(settings, bus)  # from the bus: a restarted control resumes the generations
    telemetry.control = control
    servers, tasks = await _start_control(settings, control, admin, telemetry, keys, approvals_watch=True)

    def tick() -> None:
        EVENT_LOG.tick()
        telemetry.publish(len(control.registry.live()))
        loop.call_later(TICK_INTERVAL_S, tick)

    tick()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload_sources, settings, control)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    gc.freeze()  # as in the workers: the loaded VMs stay out of every collection (tuning.md)
    log_event("control_ready", vms=len(control.registry.live()))
    on_ready()
    await stopping.wait()
    for task in tasks:
        task.cancel()
    for server in servers:
        server.close()


def serve(settings: Settings) -> int:
    """Run the server until SIGTERM; returns the process exit code.

    0: stopped by a signal; 1: could not listen or workers failed; 2: bad data.
    """
    EVENT_LOG.configure(path=settings.log_file, role="server" if settings.workers == 1 else "supervisor")
    settings, fd_report = fit_fd_limit(settings)
    log_event("config", **settings.describe())
    log_event("fd_limit", **fd_report)
    bus = Bus(settings.state_dir, durable=True) if settings.state_dir is not None else Bus.private()
    admin: AdminSockets | None = None  # bound below; only what was bound here is removed at exit
    try:
        try:
            control = prepare_control(settings, bus)
            control.rearm_faults()
        except DataError as exc:
            print(f"fastimds: cannot serve {exc.source}:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
            return 2
        except UpdateError as exc:
            print(
                f"fastimds: cannot serve {settings.data_path or 'the embedded sample'}: {exc.message}", file=sys.stderr
            )
            return 2
        try:
            # Bound without SO_REUSEPORT first: fails if anything serves the port
            # (a second fastimds included) and resolves port 0.
            sock = make_listen_socket(settings.host, settings.port, reuse_port=False)
            admin = AdminSockets(settings) if settings.admin_enabled else None
        except OSError as exc:
            print(f"fastimds: cannot listen: {exc.strerror} ({exc.filename or settings.port})", file=sys.stderr)
            return 1
        port = sock.getsockname()[1]
        admin_names = admin.describe(settings) if admin is not None else ""
        # One signer and one token key for every worker and the control's /jwks: loaded, or made
        # (RSA keygen, ~100 ms each), before any fork. A single process makes each on first use instead.
        attestor = None
        if settings.attested_cert is not None and settings.attested_key is not None:
            try:
                attestor = attested.Attestor.from_files(settings.attested_cert, settings.attested_key)
            except ValueError as exc:
                print(f"fastimds: {exc}", file=sys.stderr)
                return 2
        keys = Keys.made_now(attestor) if settings.workers > 1 else Keys(attestor)
        # Made before any fork: every process shares it (one region each, and one for the control plane).
        area = TelemetryArea(settings.workers + 1)
        if settings.workers == 1:

            def announce(registry: VmRegistry) -> None:
                print(_ready_line(settings, port, registry, admin_names), flush=True)

            telemetry = Telemetry(area, 0, settings.telemetry, workers=1)
            uvloop.run(
                _run_worker(settings, bus, sock, announce, control=control, admin=admin, telemetry=telemetry, keys=keys)
            )
            return 0
        sock.close()
        ready_line = _ready_line(replace(settings, port=port), port, control.registry, admin_names)
        return Supervisor(replace(settings, port=port), bus, admin, ready_line, area, keys=keys).run()
    finally:
        if settings.state_dir is None:
            shutil.rmtree(bus.directory, ignore_errors=True)
        if admin is not None and os.getpid() == _MAIN_PID:
            admin.remove_unix_file(settings)


_MAIN_PID = os.getpid()


_FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


class Supervisor:
    """Forks the workers, forwards signals to them, restarts the ones that die."""

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        admin: AdminSockets | None,
        ready_line: str,
        area: TelemetryArea,
        *,
        keys: Keys,
    ) -> None:
        self.settings = settings
        self.keys = keys  # made before any fork: every worker and the control sign alike
        self.area = area
        self.regions: dict[int, int] = {}  # worker pid -> its telemetry region
        self.bus = bus  # where every process reads the data: restarts start from the newest
        self.admin = admin
        self.ready_line = ready_line
        self.workers: dict[int, float] = {}  # pid -> start time
        self.control_pid = 0
        self.stopping = False
        self.ready_read, self.ready_write = os.pipe()
        os.set_blocking(self.ready_write, False)

    def run(self) -> int:
        # Handlers go in before any fork, so no signal can kill the supervisor
        # and orphan workers that are already serving.
        for signum in _FORWARDED_SIGNALS:
            signal.signal(signum, self._on_signal)
        # Reserves the port for the workers' SO_REUSEPORT group until they have bound it.
        placeholder = make_listen_socket(self.settings.host, self.settings.port, reuse_port=True)
        try:
            self._spawn_control()
            for _ in range(self.settings.workers):
                self._spawn(placeholder)
            ready = self._wait_ready(self.settings.workers + 1)
        finally:
            placeholder.close()
        if ready:
            print(self.ready_line, flush=True)
        elif not self.stopping:
            log_event("workers_not_ready", timeout_s=WORKER_START_TIMEOUT_S)
            self._signal_workers(signal.SIGKILL)
        code = self._reap()
        return code if ready or self.stopping else 1

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            # Only the control process reloads; workers follow the bus.
            if self.control_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.control_pid, signal.SIGHUP)
            return
        self.stopping = True
        self._signal_workers(signal.SIGTERM)

    def _signal_workers(self, signum: int) -> None:
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _spawn(self, placeholder: socket.socket | None = None, region: int | None = None) -> None:
        if region is None:
            region = min(set(range(self.settings.workers)) - set(self.regions.values()))

        def work() -> None:
            if placeholder is not None:
                placeholder.close()
            if self.admin is not None:
                for sock in (self.admin.unix, self.admin.tcp):
                    if sock is not None:
                        sock.close()
            listener = make_listen_socket(self.settings.host, self.settings.port, reuse_port=True)
            ready = self.ready_write
            telemetry = Telemetry(self.area, region, self.settings.telemetry, workers=self.settings.workers)
            worker = _run_worker(
                self.settings,
                self.bus,
                listener,
                lambda _r: _report_ready(ready),
                control=None,
                admin=None,
                telemetry=telemetry,
                keys=self.keys,
            )
            uvloop.run(worker)

        pid = self._fork("worker", work)
        self.workers[pid] = time.monotonic()
        self.regions[pid] = region

    def _spawn_control(self) -> None:
        def control() -> None:
            ready = self.ready_write
            telemetry = Telemetry(
                self.area, self.settings.workers, self.settings.telemetry, workers=self.settings.workers
            )
            uvloop.run(
                _run_control(
                    self.settings, self.bus, self.admin, lambda: _report_ready(ready), telemetry, keys=self.keys
                )
            )

        self.control_pid = self._fork("control", control)
        self.workers[self.control_pid] = time.monotonic()

    def _fork(self, role: str, body: Callable[[], None]) -> int:
        # Block forwarded signals across fork: the child must not run the
        # supervisor's handler, and the parent handles them after, with the
        # new pid known.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED_SIGNALS)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED_SIGNALS)
            return pid
        code = 1
        try:
            # Until its loop installs handlers, a new process ignores SIGHUP (it
            # starts from the newest data anyway) and dies on SIGTERM.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED_SIGNALS)
            os.close(self.ready_read)
            body()
            code = 0
        except BaseException as exc:  # a child must report, then exit
            log_event(f"{role}_crashed", error=repr(exc))
        finally:
            os._exit(code)

    def _wait_ready(self, count: int) -> bool:
        give_up_at = time.monotonic() + WORKER_START_TIMEOUT_S
        seen = 0
        while seen < count and not self.stopping:
            remaining = give_up_at - time.monotonic()
            if remaining <= 0:
                return False
            if select.select([self.ready_read], [], [], min(remaining, 0.1))[0]:
                seen += len(os.read(self.ready_read, count - seen))
        return seen >= count

    def _reap(self) -> int:
        """Wait for every worker; restart those that die while not stopping."""
        quick_deaths = 0
        while self.workers:
            pid, status = os.wait()
            started = self.workers.pop(pid, None)
            if started is None or self.stopping:
                continue
            role = "control" if pid == self.control_pid else "worker"
            log_event(f"{role}_exited", child_pid=pid, status=os.waitstatus_to_exitcode(status))
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < CRASH_LOOP_WINDOW_S else 0
            if quick_deaths >= CRASH_LOOP_LIMIT:
                log_event("crash_loop", restarts=quick_deaths)
                self.stopping = True
                self._signal_workers(signal.SIGTERM)
                continue
            if role == "control":
                self._spawn_control()
            else:
                self._spawn(region=self.regions.pop(pid))  # the replacement continues its counters
        return 1 if quick_deaths >= CRASH_LOOP_LIMIT else 0


def _report_ready(ready_write: int) -> None:
    # A worker restarted after startup has nobody reading; never block on it.
    with contextlib.suppress(BlockingIOError, BrokenPipeError):
        os.write(ready_write, b"!")

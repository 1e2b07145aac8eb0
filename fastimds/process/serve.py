"""`fastimds serve`: build everything once, then run one process or a supervised group.

Rules of this module:
- With one worker, one process runs both parts (fastimds.process.loop): the
  control plane and the Worker, whose in-process Follower the control
  hands every write to. With `--workers N` a supervisor
  (fastimds.process.supervisor) forks N workers and one control process
  that owns the admin listeners and the sources; workers follow the bus.
  The update path is the same either way: Control -> bus -> Follower.
- Everything shared is made before any fork: the port check, the admin
  sockets, the update bus directory, the telemetry area and the signing keys.
- Each process has one EventLog (a forked child keeps its parent's and
  names its own role), passed to everything that logs.
- A bad --data file or one that conflicts with saved VMs refuses the start
  (exit 2), as do unusable attested keys; a port or admin socket in use is
  exit 1. Exactly one line goes to stdout, when the server accepts
  connections.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import uvloop

from fastimds import build_kind
from fastimds.bus.approvals import BusApprovals
from fastimds.bus.files import Bus
from fastimds.bus.follower import Follower
from fastimds.config import Settings
from fastimds.control.admin_api import AdminApi
from fastimds.control.plane import ControlPlane
from fastimds.control.writer import Control, UpdateError
from fastimds.imds.attested import Attestor
from fastimds.imds.datafile import DataError
from fastimds.imds.faults import MAX_FAULTS, FaultBudgets
from fastimds.imds.keys import Keys
from fastimds.imds.registry import VmRegistry
from fastimds.imds.store import DEFAULT_VM_ID
from fastimds.ops.event_log import EventLog
from fastimds.ops.scrape import Telemetry
from fastimds.ops.telemetry import LAYOUT, TelemetryArea, VmState
from fastimds.process.allocator import fix_mmap_threshold
from fastimds.process.control_part import ControlPart
from fastimds.process.loop import run_process
from fastimds.process.sockets import AdminSockets, fit_fd_limit, make_listen_socket, url
from fastimds.process.supervisor import Supervisor
from fastimds.process.worker import Worker
from fastimds.sources.base import Source, SourceStatus
from fastimds.sources.data_dir import DataDirSource
from fastimds.sources.data_file import DataFileSource


def serves_data_file(settings: Settings, bus: Bus) -> bool:
    """Single-VM mode: --data, or nothing configured and no saved VMs but the default one.

    A restart with only --state-dir serves what was saved, not the embedded sample.
    """
    if settings.data_dir is not None or settings.etcd is not None:
        return False
    return settings.data_path is not None or set(bus.ids()) <= {DEFAULT_VM_ID}


def prepare_control(
    settings: Settings, bus: Bus, log: EventLog, default_vm_id: str | None, budgets: FaultBudgets
) -> tuple[ControlPlane, list[Source]]:
    """The control plane with the last good state loaded, then every configured source.

    Raises DataError on a bad --data and UpdateError when it conflicts with saved VMs.
    """
    single = serves_data_file(settings, bus)
    plane = ControlPlane.over(bus, log, default_vm_id, budgets)
    sources: list[Source] = []
    if settings.etcd is not None:
        from fastimds.sources.etcd import EtcdSource  # gRPC is loaded in fleet mode only

        sources.append(EtcdSource(settings.etcd, plane.control, log))
    if settings.data_dir is not None:
        sources.append(DataDirSource(settings.data_dir, plane.control, log))
    elif single:
        sources.append(DataFileSource(settings.data_path, plane.control, log))
    for source in sources:
        source.load()
    return plane, sources


# What fleet mode without --state-dir costs, said once at start.
NO_STATE_DIR_WARNING = (
    "fleet mode without --state-dir: nothing is saved, so a restart while etcd is unreachable serves no VMs "
    "until etcd answers (with --state-dir it serves the last good data at once)"
)


def _ready_line(settings: Settings, port: int, control: Control, admin: str) -> str:
    default = control.vm(control.model.default_vm_id) if control.model.default_vm_id is not None else None
    vm_id = default.instance.get("compute", {}).get("vmId", "") if default is not None else ""
    data = settings.data_dir or (default.source if default is not None else "")
    return (
        f"fastimds listening on {url(settings.host, port)} workers={settings.workers} "
        f"vms={len(control.live_ids())} vmId={vm_id} admin={admin or '-'} data={data}"
    )


@dataclass(frozen=True)
class Shared:
    """What serve() makes once, before any fork, for every process of the server."""

    settings: Settings
    bus: Bus
    keys: Keys
    log: EventLog
    area: TelemetryArea
    admin: AdminSockets | None
    default_vm_id: str | None
    budgets: FaultBudgets  # fault counts, in memory every process shares

    def telemetry(self, region: int) -> Telemetry:
        telemetry = Telemetry(self.area, region, self.settings.telemetry, workers=self.settings.workers)
        self.log.count_into(telemetry.counters, LAYOUT.log_suppressed)
        return telemetry

    def control_part(
        self,
        plane: ControlPlane,
        sources: list[Source],
        telemetry: Telemetry,
        vms_served: Callable[[], int],
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
        *,
        watch_approvals: bool,
    ) -> ControlPart:
        """The control plane's part, its admin API reading the control's own model for per-VM state.

        Readiness also needs every source synced (a whole view of its store to serve), and says where
        each stands; a source that lost its store but serves its last good data keeps it ready.
        """
        control = plane.control

        def source_statuses() -> list[SourceStatus]:
            return [source.status() for source in sources]

        def ready_with_sources() -> tuple[bool, dict[str, Any]]:
            ready, detail = readiness()
            statuses = source_statuses()
            now = time.time()
            return ready and all(status.synced for status in statuses), {
                **detail,
                "sources": [status.describe(now) for status in statuses],
            }

        def vms() -> list[VmState]:
            now = time.time()
            return [
                VmState(vm_id, record.generation, now - record.changed_at, True)
                for vm_id, record in sorted(control.model.records.items())
                if record.vm is not None
            ]

        def metrics() -> bytes:
            return telemetry.metrics(vms, lambda: dict(control.updates), vms_served, source_statuses)

        api = AdminApi(
            plane,
            self.settings.admin_token,
            self.keys,
            metrics=metrics if telemetry.counters is not None else None,
            readiness=ready_with_sources,
            counters=telemetry.counters,
        )
        return ControlPart(
            plane,
            sources,
            admin=self.admin,
            api=api,
            backlog=self.settings.backlog,
            log=self.log,
            watch_approvals=watch_approvals,
        )


def run_single(
    shared: Shared, sock: socket.socket, plane: ControlPlane, sources: list[Source], on_ready: Callable[[], None]
) -> None:
    """One process: the Worker and the control plane on one loop; each write is applied in-process at once."""
    log = shared.log
    telemetry = shared.telemetry(0)
    follower = Follower(shared.bus, VmRegistry(shared.default_vm_id), log, shared.budgets)
    plane.control.attach(follower)
    # The same bus files as a group's, handed over in-process instead of through watches: a watch is a
    # thread that wakes every few ms, ~5% more CPU per request measured (tuning.md).
    approvals = BusApprovals(shared.bus.directory, shared.bus.durable, written=plane.clock.apply_approvals, log=log)
    worker = Worker(
        shared.settings,
        follower,
        sock,
        telemetry=telemetry,
        keys=shared.keys,
        log=log,
        approvals=approvals,
        watch_bus=False,
    )
    # Ready at once: the only worker is this process, which applies every write before it is acknowledged.
    control = shared.control_part(
        plane, sources, telemetry, worker.vms_served, readiness=lambda: (True, {}), watch_approvals=False
    )
    uvloop.run(run_process([worker, control], log, telemetry, worker.vms_served, on_ready))


def run_control_process(shared: Shared, on_ready: Callable[[], None]) -> None:
    """The control process of a multi-worker server: admin API, sources, event clock, SIGHUP."""
    settings, log = shared.settings, shared.log
    log.configure(role="control")
    telemetry = shared.telemetry(settings.workers)
    # From the bus: a restarted control process resumes the generations.
    plane, sources = prepare_control(settings, shared.bus, log, shared.default_vm_id, shared.budgets)

    def vms_served() -> int:
        return len(plane.control.live_ids())

    def readiness() -> tuple[bool, dict[str, Any]]:
        return telemetry.readiness(expected_vms=vms_served())

    part = shared.control_part(plane, sources, telemetry, vms_served, readiness, watch_approvals=True)
    uvloop.run(run_process([part], log, telemetry, vms_served, on_ready))


def run_worker_process(shared: Shared, region: int, listener: socket.socket, on_ready: Callable[[], None]) -> None:
    """One worker of a multi-worker server: it follows the bus."""
    log = shared.log
    log.configure(role=f"worker {region}")
    telemetry = shared.telemetry(region)
    follower = Follower(shared.bus, VmRegistry(shared.default_vm_id), log, shared.budgets)
    worker = Worker(
        shared.settings,
        follower,
        listener,
        telemetry=telemetry,
        keys=shared.keys,
        log=log,
        approvals=BusApprovals(shared.bus.directory, shared.bus.durable, log=log),
        watch_bus=True,
    )
    uvloop.run(run_process([worker], log, telemetry, worker.vms_served, on_ready))


def serve(settings: Settings) -> int:
    """Run the server until SIGTERM; returns the process exit code.

    0: stopped by a signal; 1: could not listen or workers failed; 2: bad data.
    """
    main_pid = os.getpid()
    log = EventLog()  # this process's one log; a forked child keeps it and names its own role
    log.configure(path=settings.log_file, role="server" if settings.workers == 1 else "supervisor")
    settings, fd_report = fit_fd_limit(settings)
    fix_mmap_threshold()  # before any fork: every process frees big buffers back to the system
    log.event("config", build=build_kind(), **settings.describe())  # "mypyc" or "python" (docs/architecture.md)
    log.event("fd_limit", **fd_report)
    bus = Bus(settings.state_dir, durable=True, log=log) if settings.state_dir is not None else Bus.private(log)
    admin: AdminSockets | None = None  # bound below; only what was bound here is removed at exit
    try:
        default_vm_id = DEFAULT_VM_ID if serves_data_file(settings, bus) else settings.default_vm
        # Made before any fork: every process takes fault counts from the same shared memory.
        budgets = FaultBudgets(MAX_FAULTS)
        try:
            plane, sources = prepare_control(settings, bus, log, default_vm_id, budgets)
            plane.faults.rearm()
            if settings.etcd is not None and settings.state_dir is None:
                print(f"fastimds: warning: {NO_STATE_DIR_WARNING}", file=sys.stderr)
                log.event("etcd_without_state_dir", cost=NO_STATE_DIR_WARNING)
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
        try:
            attestor = (
                Attestor.from_files(settings.attested_cert, settings.attested_key)
                if settings.attested_cert is not None and settings.attested_key is not None
                else None
            )
        except ValueError as exc:
            print(f"fastimds: {exc}", file=sys.stderr)
            return 2
        # One signer and one token key for every worker, and the control's /jwks: made
        # (RSA keygen, ~100 ms) before any fork. A single process makes each on first use.
        keys = Keys.made_now(attestor) if settings.workers > 1 else Keys(attestor)
        # Made before any fork: every process shares it (one region each, and one for the control plane).
        area = TelemetryArea(settings.workers + 1)
        if settings.workers == 1:

            def announce() -> None:
                print(_ready_line(settings, port, plane.control, admin_names), flush=True)

            shared = Shared(settings, bus, keys, log, area, admin, default_vm_id, budgets)
            run_single(shared, sock, plane, sources, announce)
            return 0
        sock.close()
        settings = replace(settings, port=port)
        shared = Shared(settings, bus, keys, log, area, admin, default_vm_id, budgets)
        return Supervisor(
            settings,
            log,
            _ready_line(settings, port, plane.control, admin_names),
            run_worker=lambda region, listener, on_ready: run_worker_process(shared, region, listener, on_ready),
            run_control=lambda on_ready: run_control_process(shared, on_ready),
            control_only=admin.sockets() if admin is not None else [],
        ).run()
    finally:
        if settings.state_dir is None:
            shutil.rmtree(bus.directory, ignore_errors=True)
        if admin is not None and os.getpid() == main_pid:
            admin.remove_unix_file(settings)

"""Event loop, listeners, workers, the once-a-second tick, signals, shutdown.

Rules of this module:
- One worker is one process running one uvloop loop; with `--workers N` a
  supervisor forks N workers that each bind the same port with SO_REUSEPORT,
  so the kernel spreads connections and no worker shares an accept queue.
- The supervisor never runs an event loop (fork safety). It forwards SIGHUP
  and SIGTERM to the workers and restarts a worker that dies unexpectedly.
- SIGHUP re-reads the data file and publishes a new snapshot; an invalid file
  is refused with a log line naming every problem, and the old snapshot keeps
  serving. SIGTERM stops accepting, lets in-flight replies finish (with
  `Connection: close`), closes idle connections and exits 0.
- Exactly one line goes to stdout, when the server is accepting connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import uvloop

from fastimds.config import Settings
from fastimds.datafile import DataError, VmDescription, load_vm
from fastimds.log import log_event
from fastimds.protocol import HttpProtocol, ServerState
from fastimds.registry import VmRegistry
from fastimds.store import DEFAULT_VM_ID

TICK_INTERVAL_S = 1.0
# Workers must report ready within this, or the supervisor gives up.
WORKER_START_TIMEOUT_S = 15.0
# A worker that dies this soon after starting, this many times in a row, is
# not restarted again: something is wrong with every start, not with one.
CRASH_LOOP_WINDOW_S = 2.0
CRASH_LOOP_LIMIT = 5


def make_listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _ready_line(settings: Settings, port: int, vm: VmDescription) -> str:
    return (
        f"fastimds listening on {_url(settings.host, port)} workers={settings.workers} "
        f"vmId={vm.instance.get('compute', {}).get('vmId', '')} data={vm.source}"
    )


def reload_data(settings: Settings, registry: VmRegistry) -> None:
    """SIGHUP: re-read --data and publish it, or refuse and keep serving."""
    try:
        vm = load_vm(settings.data_path)
    except DataError as exc:
        log_event(
            "reload_refused",
            source=exc.source,
            problems=exc.problems,
            serving_generation=registry.default.generation,
        )
        return
    snapshot = registry.publish(DEFAULT_VM_ID, vm)
    log_event("reload_published", source=vm.source, generation=snapshot.generation)


async def _run_worker(settings: Settings, vm: VmDescription, sock: socket.socket, on_ready: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    registry = VmRegistry.single(vm)
    state = ServerState(registry, settings.limits, loop.time(), time.time())
    server = await loop.create_server(lambda: HttpProtocol(state), sock=sock, backlog=settings.backlog)

    def tick() -> None:
        unix_time = time.time()
        state.tick(loop.time(), unix_time)
        # Fire just after the next wall-clock second, so Date is never stale by more than a tick.
        loop.call_later(TICK_INTERVAL_S - unix_time % TICK_INTERVAL_S + 0.001, tick)

    tick()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload_data, settings, registry)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    # Everything built so far lives as long as the process: keep it out of
    # the collector's generations so collections stay cheap (tuning.md).
    gc.freeze()
    log_event("worker_ready", vms=len(registry.live()))
    on_ready()
    await stopping.wait()

    state.draining = True
    server.close()
    for connection in list(state.connections):
        connection.shutdown()
    give_up_at = loop.time() + settings.shutdown_grace_s
    while state.connections and loop.time() < give_up_at:
        await asyncio.sleep(0.02)
    for connection in list(state.connections):
        connection.transport.abort()
    log_event("worker_stopped", aborted=len(state.connections))


def serve(settings: Settings) -> int:
    """Run the server until SIGTERM; returns the process exit code.

    0: stopped by a signal; 1: could not listen or workers failed; 2: bad data.
    """
    try:
        vm = load_vm(settings.data_path)
    except DataError as exc:
        print(f"fastimds: cannot serve {exc.source}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    try:
        # Bound without SO_REUSEPORT first: fails if anything serves the port
        # (a second fastimds included) and resolves port 0.
        sock = make_listen_socket(settings.host, settings.port, reuse_port=False)
    except OSError as exc:
        print(f"fastimds: cannot listen on {_url(settings.host, settings.port)}: {exc.strerror}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    if settings.workers == 1:
        uvloop.run(_run_worker(settings, vm, sock, lambda: _announce(settings, port, vm)))
        return 0
    sock.close()
    return Supervisor(replace(settings, port=port), vm).run()


def _announce(settings: Settings, port: int, vm: VmDescription) -> None:
    print(_ready_line(settings, port, vm), flush=True)


_FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


class Supervisor:
    """Forks the workers, forwards signals to them, restarts the ones that die."""

    def __init__(self, settings: Settings, vm: VmDescription) -> None:
        self.settings = settings
        self.vm = vm  # the newest good data: what a restarted worker starts with
        self.workers: dict[int, float] = {}  # pid -> start time
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
            for _ in range(self.settings.workers):
                self._spawn(placeholder)
            ready = self._wait_ready(self.settings.workers)
        finally:
            placeholder.close()
        if ready:
            print(_ready_line(self.settings, self.settings.port, self.vm), flush=True)
        elif not self.stopping:
            log_event("workers_not_ready", timeout_s=WORKER_START_TIMEOUT_S)
            self._signal_workers(signal.SIGKILL)
        code = self._reap()
        return code if ready or self.stopping else 1

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            # Workers re-read the file themselves; the supervisor re-reads it too,
            # so a worker restarted later starts from the newest good data.
            with contextlib.suppress(DataError):
                self.vm = load_vm(self.settings.data_path)
        else:
            self.stopping = True
            signum = signal.SIGTERM
        self._signal_workers(signum)

    def _signal_workers(self, signum: int) -> None:
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _spawn(self, placeholder: socket.socket | None = None) -> None:
        # Block forwarded signals across fork: the child must not run the
        # supervisor's handler, and the parent handles them after, with the
        # new pid known.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED_SIGNALS)
        pid = os.fork()
        if pid:
            self.workers[pid] = time.monotonic()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED_SIGNALS)
            return
        code = 1
        try:
            # Until its loop installs handlers, a new worker ignores SIGHUP (it
            # starts from the newest data anyway) and dies on SIGTERM.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED_SIGNALS)
            os.close(self.ready_read)
            if placeholder is not None:
                placeholder.close()
            sock = make_listen_socket(self.settings.host, self.settings.port, reuse_port=True)
            uvloop.run(_run_worker(self.settings, self.vm, sock, lambda: _report_ready(self.ready_write)))
            code = 0
        except BaseException as exc:  # a worker must report, then exit
            log_event("worker_crashed", error=repr(exc))
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
            log_event("worker_exited", worker_pid=pid, status=os.waitstatus_to_exitcode(status))
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < CRASH_LOOP_WINDOW_S else 0
            if quick_deaths >= CRASH_LOOP_LIMIT:
                log_event("crash_loop", restarts=quick_deaths)
                self.stopping = True
                self._signal_workers(signal.SIGTERM)
                continue
            self._spawn()
        return 1 if quick_deaths >= CRASH_LOOP_LIMIT else 0


def _report_ready(ready_write: int) -> None:
    # A worker restarted after startup has nobody reading; never block on it.
    with contextlib.suppress(BlockingIOError, BrokenPipeError):
        os.write(ready_write, b"!")

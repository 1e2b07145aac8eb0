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
import gc
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable

import uvloop

from fastimds.config import Settings
from fastimds.datafile import DataError, VmDescription, load_vm
from fastimds.log import log_event
from fastimds.protocol import HttpProtocol, ServerState
from fastimds.store import SnapshotStore

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


def reload_data(settings: Settings, store: SnapshotStore) -> None:
    """SIGHUP: re-read --data and publish it, or refuse and keep serving."""
    try:
        vm = load_vm(settings.data_path)
    except DataError as exc:
        log_event(
            "reload_refused",
            source=exc.source,
            problems=exc.problems,
            serving_generation=store.current.generation,
        )
        return
    snapshot = store.publish(vm)
    log_event("reload_published", source=vm.source, generation=snapshot.generation)


async def _run_worker(settings: Settings, vm: VmDescription, sock: socket.socket, on_ready: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    store = SnapshotStore(vm)
    state = ServerState(store, settings.limits, loop.time(), time.time())
    server = await loop.create_server(lambda: HttpProtocol(state), sock=sock, backlog=settings.backlog)

    def tick() -> None:
        unix_time = time.time()
        state.tick(loop.time(), unix_time)
        # Fire just after the next wall-clock second, so Date is never stale by more than a tick.
        loop.call_later(TICK_INTERVAL_S - unix_time % TICK_INTERVAL_S + 0.001, tick)

    tick()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload_data, settings, store)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    # Everything built so far lives as long as the process: keep it out of
    # the collector's generations so collections stay cheap (tuning.md).
    gc.freeze()
    log_event("worker_ready", generation=store.current.generation)
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
    """Run the server until SIGTERM; returns the process exit code."""
    try:
        vm = load_vm(settings.data_path)
    except DataError as exc:
        print(f"fastimds: cannot serve {exc.source}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    if settings.workers == 1:
        sock = make_listen_socket(settings.host, settings.port, reuse_port=False)
        port = sock.getsockname()[1]
        uvloop.run(_run_worker(settings, vm, sock, lambda: _announce(settings, port, vm)))
        return 0
    return _supervise(settings, vm)


def _announce(settings: Settings, port: int, vm: VmDescription) -> None:
    print(_ready_line(settings, port, vm), flush=True)


def _supervise(settings: Settings, vm: VmDescription) -> int:
    # Bound, never listened on: it reserves the port (resolving port 0) until
    # the workers have bound their own SO_REUSEPORT sockets to it.
    placeholder = make_listen_socket(settings.host, settings.port, reuse_port=True)
    port = placeholder.getsockname()[1]
    ready_read, ready_write = os.pipe()
    workers: dict[int, float] = {}  # pid -> start time

    def spawn() -> None:
        pid = os.fork()
        if pid:
            workers[pid] = time.monotonic()
            return
        code = 1
        try:
            os.close(ready_read)
            placeholder.close()
            for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            sock = make_listen_socket(settings.host, port, reuse_port=True)
            uvloop.run(_run_worker(settings, vm, sock, lambda: _report_ready(ready_write)))
            code = 0
        except BaseException as exc:  # a worker must report, then exit
            log_event("worker_crashed", error=repr(exc))
        finally:
            os._exit(code)

    for _ in range(settings.workers):
        spawn()
    if not _wait_ready(ready_read, settings.workers):
        log_event("workers_not_ready", timeout_s=WORKER_START_TIMEOUT_S)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        return 1
    placeholder.close()
    print(_ready_line(settings, port, vm), flush=True)

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
            signum = signal.SIGTERM
        for pid in list(workers):
            os.kill(pid, signum)

    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)

    quick_deaths = 0
    while workers:
        pid, status = os.wait()
        started = workers.pop(pid, None)
        if started is None or stopping:
            continue
        log_event("worker_exited", worker_pid=pid, status=os.waitstatus_to_exitcode(status))
        quick_deaths = quick_deaths + 1 if time.monotonic() - started < CRASH_LOOP_WINDOW_S else 0
        if quick_deaths >= CRASH_LOOP_LIMIT:
            log_event("crash_loop", restarts=quick_deaths)
            forward(signal.SIGTERM, None)
            continue
        spawn()
    return 1 if quick_deaths >= CRASH_LOOP_LIMIT else 0


def _report_ready(ready_write: int) -> None:
    os.write(ready_write, b"!")


def _wait_ready(ready_read: int, count: int) -> bool:
    give_up_at = time.monotonic() + WORKER_START_TIMEOUT_S
    seen = 0
    while seen < count:
        remaining = give_up_at - time.monotonic()
        if remaining <= 0 or not select.select([ready_read], [], [], remaining)[0]:
            return False
        seen += len(os.read(ready_read, count - seen))
    return True

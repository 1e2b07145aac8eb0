"""The supervisor of a multi-worker server: forks the control process and the workers, watches them.

Rules of this module:
- The supervisor never runs an event loop (fork safety). Signal handlers go
  in before any fork, so no signal can kill it and orphan workers that are
  already serving.
- It restarts any child that dies unexpectedly (a worker keeps its telemetry
  region), sends SIGHUP to the control process only (workers follow the bus)
  and SIGTERM to everyone.
- A worker that dies soon after starting, CRASH_LOOP_LIMIT times in a row,
  is not restarted again: something is wrong with every start.
- Exactly one line goes to stdout, when every child is ready.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from fastimds.config import Settings
from fastimds.ops.event_log import EventLog
from fastimds.process.sockets import make_listen_socket

# Workers must report ready within this, or the supervisor gives up.
WORKER_START_TIMEOUT_S = 15.0
# A worker that dies this soon after starting, this many times in a row, is
# not restarted again: something is wrong with every start, not with one.
CRASH_LOOP_WINDOW_S = 2.0
CRASH_LOOP_LIMIT = 5

_FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)

# What a child runs: given a way to report it is ready (a worker also its telemetry region).
RunWorker = Callable[[int, socket.socket, Callable[[], None]], None]
RunControl = Callable[[Callable[[], None]], None]


class Supervisor:
    """Forks the workers, forwards signals to them, restarts the ones that die."""

    def __init__(
        self,
        settings: Settings,
        log: EventLog,
        ready_line: str,
        *,
        run_worker: RunWorker,
        run_control: RunControl,
        control_only: list[socket.socket],
    ) -> None:
        self.settings = settings
        self.log = log
        self.ready_line = ready_line
        self.run_worker = run_worker
        self.run_control = run_control
        self.control_only = control_only  # sockets a worker closes at once (the admin listeners)
        self.regions: dict[int, int] = {}  # worker pid -> its telemetry region
        self.workers: dict[int, float] = {}  # pid -> start time
        self.control_pid = 0
        self.stopping = False
        self.ready_read, self.ready_write = os.pipe()
        os.set_blocking(self.ready_write, False)

    def run(self) -> int:
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
            self.log.event("workers_not_ready", timeout_s=WORKER_START_TIMEOUT_S)
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

    def _report_ready(self) -> None:
        # A worker restarted after startup has nobody reading; never block on it.
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self.ready_write, b"!")

    def _spawn(self, placeholder: socket.socket | None = None, region: int | None = None) -> None:
        if region is None:
            region = min(set(range(self.settings.workers)) - set(self.regions.values()))
        chosen = region

        def work() -> None:
            if placeholder is not None:
                placeholder.close()
            for sock in self.control_only:
                sock.close()
            listener = make_listen_socket(self.settings.host, self.settings.port, reuse_port=True)
            self.run_worker(chosen, listener, self._report_ready)

        pid = self._fork("worker", work)
        self.workers[pid] = time.monotonic()
        self.regions[pid] = region

    def _spawn_control(self) -> None:
        self.control_pid = self._fork("control", lambda: self.run_control(self._report_ready))
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
            self.log.event(f"{role}_crashed", error=repr(exc))
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
            self.log.event(f"{role}_exited", child_pid=pid, status=os.waitstatus_to_exitcode(status))
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < CRASH_LOOP_WINDOW_S else 0
            if quick_deaths >= CRASH_LOOP_LIMIT:
                self.log.event("crash_loop", restarts=quick_deaths)
                self.stopping = True
                self._signal_workers(signal.SIGTERM)
                continue
            if role == "control":
                self._spawn_control()
            else:
                self._spawn(region=self.regions.pop(pid))  # the replacement continues its counters
        return 1 if quick_deaths >= CRASH_LOOP_LIMIT else 0

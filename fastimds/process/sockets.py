"""The listening sockets: the VM-facing port, the admin listeners, and the open-files limit they fit under.

Rules of this module:
- Everything here is made before any fork: the port check, the admin
  sockets, the fd limit. Workers bind the port again with SO_REUSEPORT, so
  the kernel spreads connections and no worker shares an accept queue.
- At start the open-files soft limit is raised to the hard limit and the
  per-worker connection limit is lowered, if need be, to fit under it with
  FD_RESERVE to spare (`fit_fd_limit`), so every refusal can still be
  accepted and answered, and every descriptor the admin listeners may hold
  (their caps, fastimds.control.admin_connection) is kept out of it.
- The admin Unix socket is created 0600, and removed at stop only if the
  file is still the one bound here: never another server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastimds.config import Settings
from fastimds.control.admin_api import AdminApi
from fastimds.control.admin_connection import (
    MAX_ADMIN_DESCRIPTORS,
    MAX_ADMIN_TCP_CONNECTIONS,
    MAX_ADMIN_UNIX_CONNECTIONS,
    AdminListener,
)
from fastimds.http.connection import MAX_LINGERING_REFUSALS
from fastimds.ops.event_log import EventLog

# Descriptors a worker keeps out of its connection limit: its own (listener,
# bus and log files, inotify, pipes: well under 64), the refused
# connections that linger until their 503 is read, and every admin
# connection the admin listeners' caps allow (in a single process they share
# the worker's descriptors; counted for every process, which costs a worker
# 112 connections of its tens of thousands).
FD_RESERVE = 64 + MAX_LINGERING_REFUSALS + MAX_ADMIN_DESCRIPTORS


def make_listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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
        self.listeners: list[AdminListener] = []  # while serving: each listener's connections, for the sweep
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

    def sockets(self) -> list[socket.socket]:
        return [sock for sock in (self.unix, self.tcp) if sock is not None]

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
            names.append(url("127.0.0.1", self.tcp.getsockname()[1]))
        return ",".join(names)

    async def serve(self, api: AdminApi, backlog: int, log: EventLog | None = None) -> list[asyncio.Server]:
        """Serve the admin API on each socket, each listener under its own connection cap."""
        loop = asyncio.get_running_loop()
        servers = []
        if self.unix is not None:
            unix = AdminListener(api, over_tcp=False, cap=MAX_ADMIN_UNIX_CONNECTIONS, clock=loop.time, log=log)
            self.listeners.append(unix)
            servers.append(await loop.create_unix_server(unix.factory(), sock=self.unix))
        if self.tcp is not None:
            tcp = AdminListener(api, over_tcp=True, cap=MAX_ADMIN_TCP_CONNECTIONS, clock=loop.time, log=log)
            self.listeners.append(tcp)
            servers.append(await loop.create_server(tcp.factory(), sock=self.tcp, backlog=backlog))
        return servers

    def sweep(self, loop_time: float) -> None:
        """Once a second (the control part's tick): end admin connections past their deadline."""
        for listener in self.listeners:
            listener.sweep(loop_time)

    def close_connections(self) -> None:
        for listener in self.listeners:
            listener.close_all()
        self.listeners = []

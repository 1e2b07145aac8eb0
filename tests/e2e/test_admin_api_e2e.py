"""The admin API's real Unix socket: created mode 0600 whatever the umask, and answering.

The API's routes and rules, without sockets, are in tests/unit/control/test_admin_api.py.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from tests.support.server_process import admin_unix, running_server, vm_document


def test_the_unix_socket_is_created_mode_0600(tmp_path: Path) -> None:
    socket_path = tmp_path / "admin.sock"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    stack = contextlib.ExitStack()
    old_umask = os.umask(0)  # the server must not depend on a strict umask in its environment
    try:
        server = stack.enter_context(running_server("--data-dir", str(data_dir), "--admin-socket", str(socket_path)))
    finally:
        os.umask(old_umask)
    with stack:
        assert server.admin == [f"unix:{socket_path}"]
        mode = socket_path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600, oct(stat.S_IMODE(mode))
        assert admin_unix(socket_path, "GET", "/healthz") == (200, {"status": "ok"})
        status, body = admin_unix(socket_path, "PUT", "/vms/a", vm_document("a", callers=["127.0.0.2"]))
        assert (status, body) == (201, {"id": "a", "generation": 1})
        assert admin_unix(socket_path, "GET", "/vms")[1]["vms"][0]["id"] == "a"

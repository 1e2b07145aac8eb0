"""End-to-end: a careless or hostile neighbour on the host cannot stall, starve or read the server (issue 16).

Each test runs the real `fastimds serve` and attacks it through the file
system: files in --data-dir that are not files (a FIFO, a symlink to
/dev/zero) or are huge, admin token files anyone may read or too short to
resist guessing, and log files created readable by every local user.
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastimds.imds.datafile import MAX_VM_FILE_BYTES
from tests.support.admin_token import write_token_file
from tests.support.server_process import (
    ServerProcess,
    get_from,
    log_events,
    poll_until,
    running_server,
    vm_document,
    vm_uuid,
)

INSTANCE = "/metadata/instance?api-version=2021-02-01"
BIG_FILE_BYTES = 300 * 1024 * 1024
# The reading process's peak RSS may grow by less than this while the big file is refused.
PEAK_RSS_GROWTH_BOUND_KIB = 50 * 1024
# A served request during the attacks, even on a loaded two-core machine.
REQUEST_BOUND_S = 1.0
# On today's main a symlink to /dev/zero is read until memory runs out: cap the
# server's address space so that failure is a MemoryError, not the machine's
# (the server's own VmSize is about 55 MB).
MEMORY_CAP = ("prlimit", f"--as={1 << 30}") if shutil.which("prlimit") else ()


def vm_seen(server: ServerProcess, caller: str) -> str | None:
    status, body = get_from(caller, server.port, INSTANCE)
    return str(json.loads(body)["compute"]["vmId"]) if status == 200 else None


def write_vm(directory: Path, vm_id: str, caller: str) -> None:
    (directory / f"{vm_id}.json").write_text(json.dumps(vm_document(vm_id, callers=[caller])))


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def refusal(server: ServerProcess, name: str) -> dict[str, object] | None:
    found = [r for r in log_events(server, "update_refused") if r.get("source") == f"data-dir:{name}"]
    return found[-1] if found else None


# ---- item 6: --data-dir files that are not files, or too big ----


def test_data_dir_refuses_fifos_devices_and_huge_files_and_keeps_serving(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_vm(data_dir, "vm1", "127.0.0.2")
    write_vm(data_dir, "vm3", "127.0.0.4")
    with running_server("--data-dir", str(data_dir), prefix=MEMORY_CAP) as server:
        assert vm_seen(server, "127.0.0.2") == vm_uuid("vm1")
        peak_before = peak_rss_kib(server.pid)

        with open(data_dir / "big.json", "wb") as big:
            big.truncate(BIG_FILE_BYTES)  # sparse: no disk and no time, but 300 MiB to whoever reads it
        os.mkfifo(data_dir / "x.json")
        (data_dir / "zero.json").symlink_to("/dev/zero")
        # A served VM's file replaced by a symlink to a device: refused, and the VM keeps its data.
        replacement = data_dir / ".vm3.tmp"
        replacement.symlink_to("/dev/zero")
        replacement.replace(data_dir / "vm3.json")

        expected = {
            "big.json": f"$: file is {BIG_FILE_BYTES} bytes, over the {MAX_VM_FILE_BYTES}-byte limit",
            "x.json": "not a regular file (a FIFO): only regular files are read",
            "zero.json": "not a regular file (a character device): only regular files are read",
            "vm3.json": "not a regular file (a character device): only regular files are read",
        }
        latencies = []
        deadline = time.monotonic() + 10
        while not all(refusal(server, name) for name in expected):
            assert time.monotonic() < deadline, f"not every file was refused: {log_events(server, 'update_refused')}"
            started = time.monotonic()
            assert vm_seen(server, "127.0.0.2") == vm_uuid("vm1")
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
        for name, problem in expected.items():
            assert refusal(server, name)["problems"] == [problem], name  # type: ignore[index]

        # The loop never stalled, the other VMs kept their data, and the watch still applies files.
        for _ in range(20):
            started = time.monotonic()
            assert vm_seen(server, "127.0.0.2") == vm_uuid("vm1")
            latencies.append(time.monotonic() - started)
        assert max(latencies) < REQUEST_BOUND_S, latencies
        assert vm_seen(server, "127.0.0.4") == vm_uuid("vm3")
        write_vm(data_dir, "vm2", "127.0.0.3")
        assert poll_until(lambda: vm_seen(server, "127.0.0.3") == vm_uuid("vm2"), timeout=5)

        growth = peak_rss_kib(server.pid) - peak_before
        print(f"\npeak RSS growth while refusing a {BIG_FILE_BYTES >> 20} MiB file, a FIFO and /dev/zero: {growth} KiB")
        assert growth < PEAK_RSS_GROWTH_BOUND_KIB, f"peak RSS grew {growth} KiB"
        assert server.proc.poll() is None


# ---- item 8: the admin token file ----


SERVE_WITH_ADMIN_PORT = (sys.executable, "-m", "fastimds", "serve", "--port", "0", "--admin-port", "0")


def serve_with_token_file(token_file: Path) -> subprocess.CompletedProcess[str]:
    """`fastimds serve --admin-port 0 --admin-token-file FILE`, expected to exit at once."""
    return subprocess.run(
        [*SERVE_WITH_ADMIN_PORT, "--admin-token-file", str(token_file)],
        capture_output=True,
        text=True,
        timeout=15,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_a_token_file_others_may_read_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    write_token_file(token_file)
    for mode in (0o644, 0o640, 0o604, 0o660, 0o666):
        token_file.chmod(mode)
        result = serve_with_token_file(token_file)
        assert result.returncode == 2, (oct(mode), result.stderr)
        assert str(token_file) in result.stderr
        assert f"mode {mode:04o}" in result.stderr, result.stderr
        assert f"chmod 600 {token_file}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_a_token_shorter_than_128_bits_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    for token in ("x", "t0ken", "0123456789abcdef0123456789abcde"):  # the last is 31 characters
        write_token_file(token_file, token)
        result = serve_with_token_file(token_file)
        assert result.returncode == 2, (token, result.stderr)
        assert str(token_file) in result.stderr
        assert f"{len(token)} characters" in result.stderr and "at least 32" in result.stderr, result.stderr
        assert "openssl rand -hex 16" in result.stderr


def test_a_private_128_bit_token_file_serves(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token = write_token_file(token_file)
    assert len(token) == 32 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    with running_server("--admin-port", "0", "--admin-token-file", str(token_file)) as server:
        assert server.admin


# ---- item 9: log files ----


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """The server inherits the test's umask: pin it to the usual 022 so a file made 0644 would show."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_the_event_log_and_request_logs_are_not_world_readable(tmp_path: Path) -> None:
    event_log = tmp_path / "events.jsonl"
    request_logs = tmp_path / "requests"
    with umask(0o022), running_server("--log-file", str(event_log), "--request-log", str(request_logs)) as server:
        assert get_from("127.0.0.1", server.port, INSTANCE)[0] == 200
        assert poll_until(lambda: any(request_logs.glob("requests.*.jsonl")), timeout=5)
    files = [event_log, *request_logs.glob("requests.*.jsonl")]
    assert len(files) >= 2
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, (path, oct(path.stat().st_mode))

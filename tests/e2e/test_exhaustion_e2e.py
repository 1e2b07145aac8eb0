"""Resource exhaustion against a real `fastimds serve` (issue #7): loopback only, bounded in time and count.

- 1,000 idle and slow-loris connections cost other clients little, and each
  is closed by its deadline.
- A client that pipelines and never reads cannot grow the worker's memory
  past a fixed bound, and is dropped after the send-stall timeout.
- Connection limits per worker and per caller refuse cleanly (a 503 the
  client reads, then end of file) and are counted and logged.
- A caller hammering one VM's address is throttled without slowing others.

Hostile clients run in their own process (tests.support.hostile_clients) so they
never hold the measuring client's interpreter. The machine is small and
shared, so latency is compared side by side: unloaded and loaded windows
alternate in rounds against the same server, and medians of rounds are
compared. The figures go to stdout (`pytest -s`) for reliability.md.
"""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastimds.ops.event_log import LOG_BURST, LOG_LINES_PER_S
from tests.support import REPO_ROOT
from tests.support.server_process import (
    RawReader,
    RawResponse,
    UnixHTTPConnection,
    get_from,
    get_request,
    log_events,
    poll_until,
    running_server,
    vm_document,
)

LEAF = "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text"
LEAF_REQUEST = get_request(LEAF, "Metadata: true")
TICK_S = 1.0  # the server's deadline sweep runs once a second
REQUEST_TIMEOUT_S = 2.0
KEEP_ALIVE_TIMEOUT_S = 2.0
SEND_STALL_TIMEOUT_S = 2.0
# How late past its deadline (and the sweep after it) a close may come on a busy, shared machine.
CLOSE_SLACK_S = 1.5


# ---- helpers ----


def percentile(values: list[int], fraction: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def open_from(source: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def socket_fds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            continue  # closed while listing
    return count


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files limit")


def low_soft_limit_prefix(soft: int) -> tuple[str, ...]:
    """Start the server with a low open-files soft limit and this process's hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return ("prlimit", f"--nofile={soft}:{hard}", "--")


def metrics(admin_socket: Path) -> dict[str, float]:
    """/metrics over the admin socket, as {"name|label=value": value}."""
    conn = UnixHTTPConnection(admin_socket)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        text = response.read().decode()
    finally:
        conn.close()
    return {
        sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class Sampler:
    """A well-behaved client: one keep-alive connection, one request at a time, timed end to end."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = open_from(source, port)
        self.reader = RawReader(self.sock)

    def one(self) -> int:
        started = time.perf_counter_ns()
        self.sock.sendall(LEAF_REQUEST)
        response = self.reader.read_response()
        elapsed = time.perf_counter_ns() - started
        assert response.status == 200, response
        return elapsed

    def close(self) -> None:
        self.sock.close()


def sample_side_by_side(ports: list[int], stop: Callable[[], bool], check_every: int = 32) -> list[list[int]]:
    """Latencies from each server in turn, one request each, until `stop()`: the same moments for every server."""
    samplers = [Sampler(port) for port in ports]
    samples: list[list[int]] = [[] for _ in ports]
    rounds = 0
    while not (rounds % check_every == 0 and stop()):
        for sampler, latencies in zip(samplers, samples, strict=True):
            latencies.append(sampler.one())
        rounds += 1
    for sampler in samplers:
        sampler.close()
    return samples


class Hostile:
    """A tests.support.hostile_clients process; its stdout lines are read without blocking the caller."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.hostile_clients", *args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
        )
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.buffer = b""
        self.lines: list[dict[str, Any]] = []

    def poll(self) -> int:
        """Read whatever arrived; returns how many lines have arrived in all."""
        while select.select([self.fd], [], [], 0)[0]:
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                break
            self.buffer += chunk
        *complete, self.buffer = self.buffer.split(b"\n")
        self.lines.extend(json.loads(line) for line in complete if line)
        return len(self.lines)

    def wait_lines(self, count: int, timeout: float) -> list[dict[str, Any]]:
        assert poll_until(lambda: self.poll() >= count, timeout=timeout), f"{self.lines} {self.proc.poll()}"
        return self.lines

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def hostiles() -> Iterator[list[Hostile]]:
    started: list[Hostile] = []
    yield started
    for hostile in started:
        hostile.close()


def report(title: str, **figures: Any) -> None:
    print(f"\n[exhaustion] {title}: " + ", ".join(f"{name}={value}" for name, value in figures.items()))


# ---- 1,000 idle and slow connections ----

LORIS_SOURCES = "127.0.1.1,127.0.1.2,127.0.1.3,127.0.1.4"  # 250 each: under the default per-caller limit
LORIS_IDLE = 500
LORIS_SLOW = 500
LORIS_ROUNDS = 3
CALIBRATION_S = 1.0
# Low enough that without raising it the server could not hold the connections.
LOW_SOFT_LIMIT = 256


def us(values: list[int]) -> list[int]:
    return [round(value / 1000) for value in values]


def test_1000_idle_and_slow_connections_cost_others_little_and_close_by_their_deadlines(
    hostiles: list[Hostile],
) -> None:
    """The loaded server against an identical control server, sampled alternately at the same moments.

    Neighbours on a shared machine (and the loris process itself, which
    would run on another machine in real life) then slow both alike; what
    remains is what holding the connections costs the server. Each round
    starts with a calibration window, both servers unloaded; the claim is
    on the median over rounds of loaded p99 / control p99.
    """
    held = LORIS_IDLE + LORIS_SLOW
    args = ("--request-timeout", str(REQUEST_TIMEOUT_S), "--keep-alive-timeout", str(KEEP_ALIVE_TIMEOUT_S))
    with (
        running_server(*args, prefix=low_soft_limit_prefix(LOW_SOFT_LIMIT)) as server,
        running_server(*args) as control,
    ):
        soft, hard = open_files_limit(server.pid)
        assert soft == hard > LOW_SOFT_LIMIT  # raised at start
        base_sockets = socket_fds(server.pid)
        ports = [server.port, control.port]
        p99: dict[str, list[int]] = {"calibration": [], "calibration_control": [], "loaded": [], "control": []}
        loaded_max: list[int] = []
        samples = []
        for _ in range(LORIS_ROUNDS):
            window_ends = time.monotonic() + CALIBRATION_S
            calibration, calibration_control = sample_side_by_side(
                ports,
                lambda end=window_ends: time.monotonic() >= end,  # type: ignore[misc]
            )
            loris = Hostile(
                "loris", str(server.port), "--sources", LORIS_SOURCES, "--idle", str(LORIS_IDLE),
                "--slow", str(LORIS_SLOW), "--timeout", str(REQUEST_TIMEOUT_S + TICK_S + CLOSE_SLACK_S + 5),
            )  # fmt: skip
            hostiles.append(loris)
            [opened] = loris.wait_lines(1, timeout=20)
            assert opened["connections"] == held
            assert poll_until(lambda: socket_fds(server.pid) >= base_sockets + held, timeout=10), (
                socket_fds(server.pid) - base_sockets
            )
            # Loaded: from every connection held until the server has closed them all.
            loaded, beside = sample_side_by_side(ports, lambda hostile=loris: hostile.poll() >= 2)  # type: ignore[misc]
            summary = loris.wait_lines(2, timeout=20)[1]["connections"]
            loris.close()

            for conn in summary:
                assert conn["closed"] is not None, conn
                started = conn["first_byte"] if conn["kind"] == "slow" else conn["opened"]
                lasted = conn["closed"] - started
                deadline = REQUEST_TIMEOUT_S if conn["kind"] == "slow" else KEEP_ALIVE_TIMEOUT_S
                # The deadline counts from the sweep's clock, up to a tick before the first byte.
                assert deadline - TICK_S - 0.2 <= lasted <= deadline + TICK_S + CLOSE_SLACK_S, conn
                if conn["kind"] == "slow":
                    # A 408 read, then the close: a reset when a drip meets the closed socket.
                    assert conn["status"] == 408 and conn["how"] in {"eof", "reset"}, conn
                    assert conn["sent"] >= 2, conn  # it really trickled
                else:
                    assert (conn["status"], conn["how"]) == (None, "eof"), conn
            assert poll_until(lambda: socket_fds(server.pid) <= base_sockets, timeout=5)

            for name, latencies in (
                ("calibration", calibration),
                ("calibration_control", calibration_control),
                ("loaded", loaded),
                ("control", beside),
            ):
                p99[name].append(percentile(latencies, 0.99))
            loaded_max.append(max(loaded))
            samples.append((len(calibration), len(loaded)))

        # Paired: each round's loaded p99 against the control's over the same window.
        ratios = [a / b for a, b in zip(p99["loaded"], p99["control"], strict=True)]
        calibration_ratios = [a / b for a, b in zip(p99["calibration"], p99["calibration_control"], strict=True)]
        report(
            f"{held} connections ({LORIS_IDLE} idle, {LORIS_SLOW} slow-loris), fd soft limit {LOW_SOFT_LIMIT}->{soft}",
            **{f"p99_{name}_us": us(values) for name, values in p99.items()},
            loaded_max_us=us(loaded_max),
            samples_per_server_calibration_loaded=samples,
            calibration_ratios=[round(r, 2) for r in calibration_ratios],
            loaded_ratios=[round(r, 2) for r in ratios],
        )
        assert statistics.median(ratios) <= 2


# ---- a client that pipelines and never reads ----

PIPELINE_CHUNK = LEAF_REQUEST * (64 * 1024 // len(LEAF_REQUEST))
PUSH_CAP_BYTES = 64 * 1024 * 1024  # a server that kept reading would take all of it (and ~2.5x in replies)
STALLED_AFTER_S = 0.5  # no send progress for this long: the server stopped reading
MEMORY_BOUND_KIB = 16 * 1024


def test_a_client_that_never_reads_cannot_grow_the_worker_and_is_dropped_after_the_stall_timeout() -> None:
    with running_server("--send-stall-timeout", str(SEND_STALL_TIMEOUT_S)) as server:
        worker = server.pid  # one worker: the server process serves
        base_sockets = socket_fds(worker)
        warm = Sampler(server.port)
        for _ in range(200):
            warm.one()
        warm.close()
        assert poll_until(lambda: socket_fds(worker) == base_sockets)
        baseline_kib = status_kib(worker, "VmRSS")
        Path(f"/proc/{worker}/clear_refs").write_text("5")  # restart VmHWM (the peak) from now

        sock = open_from("127.0.0.6", server.port)
        sock.setblocking(False)
        pushed = 0
        peak_sampled_kib = baseline_kib
        last_progress = time.monotonic()
        while pushed < PUSH_CAP_BYTES:
            if not select.select([], [sock], [], STALLED_AFTER_S)[1]:
                break  # stalled: the server stopped reading
            try:
                pushed += sock.send(PIPELINE_CHUNK)
                last_progress = time.monotonic()
            except BlockingIOError:
                pass
            peak_sampled_kib = max(peak_sampled_kib, status_kib(worker, "VmRSS"))
        stalled_at = last_progress
        peak_kib = max(status_kib(worker, "VmHWM"), peak_sampled_kib)
        figures = {
            "pushed_kib": pushed // 1024,
            "baseline_rss_kib": baseline_kib,
            "peak_growth_kib": peak_kib - baseline_kib,
        }
        assert pushed < PUSH_CAP_BYTES, figures  # the server stopped reading
        assert peak_kib - baseline_kib < MEMORY_BOUND_KIB, figures

        # Dropped after the stall timeout: the worker's socket goes.
        assert poll_until(
            lambda: socket_fds(worker) == base_sockets,
            timeout=SEND_STALL_TIMEOUT_S + TICK_S + CLOSE_SLACK_S,
            interval=0.02,
        )
        dropped_after = time.monotonic() - stalled_at
        with pytest.raises(ConnectionResetError):  # aborted: what was not taken is dropped
            sock.setblocking(True)
            while sock.recv(1 << 20):
                pass
        sock.close()
        report("pipelining client that never reads", **figures, dropped_after_stall_s=round(dropped_after, 2))
        assert dropped_after >= SEND_STALL_TIMEOUT_S - TICK_S - STALLED_AFTER_S


# ---- connection limits ----

CALLER_LIMIT = 4
WORKER_LIMIT = 10
REFUSAL_FLOOD = 150  # more than the event log's burst


def hold(port: int, source: str) -> socket.socket:
    """A connection the server admitted: it answered a request on it."""
    sock = open_from(source, port)
    sock.sendall(LEAF_REQUEST)
    assert RawReader(sock).read_response().status == 200
    return sock


def refusal(port: int, source: str) -> RawResponse:
    """A connection the server refused: its 503, then a clean end of file (not a reset)."""
    with open_from(source, port) as sock:
        sock.sendall(LEAF_REQUEST)
        reader = RawReader(sock)
        response = reader.read_response()
        assert reader.at_eof()  # raises ConnectionResetError on a reset
    assert response.status == 503, response
    assert (response.header("Connection"), response.header("Retry-After")) == ("close", "1")
    return response


def test_connections_over_the_caller_and_worker_limits_are_refused_cleanly_and_counted(tmp_path: Path) -> None:
    admin = tmp_path / "admin.sock"
    args = ("--max-connections-per-worker", str(WORKER_LIMIT), "--max-connections-per-caller", str(CALLER_LIMIT))
    with running_server(*args, "--admin-socket", str(admin)) as server:
        port = server.port
        held = [hold(port, "127.0.0.2") for _ in range(CALLER_LIMIT)]
        body = json.loads(refusal(port, "127.0.0.2").body)
        assert "This caller has too many connections open" in body["error"]
        held.append(hold(port, "127.0.0.3"))  # another caller is still served

        # A closed connection frees its caller's place.
        sockets_before = socket_fds(server.pid)
        held.pop(0).close()
        assert poll_until(lambda: socket_fds(server.pid) < sockets_before)
        held.insert(0, hold(port, "127.0.0.2"))

        # The worker's limit holds for every caller, new ones included.
        held += [hold(port, "127.0.0.4") for _ in range(CALLER_LIMIT)]
        held += [hold(port, "127.0.0.5") for _ in range(WORKER_LIMIT - len(held))]
        body = json.loads(refusal(port, "127.0.0.6").body)
        assert "Too many connections are open" in body["error"]

        # A flood of refusals: every one answered and counted, the log rate-limited.
        flood_started = time.monotonic()
        for _ in range(REFUSAL_FLOOD):
            refusal(port, "127.0.0.2")
        flood_s = time.monotonic() - flood_started

        def counted() -> dict[str, float]:
            samples = metrics(admin)
            return {
                reason: samples[f"fastimds_rejects_total|reason={reason}"]
                for reason in ("caller_connection_limit", "connection_limit")
            }

        expected = {"caller_connection_limit": 1 + REFUSAL_FLOOD, "connection_limit": 1}
        assert poll_until(lambda: counted() == expected, timeout=5), counted()
        # Refusals are not connections: the gauge shows the held ones only.
        assert metrics(admin)["fastimds_connections"] == WORKER_LIMIT
        refused = log_events(server, "connection_refused")
        assert {(r["caller"], r["reason"], r["limit"]) for r in refused} == {
            ("127.0.0.2", "caller_connection_limit", CALLER_LIMIT),
            ("127.0.0.6", "connection_limit", WORKER_LIMIT),
        }
        assert len(refused) <= LOG_BURST + LOG_LINES_PER_S * (flood_s + TICK_S) < 2 + REFUSAL_FLOOD
        assert poll_until(
            lambda: any(r["suppressed_event"] == "connection_refused" for r in log_events(server, "log_suppressed"))
        )
        report(
            "connection limits",
            caller_limit=CALLER_LIMIT,
            worker_limit=WORKER_LIMIT,
            refusals=2 + REFUSAL_FLOOD,
            refusals_per_s=round(REFUSAL_FLOOD / flood_s),
            refusal_log_lines=len(refused),
        )
        for sock in held:
            sock.close()


FITTED_FILES = 600  # soft and hard: the server cannot raise it


def test_the_worker_limit_is_fitted_under_an_open_files_limit_it_cannot_raise() -> None:
    with running_server(prefix=("prlimit", f"--nofile={FITTED_FILES}:{FITTED_FILES}", "--")) as server:
        [fd_limit] = log_events(server, "fd_limit")
        fitted = fd_limit["max_connections_per_worker"]
        assert fd_limit["open_files"] == FITTED_FILES and fd_limit["lowered_from"] == 64 * 1024
        assert 0 < fitted < FITTED_FILES - 64
        base_sockets = socket_fds(server.pid)
        held = []
        for index in range(fitted):
            held.append(open_from(f"127.0.2.{1 + index % 4}", server.port))
        assert poll_until(lambda: socket_fds(server.pid) == base_sockets + fitted, timeout=10)
        # One more gets a clean 503, not an accept() that fails for want of a descriptor.
        assert "Too many connections are open" in json.loads(refusal(server.port, "127.0.2.9").body)["error"]
        for sock in held:
            sock.close()
        assert poll_until(lambda: get_from("127.0.2.9", server.port, LEAF)[0] == 200)


# ---- throttling one VM's caller ----

HAMMERED = "127.0.0.2"
OTHER_VMS = {"vm2": "127.0.0.3", "vm3": "127.0.0.4", "vm4": "127.0.0.5"}
VICTIM_SPACING_S = 0.1  # each other VM every 0.3 s: under Azure's 5 requests a second
PHASE_S = 3.0
THROTTLE_ROUNDS = 2


def victims_phase(port: int) -> list[int]:
    """Every other VM's caller, round robin on keep-alive connections; latencies of all-200 replies."""
    samplers = [Sampler(port, source) for source in OTHER_VMS.values()]
    latencies = []
    ends = time.monotonic() + PHASE_S
    next_at = time.monotonic()
    while time.monotonic() < ends:
        for sampler in samplers:
            next_at += VICTIM_SPACING_S
            time.sleep(max(0.0, next_at - time.monotonic()))  # pacing, not an assertion
            latencies.append(sampler.one())  # asserts a 200
    for sampler in samplers:
        sampler.close()
    return latencies


def test_a_hammering_caller_is_throttled_without_slowing_other_vms(tmp_path: Path, hostiles: list[Hostile]) -> None:
    data = tmp_path / "vms"
    data.mkdir()
    for vm_id, caller in {"vm1": HAMMERED, **OTHER_VMS}.items():
        (data / f"{vm_id}.json").write_text(json.dumps(vm_document(vm_id, callers=[caller])))
    with running_server("--data-dir", str(data), "--throttle", "azure") as server:
        unloaded: list[int] = []
        loaded: list[int] = []
        statuses: dict[str, int] = {}
        for _ in range(THROTTLE_ROUNDS):
            unloaded += victims_phase(server.port)
            hammer = Hostile("hammer", str(server.port), "--source", HAMMERED, "--seconds", str(PHASE_S + 0.5))
            hostiles.append(hammer)
            loaded += victims_phase(server.port)
            [result] = hammer.wait_lines(1, timeout=15)
            hammer.close()
            for code, count in result["statuses"].items():
                statuses[code] = statuses.get(code, 0) + count
        hammered_s = THROTTLE_ROUNDS * (PHASE_S + 0.5)
        report(
            "throttled hammer vs other VMs",
            hammer_statuses=statuses,
            hammer_rps=round(sum(statuses.values()) / hammered_s),
            victim_samples=(len(unloaded), len(loaded)),
            victim_median_us=(round(statistics.median(unloaded) / 1000), round(statistics.median(loaded) / 1000)),
            victim_max_us=(round(max(unloaded) / 1000), round(max(loaded) / 1000)),
        )
        assert set(statuses) == {"200", "429"}
        # Azure's 5 a second, per tick window (a window may be a little longer than a second on a busy machine).
        assert statuses["200"] <= 5 * (hammered_s + THROTTLE_ROUNDS * 2)
        assert statuses["429"] >= 100 * statuses["200"]
        # Medians only: single latencies on this shared 2-core machine swing by tens of
        # milliseconds whatever the server does (a max bound failed under neighbours' load).
        assert statistics.median(loaded) <= 2 * statistics.median(unloaded) + 1_000_000

"""One VM floods a worker with fresh-token requests while another VM's requests are timed.

Rules of this module:
- Shared by tests/e2e/test_tenant_fairness_e2e.py (a generous bound, on a
  loaded machine) and bench/tenant_flood.py (the issue's figures, on a
  quiet one): the same flood, the same measurement.
- The flood is one connection from FLOODER_ADDRESS pipelining `count`
  token requests, each for a resource no one asked before (each a fresh
  RSA signature unless refused): a thread sends them all, another reads
  every reply and checks it is the next one in order (a 200 names its
  request's resource; a 429 is the signing budget's refusal). It runs in
  a child process, so its threads never hold the timing thread's GIL.
- The other VM (OTHER_ADDRESS) sends one request at a time on its own
  keep-alive connection, every `interval_s`, and each round trip is timed
  with perf_counter: that is what a neighbour feels.
- Every wait is bounded: socket timeouts, and joins with deadlines.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from tests.support.identities import IDENTITIES
from tests.support.server_process import RawReader, get_request, vm_document

FLOODER_ADDRESS = "127.0.0.2"
OTHER_ADDRESS = "127.0.0.3"
FLOOD_REQUESTS = 20_000  # the flood: ~3 MB of pipelined token requests
# What the other VM asks: a leaf, the commonest IMDS request (answered from the request memo).
OTHER_TARGET = "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text"
TOKEN_TARGET = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource={}"
# Per socket operation; a flood's replies keep coming, so no single read waits long.
SOCKET_TIMEOUT_S = 30.0
# The whole flood, sending and reading, must end within this.
FLOOD_DEADLINE_S = 300.0


def write_fleet(directory: Path) -> None:
    """Two VMs with managed identities in `directory` (--data-dir): the flooder and the other."""
    for vm_id, address in (("flooder", FLOODER_ADDRESS), ("other", OTHER_ADDRESS)):
        document = vm_document(vm_id, callers=[address])
        document["identities"] = IDENTITIES
        (directory / f"{vm_id}.json").write_text(json.dumps(document))


def flood_resources(count: int) -> list[str]:
    """`count` resources never asked for before (a run-unique prefix): each a token not in any cache."""
    run = uuid.uuid4().hex[:8]
    return [f"https://flood-{run}-{i}.example" for i in range(count)]


def connect_from(source: str, port: int, timeout: float = SOCKET_TIMEOUT_S) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    sock.settimeout(timeout)
    return sock


@dataclass
class FloodResult:
    """What the flooding VM got back."""

    replies: int = 0
    ok: int = 0  # 200: a token, for its own request's resource
    refused: int = 0  # 429 with Retry-After: the signing budget
    problems: list[str] = field(default_factory=list)  # out of order, another status, missing replies
    seconds: float = 0.0


def run_flood(port: int, count: int = FLOOD_REQUESTS) -> FloodResult:
    """Pipeline `count` fresh-token requests on one connection; read and check every reply in order."""
    resources = flood_resources(count)
    payload = b"".join(get_request(TOKEN_TARGET.format(resource), "Metadata: true") for resource in resources)
    result = FloodResult()
    started = time.perf_counter()
    with connect_from(FLOODER_ADDRESS, port) as sock:
        send_error: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(payload)
            except OSError as exc:
                send_error.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        reader = RawReader(sock)
        try:
            for i, resource in enumerate(resources):
                response = reader.read_response()
                result.replies += 1
                if response.status == 200:
                    result.ok += 1
                    if json.loads(response.body).get("resource") != resource:
                        result.problems.append(f"reply {i} is not request {i}'s: {response.body[:120]!r}")
                elif response.status == 429 and response.header("Retry-After") is not None:
                    result.refused += 1
                else:
                    result.problems.append(f"reply {i}: {response.status} {response.body[:120]!r}")
                if len(result.problems) > 10:
                    break
        except (OSError, ConnectionError) as exc:
            result.problems.append(f"after {result.replies} replies: {exc!r}")
        sender.join(SOCKET_TIMEOUT_S)
        if send_error:
            result.problems.append(f"sending: {send_error[0]!r}")
    result.seconds = time.perf_counter() - started
    return result


def _flood_child(port: int, count: int, started: Connection, done: Connection) -> None:
    started.send(True)
    done.send(run_flood(port, count))


@dataclass
class Latencies:
    """The other VM's round trips, in seconds."""

    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def summary(self) -> dict[str, float]:
        """Count, p50, p99, max and mean, in milliseconds to the microsecond."""
        samples = self.samples
        return {
            "requests": len(samples),
            "p50_ms": round(self.quantile(0.50) * 1000, 3),
            "p99_ms": round(self.quantile(0.99) * 1000, 3),
            "max_ms": round(max(samples, default=float("nan")) * 1000, 3),
            "mean_ms": round(statistics.fmean(samples) * 1000 if samples else float("nan"), 3),
        }


def time_other_vm(port: int, until: threading.Event | None, count: int, interval_s: float) -> Latencies:
    """The other VM's requests, one at a time on one connection: `count` of them, or until `until` is set."""
    latencies = Latencies()
    request = get_request(OTHER_TARGET, "Metadata: true")
    with connect_from(OTHER_ADDRESS, port) as sock:
        reader = RawReader(sock)
        while (until is None and len(latencies.samples) < count) or (until is not None and not until.is_set()):
            started = time.perf_counter()
            try:
                sock.sendall(request)
                response = reader.read_response()
            except OSError as exc:
                latencies.errors.append(repr(exc))
                break
            latencies.samples.append(time.perf_counter() - started)
            if response.status != 200:
                latencies.errors.append(f"status {response.status}")
            time.sleep(interval_s)
    return latencies


@dataclass
class FloodRun:
    """One run: the other VM alone, then the other VM during the flood, and the flood's own replies."""

    alone: Latencies
    during: Latencies
    flood: FloodResult


def measure(port: int, count: int = FLOOD_REQUESTS, alone: int = 500, interval_s: float = 0.002) -> FloodRun:
    """Time the other VM alone (`alone` requests), then during one flood of `count` requests.

    First the other VM asks for one token: a single process makes its token
    key on first use (~100 ms, fastimds.imds.keys), which is start-up, not
    the flood's doing.
    """
    with connect_from(OTHER_ADDRESS, port) as sock:
        sock.sendall(get_request(TOKEN_TARGET.format("https://warm-up.example"), "Metadata: true"))
        RawReader(sock).read_response()
    quiet = time_other_vm(port, None, alone, interval_s)
    context = multiprocessing.get_context("spawn")
    started_recv, started_send = context.Pipe(duplex=False)
    done_recv, done_send = context.Pipe(duplex=False)
    child = context.Process(target=_flood_child, args=(port, count, started_send, done_send), daemon=True)
    child.start()
    try:
        if not started_recv.poll(60.0):
            raise TimeoutError("the flood process did not start")
        started_recv.recv()
        finished = threading.Event()
        during: list[Latencies] = []
        timer = threading.Thread(target=lambda: during.append(time_other_vm(port, finished, 0, interval_s)))
        timer.start()
        try:
            if not done_recv.poll(FLOOD_DEADLINE_S):
                raise TimeoutError(f"the flood did not end within {FLOOD_DEADLINE_S} s")
            flood: FloodResult = done_recv.recv()
        finally:
            finished.set()
            timer.join(SOCKET_TIMEOUT_S)
    finally:
        child.join(10.0)
        if child.is_alive():
            child.kill()
    return FloodRun(quiet, during[0] if during else Latencies(errors=["the timer died"]), flood)

"""The fleet simulation's clients and phases (bench/fleet_sim.py runs them): updates, a migration wave, a partition.

Rules of this module:
- Everything runs on the bench's one event loop. A blocking call (tests/support/etcd.py runs etcdctl and waits for
  members) goes to a thread, so the reads, writes and long-polls go on meanwhile.
- A VM is reached as its caller: each request opens a connection bound to the VM's own 127/8 address, sends one GET
  with `Connection: close` and reads one Content-Length framed reply. Every request has a timeout; a connection
  error, a timeout or a status other than 200 is a failed read.
- Propagation is measured with long-polls, never with sleeps or polling: a VM's long-poll (`last_etag`: the ETag
  the bench last saw for it) is opened LEAD_S before its write is sent, and the latency runs from the write's send
  (and, second figure, its acknowledgement) to the arrival of the reply that carries the new value. A reply that
  carries another value is polled again from its ETag. The only polling is a migrated VM's arrival on its new host,
  which answers 404 (never held) until it has the VM.
- Writes are open-loop: scheduled by the clock at the rate asked, never waiting for earlier ones; one that would
  pass MAX_IN_FLIGHT, or finds no idle VM, is counted as skipped, not delayed. A VM has one update in flight at most.
- Every wait has a deadline; times are time.monotonic() seconds here, turned into ms only by the report.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.support.etcd import EtcdCluster
from tests.support.server_process import vm_uuid

API = "api-version=2021-02-01&format=text"
LOCATION = f"/metadata/instance/compute/location?{API}"
VMID = f"/metadata/instance/compute/vmId?{API}"
PREFIX = "/fastimds"
LOCATION_MARK = "@@fleet-sim-location@@"
LEAD_S = 0.05  # a long-poll is opened this long before its write
READ_TIMEOUT_S = 2.0
ANSWER_WITHIN_S = 10.0  # a written value not served within this of its acknowledgement is counted as lost
WRITE_TIMEOUT_S = 10.0  # long: a write the client gave up on may still commit, and the bench must know where VMs are
MAX_IN_FLIGHT = 2000
# A migrated VM's new host is asked for it every 10 ms (a tracked move: its overlap is measured) or 50 ms (the
# others: the wave's end only), so that the client, not the hosts, is not what the wave measures.
ARRIVAL_POLL_S = (0.01, 0.05)
READ_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)

now = time.monotonic


async def sleep_until(moment: float) -> None:
    if (delay := moment - now()) > 0:
        await asyncio.sleep(delay)


@dataclass(frozen=True)
class Reply:
    status: int
    etag: str | None
    body: bytes
    sent: float  # before the connect
    received: float  # the whole reply read


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    fields = (line.partition(":") for line in lines)
    return int(status_line.split(" ", 2)[1]), {name.strip().lower(): value.strip() for name, _, value in fields}


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, dict[str, str], bytes]:
    try:
        writer.write(request)
        status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
        return status, headers, await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        writer.close()


async def http_get(caller: str, port: int, target: str, timeout: float = READ_TIMEOUT_S) -> Reply:
    """One IMDS GET from `caller` (bound as the source address) on a new connection; raises on any failure."""
    sent = now()
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\nConnection: close\r\n\r\n".encode()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(caller, 0))
        status, headers, body = await _exchange(reader, writer, request)
    return Reply(status, headers.get("etag"), body, sent, now())


def long_poll(etag: str | None, timeout_s: float) -> str:
    wait = f"{LOCATION}&wait_for_change=true&timeout_sec={max(1, min(3600, math.ceil(timeout_s)))}"
    return wait + (f"&last_etag={quote(etag, safe='')}" if etag else "")


async def etcd_source(admin: Path) -> dict[str, Any] | None:
    """The etcd source of the host's `GET /readyz` (admin Unix socket); None when it does not answer."""
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            reader, writer = await asyncio.open_unix_connection(str(admin))
            request = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            _, _, body = await _exchange(reader, writer, request)
        sources = json.loads(body)["sources"]
    except (*READ_ERRORS, KeyError):
        return None
    return next((source for source in sources if source.get("kind") == "etcd"), None)


# ---- the fleet ----


@dataclass
class Vm:
    name: str
    caller: str  # its source address, kept across moves (a live migration keeps the VM's addresses)
    host: int
    template: str  # its JSON description with LOCATION_MARK for the location
    location: str
    etag: str | None = None  # of its location view, as last seen
    busy: bool = False  # an update or a move in flight

    def document(self, location: str) -> str:
        return self.template.replace(json.dumps(LOCATION_MARK), json.dumps(location))


@dataclass
class Host:
    index: int
    proc: subprocess.Popen[bytes]
    admin: Path
    log: Path
    port: int = 0

    @property
    def name(self) -> str:
        return f"h{self.index}"


def vm_key(host: int, vm: str) -> str:
    return f"{PREFIX}/hosts/h{host}/vms/{vm}"


@dataclass
class Fleet:
    hosts: list[Host]
    vms: list[Vm]
    kv: Any  # etcd3aio's KVService, swapped for a fresh client's after the outage
    rng: random.Random
    written: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # the client's own requests that failed, by what and why

    def failed(self, what: str, exc: BaseException) -> None:
        self.failures[f"{what}: {describe(exc)}"] += 1

    def port(self, vm: Vm) -> int:
        return self.hosts[vm.host].port

    def next_location(self) -> str:
        self.written += 1
        return f"loc-{self.written}"

    def claim_idle(self, host: int | None = None) -> Vm | None:
        """A random VM with nothing in flight (of `host`, when given), marked busy at once: a scheduler running
        late launches several updates before any of them runs, and none may pick the same VM."""
        vm = next((vm for vm in (self.rng.choice(self.vms) for _ in range(20)) if not vm.busy), None)
        if vm is None or (host is not None and vm.host != host):
            pool = [vm for vm in self.vms if not vm.busy and (host is None or vm.host == host)]
            vm = self.rng.choice(pool) if pool else None
        if vm is not None:
            vm.busy = True
        return vm


def describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return code().name if callable(code) else (type(exc).__name__ + (f": {exc}" if str(exc) else ""))


# ---- updates: a write, and the long-poll that sees it served ----


@dataclass
class Update:
    vm: str
    host: int
    scheduled: float
    sent: float | None = None
    acked: float | None = None  # None: the write failed (error says why)
    served: float | None = None  # None: not served within ANSWER_WITHIN_S
    error: str | None = None


async def await_value(fleet: Fleet, vm: Vm, expected: bytes, deadline: float) -> Reply | None:
    """Long-poll `vm` on its host from its last ETag until a reply carries `expected`; None at the deadline."""
    port = fleet.port(vm)
    while (left := deadline - now()) > 0:
        try:
            reply: Reply | None = await http_get(vm.caller, port, long_poll(vm.etag, left), timeout=left + 1)
        except READ_ERRORS as exc:
            fleet.failed("long-poll", exc)
            reply = None
        if reply is None or reply.status != 200:
            await asyncio.sleep(0.01)  # refused, reset, timed out or not served: ask again (counted in the failures)
            continue
        vm.etag = reply.etag
        if reply.body == expected:
            return reply
    return None


async def update(
    fleet: Fleet, vm: Vm, at: float, results: list[Update], *, retry_until: float = 0.0, within: float = ANSWER_WITHIN_S
) -> None:
    """Write a new location for `vm` at `at` (started LEAD_S before) and note when its host serves it.

    With `retry_until`, a failed write is sent again until then (after the outage: the write must land).
    """
    vm.busy = True
    location = fleet.next_location()
    result = Update(vm.name, vm.host, at)
    results.append(result)
    deadline = max(at, retry_until) + WRITE_TIMEOUT_S + within
    waiter = asyncio.ensure_future(await_value(fleet, vm, location.encode(), deadline))
    try:
        await sleep_until(at)
        while True:
            result.sent = now()
            try:
                await fleet.kv.put(vm_key(vm.host, vm.name), vm.document(location), timeout=WRITE_TIMEOUT_S)
                break
            except Exception as exc:
                result.error = describe(exc)
                if now() >= retry_until:
                    return
                await asyncio.sleep(0.05)
        result.acked, result.error = now(), None
        vm.location = location
        reply = await waiter
        result.served = reply.received if reply is not None else None
    finally:
        waiter.cancel()
        vm.busy = False


@dataclass
class Schedule:
    """An open-loop run: what was launched, what was skipped."""

    tasks: set[asyncio.Future[None]] = field(default_factory=set)
    skipped: int = 0
    first: float = 0.0
    last: float = 0.0

    def launch(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self, timeout: float) -> None:
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
            for task in pending:
                task.cancel()


async def run_updates(
    fleet: Fleet, rate: float, count: int, results: list[Update], stop: Callable[[], bool] = lambda: False
) -> Schedule:
    """`count` updates at `rate` a second to random idle VMs over the fleet (fewer if `stop()` turns true)."""
    schedule = Schedule(first=now() + LEAD_S + 0.05)
    for index in range(count):
        at = schedule.first + index / rate
        await sleep_until(at - LEAD_S)
        if stop():
            break
        schedule.last = at
        if len(schedule.tasks) >= MAX_IN_FLIGHT or (vm := fleet.claim_idle()) is None:
            schedule.skipped += 1
            continue
        schedule.launch(update(fleet, vm, at, results))
    await schedule.drain(ANSWER_WITHIN_S + WRITE_TIMEOUT_S + 2)
    return schedule


# ---- the migration wave ----


@dataclass
class Move:
    vm: str
    old: int
    new: int
    sent: float | None = None
    acked: float | None = None
    old_stop: float | None = None  # the old host's held long-poll answered: it stopped serving the VM
    new_start: float | None = None  # the first reply from the new host with the VM's vmId
    new_last_miss: float | None = None  # when the new host's last 404 before it was asked
    tracked: bool = False  # its new host polled every ARRIVAL_POLL_S[0]
    error: str | None = None

    def overlap_bound(self) -> float | None:
        """The longest the VM can have been served by both hosts (>= the truth): the old host's stop minus the
        last moment the new host was seen without it (or the write's send)."""
        if self.old_stop is None or self.sent is None:
            return None
        return self.old_stop - max(self.sent, self.new_last_miss or self.sent)


async def old_host_release(fleet: Fleet, vm: Vm, port: int, deadline: float) -> float | None:
    """Long-poll the VM on its old host; the reply that is not a 200 (the VM gone) marks its stop."""
    while (left := deadline - now()) > 0:
        try:
            reply = await http_get(vm.caller, port, long_poll(vm.etag, left), timeout=left + 1)
        except READ_ERRORS as exc:
            fleet.failed("old host long-poll", exc)
            await asyncio.sleep(0.01)
            continue
        if reply.status != 200:
            return reply.received
        vm.etag = reply.etag
    return None


async def new_host_arrival(fleet: Fleet, vm: Vm, port: int, move: Move, deadline: float) -> None:
    expected, interval = vm_uuid(vm.name).encode(), ARRIVAL_POLL_S[0 if move.tracked else 1]
    while now() < deadline:
        try:
            reply = await http_get(vm.caller, port, VMID)
            if reply.status == 200 and reply.body == expected:
                move.new_start = reply.received
                return
            move.new_last_miss = reply.sent
        except READ_ERRORS as exc:
            fleet.failed("new host poll", exc)
        await asyncio.sleep(interval)


async def move(fleet: Fleet, vm: Vm, new: int, at: float, moves: list[Move], *, tracked: bool) -> None:
    """Move `vm` to host `new` in one transaction at `at` (delete the old key, put the new), and time both ends."""
    vm.busy = True
    record = Move(vm.name, vm.host, new, tracked=tracked)
    moves.append(record)
    deadline = at + WRITE_TIMEOUT_S + ANSWER_WITHIN_S
    release = asyncio.ensure_future(old_host_release(fleet, vm, fleet.port(vm), deadline))
    arrival: asyncio.Future[None] | None = None
    try:
        await sleep_until(at)
        record.sent = now()
        arrival = asyncio.ensure_future(new_host_arrival(fleet, vm, fleet.hosts[new].port, record, deadline))
        kv = fleet.kv
        operations = [
            kv.txn_op_delete(vm_key(vm.host, vm.name)),
            kv.txn_op_put(vm_key(new, vm.name), vm.document(vm.location)),
        ]
        try:
            await kv.txn(compare=[], success=operations, failure=[], timeout=WRITE_TIMEOUT_S)
        except Exception as exc:
            record.error = describe(exc)
            return
        record.acked = now()
        vm.host = new
        record.old_stop = await release
        await arrival
    finally:
        release.cancel()
        if arrival is not None:
            arrival.cancel()
        vm.busy = False


async def migration_wave(fleet: Fleet, count: int, rate: float, tracked: int) -> tuple[list[Move], Schedule]:
    """`count` random VMs moved to another host at `rate` a second; every len/tracked-th one tracked closely."""
    schedule = Schedule(first=now() + LEAD_S + 0.05)
    moves: list[Move] = []
    hosts = len(fleet.hosts)
    for index, vm in enumerate(fleet.rng.sample(fleet.vms, min(count, len(fleet.vms)))):
        at = schedule.first + index / rate
        await sleep_until(at - LEAD_S)
        schedule.last = at
        new, vm.busy = (vm.host + fleet.rng.randrange(1, hosts)) % hosts, True
        schedule.launch(move(fleet, vm, new, at, moves, tracked=index % max(1, count // max(1, tracked)) == 0))
    await schedule.drain(ANSWER_WITHIN_S + WRITE_TIMEOUT_S + 2)
    return moves, schedule


# ---- the partition: reads through a leader kill and a whole-cluster outage ----


@dataclass
class Read:
    at: float
    ok: bool
    host: int
    error: str | None = None


async def read_steadily(fleet: Fleet, rate: float, reads: list[Read], stop: asyncio.Event) -> None:
    """Open-loop reads at `rate` a second, each from a random VM to its host, until `stop`."""
    schedule = Schedule(first=now())

    async def one(vm: Vm, at: float) -> None:
        try:
            reply = await http_get(vm.caller, fleet.port(vm), LOCATION)
            reads.append(Read(at, reply.status == 200, vm.host, None if reply.status == 200 else str(reply.status)))
        except READ_ERRORS as exc:
            reads.append(Read(at, False, vm.host, describe(exc)))

    index = 0
    while not stop.is_set():
        at = schedule.first + index / rate
        index += 1
        await sleep_until(at)
        if len(schedule.tasks) >= MAX_IN_FLIGHT:
            reads.append(Read(at, False, -1, "client: too many reads in flight"))
            continue
        vm = fleet.rng.choice(fleet.vms)
        schedule.launch(one(vm, at))
    await schedule.drain(READ_TIMEOUT_S + 1)


async def watch_readiness(fleet: Fleet, timeline: list[tuple[float, int]], stop: asyncio.Event, every: float) -> None:
    """How many hosts' etcd sources say connected, every `every` s, until `stop`."""
    while not stop.is_set():
        at = now()
        sources = await asyncio.gather(*(etcd_source(host.admin) for host in fleet.hosts))
        timeline.append((at, sum(1 for source in sources if source and source.get("connected"))))
        await sleep_until(at + every)


@dataclass
class Partition:
    events: dict[str, float] = field(default_factory=dict)
    reads: list[Read] = field(default_factory=list)
    updates: list[Update] = field(default_factory=list)
    connected: list[tuple[float, int]] = field(default_factory=list)  # (time, hosts connected)
    converge: list[Update] = field(default_factory=list)  # one write per host once etcd is back


async def partition(
    fleet: Fleet,
    cluster: EtcdCluster,
    *,
    segment_s: float,
    outage_s: float,
    read_rate: float,
    update_rate: float,
    fresh_kv: Callable[[], Any],
) -> Partition:
    """Reads and updates throughout; the leader killed, brought back; the whole cluster stopped, brought back; then
    one write per host, to time convergence. `fresh_kv` makes the writes' client again after the outage."""
    record, stop = Partition(), asyncio.Event()
    events = record.events
    events["start"] = now()
    background = [
        asyncio.ensure_future(read_steadily(fleet, read_rate, record.reads, stop)),
        asyncio.ensure_future(watch_readiness(fleet, record.connected, stop, 0.1)),
        asyncio.ensure_future(run_updates(fleet, update_rate, 10**9, record.updates, stop.is_set)),
    ]
    try:
        await asyncio.sleep(segment_s)
        leader = await asyncio.to_thread(cluster.leader)
        events["leader_killed"] = now()
        await asyncio.to_thread(leader.kill)
        await asyncio.sleep(segment_s)
        events["leader_restarted"] = now()
        await asyncio.to_thread(cluster.start_all)
        events["leader_back"] = now()
        await asyncio.sleep(segment_s)
        events["stop_all"] = now()
        await asyncio.to_thread(cluster.stop_all)
        events["all_stopped"] = now()
        await asyncio.sleep(outage_s)
        events["start_all"] = now()
        await asyncio.to_thread(cluster.start_all)
        back = events["etcd_back"] = now()
        fleet.kv = await fresh_kv()
        writes = Schedule()
        for host in range(len(fleet.hosts)):
            if (vm := fleet.claim_idle(host)) is not None:  # written (again) until it lands, then served in time
                writes.launch(update(fleet, vm, back + LEAD_S, record.converge, retry_until=back + 30, within=60.0))
        await writes.drain(30 + WRITE_TIMEOUT_S + 60.0 + 2)
        events["converged"] = now()
        await asyncio.sleep(segment_s)
    finally:
        stop.set()
        await asyncio.wait(background, timeout=ANSWER_WITHIN_S + WRITE_TIMEOUT_S + 5)
        for task in background:
            task.cancel()
    events["end"] = now()
    return record

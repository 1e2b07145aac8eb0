"""Fleet simulation: a three-member etcd and N fleet-mode hosts on loopback, timed from sync to outage.

    python -m bench.fleet_sim [--hosts 50] [--vms-per-host 200] [--rates 10,100,500] [--rate-duration 10]
                              [--migrations 1000] [--migration-rate 500] [--outage 30] [--out DIR] [--quick]
    make fleet-sim ARGS="--quick"

Measures, in this order, on one machine (bench/fleet_phases.py holds the clients and phases):
- initial sync: every VM written to etcd first, then every host spawned at once; the time from the spawn to the
  slowest host serving all of its VMs (its ready line, printed after its first sync, and every one of its VMs
  then confirmed by a read from the VM's own caller address that answers 200 with the VM's location);
- CPU and memory of every host and etcd member (/proc) at rest and under each update rate;
- propagation: updates at each of --rates a second, open-loop, to random VMs over the fleet; each one's latency
  from the etcd write to its host's long-poll answering with the new value (p50/p99/max);
- a migration wave: --migrations VMs moved to another host, one transaction each at --migration-rate a second;
  the time until every one is served by exactly its new host, and how long any was served by both;
- partition: reads and updates throughout; the etcd leader SIGKILLed and started again, then the whole cluster
  stopped for --outage seconds and started again; every read's outcome, and the time until every host serves a
  value written after etcd's return and says it is connected again (GET /readyz on its admin socket).
Writes JSON, Markdown and a plot into --out (default bench/results/fleet-<timestamp>/) and prints the Markdown.
Exit status 0 when the run completed, targets met or not (the Markdown says which); 1 when it could not run.

Rules of this module:
- Loopback only: etcd and the hosts listen on 127.0.0.1, callers are 127.16.0.0/12 addresses (all of 127/8 is
  loopback); nothing here reaches another address.
- Nothing outlives the run: every host runs in its own session and is SIGKILLed as a group on every exit path
  (try/finally, SIGTERM and the run's overall time budget included); the etcd members are closed by
  tests/support/etcd.py, whose atexit hook also catches a crash.
- Each phase has its own deadline and the whole run a budget; a host that never syncs ends the run (exit 1).
- Targets missed are reported, never an error: the figures are what the machine did. It is a benchmark: run it on
  a quiet machine (the JSON notes the load average before and the CPU other processes took during the rest window).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench.fleet_phases import (
    LOCATION,
    LOCATION_MARK,
    READ_ERRORS,
    VMID,
    Fleet,
    Host,
    Move,
    Update,
    Vm,
    describe,
    http_get,
    migration_wave,
    now,
    partition,
    run_updates,
    vm_key,
)
from bench.fleet_report import (
    Raw,
    Usage,
    cpu_rss,
    machine,
    markdown,
    migration_figures,
    partition_figures,
    plot,
    propagation_figures,
    summary,
    targets,
    usage_during,
)
from tests.support import REPO_ROOT
from tests.support.etcd import EtcdCluster, etcd_missing
from tests.support.server_process import READY_LINE, vm_document, vm_uuid

SYNC_DEADLINE_S = 120.0
SESSION: dict[str, Any] = {"start_new_session": True, "cwd": REPO_ROOT}  # a host's own process group, in the repo
SETTLE_S = 2.0  # a quiet pause between phases
LOAD_BATCH = 100  # puts per transaction while loading (etcd allows 128 operations in one)


@dataclass(frozen=True)
class Plan:
    hosts: int = 50
    vms_per_host: int = 200
    rates: tuple[float, ...] = (10.0, 100.0, 500.0)
    rate_duration: float = 10.0
    migrations: int = 1000
    migration_rate: float = 500.0
    tracked: int = 100  # moves whose new host is polled every 10 ms (the overlap's bound)
    outage: float = 30.0
    segment: float = 5.0  # the partition's steps: before the kill, the leader away, between, after convergence
    rest: float = 5.0
    read_rate: float = 300.0
    partition_rate: float = 50.0
    seed: int = 1
    budget: float = 1800.0  # the whole run


QUICK = Plan(5, 20, (10.0, 100.0), 3.0, 50, outage=5.0, segment=2.0, rest=2.0, read_rate=100.0, budget=300.0)


def caller(index: int) -> str:
    """The caller address of the fleet's `index`th VM: unique, in 127.16.0.0/12."""
    return f"127.{16 + index // 62500}.{index // 250 % 250}.{index % 250 + 1}"


# ---- setup: the VMs into etcd, every host at once ----


def make_vms(plan: Plan) -> list[Vm]:
    vms = []
    for host in range(plan.hosts):
        for index in range(plan.vms_per_host):
            name, address = f"h{host}-vm{index}", caller(host * plan.vms_per_host + index)
            template = json.dumps(vm_document(name, callers=[address], location=LOCATION_MARK))
            vms.append(Vm(name, address, host, template, "loc-0"))
    return vms


async def load(kv: Any, vms: list[Vm]) -> float:
    started, gate = now(), asyncio.Semaphore(8)

    async def put(batch: list[Vm]) -> None:
        operations = [kv.txn_op_put(vm_key(vm.host, vm.name), vm.document(vm.location)) for vm in batch]
        async with gate:
            await kv.txn(compare=[], success=operations, failure=[], timeout=30)

    await asyncio.gather(*(put(vms[i : i + LOAD_BATCH]) for i in range(0, len(vms), LOAD_BATCH)))
    return now() - started


def spawn(hosts: list[Host], count: int, endpoints: str, base: Path) -> None:
    """Every host's server at once, each in its own session; appended to `hosts` as it starts (for the cleanup)."""
    for index in range(count):
        log = base / f"h{index}.log"
        command = [sys.executable, "-m", "fastimds", "serve", "--port", "0", "--etcd", endpoints]
        command += ["--host-id", f"h{index}", "--state-dir", str(base / f"state-h{index}")]
        command += ["--admin-socket", str(base / f"h{index}.sock")]
        with open(log, "wb") as stderr:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, **SESSION)
        hosts.append(Host(index, proc, base / f"h{index}.sock", log))


def ready_line(host: Host) -> asyncio.Future[tuple[float, bytes]]:
    """(when, line) once the host's stdout has a whole line (or ends)."""
    loop, buffer = asyncio.get_running_loop(), bytearray()
    done: asyncio.Future[tuple[float, bytes]] = loop.create_future()
    assert host.proc.stdout is not None
    fd = host.proc.stdout.fileno()
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        buffer.extend(chunk)
        if (b"\n" in buffer or not chunk) and not done.done():
            loop.remove_reader(fd)
            done.set_result((now(), bytes(buffer)))

    loop.add_reader(fd, readable)
    return done


async def host_synced(fleet: Fleet, host: Host, spawned: float, gate: asyncio.Semaphore) -> dict[str, Any]:
    """When `host` printed its ready line and when every one of its VMs was confirmed served (from the spawn)."""
    deadline = spawned + SYNC_DEADLINE_S
    async with asyncio.timeout(SYNC_DEADLINE_S):
        ready_at, raw = await ready_line(host)
    match = READY_LINE.match(raw.decode(errors="replace").strip())
    if match is None:
        tail = host.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"host {host.name} printed {raw!r} instead of its ready line; its log ends:\n{tail}")
    host.port = int(match["port"])
    cpu_at_ready = (cpu_rss(host.proc.pid) or (math.nan, 0.0))[0]

    async def served(vm: Vm) -> bool:
        async with gate:
            try:
                reply = await http_get(vm.caller, host.port, LOCATION)
            except READ_ERRORS:
                return False
        if reply.status == 200 and reply.body == vm.location.encode():
            vm.etag = reply.etag
            return True
        return False

    pending, rounds, first_round_all = [vm for vm in fleet.vms if vm.host == host.index], 0, False
    while pending and now() < deadline:
        results = await asyncio.gather(*map(served, pending))
        pending = [vm for vm, ok in zip(pending, results, strict=True) if not ok]
        first_round_all, rounds = first_round_all or (rounds == 0 and not pending), rounds + 1
        if pending:
            await asyncio.sleep(0.05)
    verified = now() - spawned
    if pending:
        raise RuntimeError(f"host {host.name}: {len(pending)} VMs not served {SYNC_DEADLINE_S:.0f} s after the spawn")
    return {
        "host": host.name,
        "vms_in_ready_line": int(match["vms"]),
        "ready_s": ready_at - spawned,
        "verified_s": verified,
        # Served at its ready line when the first round of reads after it found every VM; else when one did.
        "synced_s": ready_at - spawned if first_round_all else verified,
        "rounds": rounds,
        "cpu_at_ready_s": cpu_at_ready,  # CPU seconds the host had used when it printed its ready line
    }


async def served_exactly_by_new_host(fleet: Fleet, moves: list[Move], concurrency: int = 200) -> list[str]:
    """After the wave: every moved VM answered by its new host, and by its old host not at all; the problems."""
    gate = asyncio.Semaphore(concurrency)
    by_name = {vm.name: vm for vm in fleet.vms}

    async def check(record: Move) -> str | None:
        vm = by_name[record.vm]
        async with gate:
            try:
                new = await http_get(vm.caller, fleet.hosts[record.new].port, VMID)
                old = await http_get(vm.caller, fleet.hosts[record.old].port, VMID)
            except READ_ERRORS as exc:
                return f"{vm.name}: {describe(exc)}"
        if new.status != 200 or new.body != vm_uuid(vm.name).encode():
            return f"{vm.name}: new host h{record.new} answered {new.status}"
        return f"{vm.name}: old host h{record.old} still answers {old.status}" if old.status == 200 else None

    return [problem for problem in await asyncio.gather(*map(check, moves)) if problem]


async def reconcile(fleet: Fleet, moves: list[Move]) -> int:
    """A transaction the client gave up on may have committed: ask etcd where each such VM is now (later reads must
    go to the host that really has it); how many had committed."""
    committed, by_name = 0, {vm.name: vm for vm in fleet.vms}
    for move in (m for m in moves if m.error is not None):
        if (await fleet.kv.get(vm_key(move.new, move.vm), timeout=30)).kvs:
            by_name[move.vm].host, committed = move.new, committed + 1
    return committed


def logged_overlaps(hosts: list[Host], moves: list[Move], since: float) -> dict[str, Any]:
    """The hosts' own account of the wave, free of the client's lag: for each move, the old host's last `vm_removed`
    minus the new host's first `update_applied` (their event logs: wall clock, ms). Rate-limited logs may miss some."""
    applied: dict[tuple[int, str], float] = {}
    removed: dict[tuple[int, str], float] = {}
    for host in hosts:
        for line in host.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                record = json.loads(line)
                if record["ts"] >= since and record["event"] == "update_applied":
                    applied.setdefault((host.index, record["vm"]), record["ts"])
                elif record["ts"] >= since and record["event"] == "vm_removed":
                    removed[host.index, record["vm"]] = max(record["ts"], removed.get((host.index, record["vm"]), 0.0))
    found = [
        (removed[m.old, m.vm], applied[m.new, m.vm])
        for m in moves
        if (m.old, m.vm) in removed and (m.new, m.vm) in applied
    ]
    overlaps = [gone - arrived for gone, arrived in found]
    return {
        "moves_found": len(found),
        "on_both": sum(1 for overlap in overlaps if overlap > 0),
        "overlap": summary([max(0.0, overlap) for overlap in overlaps]),
    }


# ---- the run ----


class ClientHealth:
    """Per phase: the client's failed requests and its event loop's lag (inside every latency it measured then)."""

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()  # the fleet's, once there is one
        self.seen: Counter[str] = Counter()
        self.lags: list[float] = []

    async def watch_loop(self) -> None:
        while True:
            before = now()
            await asyncio.sleep(0.01)
            self.lags.append(now() - before - 0.01)

    def phase(self) -> dict[str, Any]:
        """Since the last call: the client's failures and its loop's lag (then counting starts again)."""
        health = {"client_failures": dict(self.failures - self.seen), "client_loop_lag": summary(self.lags)}
        self.lags, self.seen = [], Counter(self.failures)
        return health


async def new_kv(cluster: EtcdCluster, clients: list[Any]) -> Any:
    """A new etcd client on subchannels of its own (gRPC shares them, with their reconnect backoff, across channels)."""
    from etcd3aio import Etcd3Client

    client = Etcd3Client(cluster.client_addresses())
    # Else one made after the outage waits out the old one's backoff, as the hosts do (fleet.md); no argument for it.
    client._manager.grpc_options.append(("grpc.use_local_subchannel_pool", 1))
    await client.connect()
    clients.append(client)
    return client.kv


async def simulate(plan: Plan, cluster: EtcdCluster, hosts: list[Host], base: Path) -> tuple[dict[str, Any], Raw]:
    clients: list[Any] = []
    health = ClientHealth()
    watching = asyncio.ensure_future(health.watch_loop())
    try:
        return await _simulate(plan, cluster, hosts, base, clients=clients, client=health)
    finally:
        watching.cancel()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()


async def _simulate(
    plan: Plan, cluster: EtcdCluster, hosts: list[Host], base: Path, *, clients: list[Any], client: ClientHealth
) -> tuple[dict[str, Any], Raw]:
    fleet = Fleet(hosts, make_vms(plan), await new_kv(cluster, clients), random.Random(plan.seed))
    client.failures = fleet.failures
    figures: dict[str, Any] = {"load": {"vms": len(fleet.vms), "seconds": await load(fleet.kv, fleet.vms)}}
    raw = Raw()
    print(f"fleet_sim: {len(fleet.vms)} VMs in etcd; starting {plan.hosts} hosts", file=sys.stderr, flush=True)
    spawned = now()
    spawn(hosts, plan.hosts, cluster.endpoints, base)
    spawn_s = now() - spawned
    gate = asyncio.Semaphore(256)
    per_host = await asyncio.gather(*(host_synced(fleet, host, spawned, gate) for host in hosts))
    figures["initial_sync"] = {
        "spawn_loop_s": spawn_s,
        **{f"{key}_max_s": max(h[f"{key}_s"] for h in per_host) for key in ("synced", "ready", "verified")},
        "synced_p50_s": sorted(h["synced_s"] for h in per_host)[(len(per_host) - 1) // 2],
        # The floor CPU sets: every host's CPU until its ready line, spread over every core.
        "hosts_cpu_until_ready_s": sum(h["cpu_at_ready_s"] for h in per_host),
        "cpu_floor_s": sum(h["cpu_at_ready_s"] for h in per_host) / (os.cpu_count() or 1),
        "hosts": per_host,
        **client.phase(),
    }
    await asyncio.sleep(SETTLE_S)  # the state dirs' writes, every host's first contact read
    client.phase()
    usage = figures["usage"] = {"at_rest": await usage_during(hosts, cluster, plan.rest) | client.phase()}
    propagation = figures["propagation"] = {}
    for rate in plan.rates:
        print(f"fleet_sim: {rate:g} updates/s for {plan.rate_duration:g} s", file=sys.stderr, flush=True)
        results: list[Update] = []
        client.phase()
        task = asyncio.ensure_future(run_updates(fleet, rate, round(rate * plan.rate_duration), results))
        usage[f"updates_{rate:g}_per_s"] = await usage_during(hosts, cluster, plan.rate_duration)
        schedule = await task
        propagation[f"{rate:g}"] = propagation_figures(results, schedule)
        propagation[f"{rate:g}"] |= client.phase()
        raw.propagation[rate] = [r.served - r.sent for r in results if r.served is not None and r.sent is not None]
        await asyncio.sleep(SETTLE_S)  # one phase's backlog (etcd's, the hosts') must not land in the next
    print(f"fleet_sim: moving {plan.migrations} VMs", file=sys.stderr, flush=True)
    client.phase()
    before, wall = Usage(hosts, cluster), time.time()
    moves, schedule = await migration_wave(fleet, plan.migrations, plan.migration_rate, plan.tracked)
    usage["migration_wave"] = before.until(Usage(hosts, cluster))
    committed = await reconcile(fleet, moves)
    problems = await served_exactly_by_new_host(fleet, [m for m in moves if m.acked is not None])
    figures["migration"] = migration_figures(moves, schedule.first, plan.migration_rate, problems)
    figures["migration"] |= client.phase() | {"hosts_logged": logged_overlaps(hosts, moves, wall)}
    figures["migration"]["txn_failed_but_committed"] = committed
    raw.moves = moves
    print(f"fleet_sim: partition (outage {plan.outage:g} s)", file=sys.stderr, flush=True)
    raw.partition = await partition(
        fleet,
        cluster,
        segment_s=plan.segment,
        outage_s=plan.outage,
        read_rate=plan.read_rate,
        update_rate=plan.partition_rate,
        fresh_kv=lambda: new_kv(cluster, clients),
    )
    figures["partition"] = partition_figures(raw.partition, len(hosts))
    figures["partition"] |= client.phase()
    return figures, raw


# ---- the command line ----


def parse(argv: list[str]) -> tuple[Plan, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {QUICK.hosts} hosts x {QUICK.vms_per_host} VMs, short phases",
    )
    parser.add_argument("--hosts", type=int)
    parser.add_argument("--vms-per-host", type=int)
    parser.add_argument("--rates", help="updates a second, comma-separated (default 10,100,500)")
    parser.add_argument("--rate-duration", type=float, help="seconds at each rate")
    parser.add_argument("--migrations", type=int)
    parser.add_argument("--migration-rate", type=float, help="moves a second")
    parser.add_argument("--outage", type=float, help="seconds the whole etcd cluster stays stopped")
    parser.add_argument("--read-rate", type=float, help="reads a second through the partition phase")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", type=Path, help="default bench/results/fleet-<timestamp>/")
    parser.add_argument("--keep-logs", action="store_true", help="copy every host's and member's log into OUT/logs")
    args = parser.parse_args(argv)
    chosen = {
        name: value
        for name, value in vars(args).items()
        if name not in ("quick", "out", "keep_logs") and value is not None
    }
    if "rates" in chosen:
        chosen["rates"] = tuple(float(rate) for rate in chosen["rates"].split(",") if rate)
    plan = Plan(**{**asdict(QUICK if args.quick else Plan()), **chosen})
    if plan.hosts < 2 or not 1 <= plan.vms_per_host <= 62500 or plan.hosts * plan.vms_per_host > 1_000_000:
        parser.error("at least two hosts (a migration needs another), and 1 to 62500 VMs per host")
    return plan, args


async def run(plan: Plan, cluster: EtcdCluster, hosts: list[Host], base: Path) -> tuple[dict[str, Any], Raw]:
    """The simulation within the run's budget; SIGTERM cancels it (and the caller's cleanup runs)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    async with asyncio.timeout(plan.budget):
        return await simulate(plan, cluster, hosts, base)


def kill(hosts: list[Host]) -> None:
    for host in hosts:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(host.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            host.proc.wait(timeout=10)
        if host.proc.stdout is not None:
            host.proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plan, args = parse(argv)
    if (reason := etcd_missing()) is not None:
        print(f"fleet_sim: {reason}", file=sys.stderr)
        return 1
    started_utc = datetime.datetime.now(datetime.UTC)
    out: Path = args.out or REPO_ROOT / "bench" / "results" / f"fleet-{started_utc:%Y%m%d-%H%M%S}"
    box = machine(shlex.join(["python", "-m", "bench.fleet_sim", *argv]))
    base = Path(tempfile.mkdtemp(prefix="fleet-"))  # short: the hosts' admin sockets live here
    cluster = EtcdCluster(base / "etcd", 3)
    hosts: list[Host] = []
    started, failed = now(), True
    try:
        cluster.start()
        figures, raw = uvloop.run(run(plan, cluster, hosts, base))
        failed = False
    except (Exception, asyncio.CancelledError) as exc:
        print(f"fleet_sim: could not finish: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        kill(hosts)
        cluster.close()
        if failed or args.keep_logs:  # a failed run keeps what the hosts and members said
            (out / "logs").mkdir(parents=True, exist_ok=True)
            for log in [*base.glob("h*.log"), *base.glob("etcd/member-*.log")]:
                shutil.copy(log, out / "logs" / log.name)
            print(f"fleet_sim: logs in {out / 'logs'}", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
    report = {
        "machine": box,
        "plan": asdict(plan),
        "started_utc": started_utc.isoformat(timespec="seconds"),
        "run_s": now() - started,
        "figures": figures,
    }
    report["targets"] = [{**asdict(t), "result": t.verdict} for t in targets(figures)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "fleet.md").write_text(text)
    plot(out / "fleet.png", raw)
    print(text)
    print(f"fleet_sim: wrote {out}/fleet.json, fleet.md, fleet.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fleet simulation's figures, targets, Markdown and plot (bench/fleet_sim.py measures, this says what it found).

Rules of this module:
- Arithmetic on what the phases recorded (bench/fleet_phases.py), what /proc says (CPU, memory, the machine) and
  the three files it writes: it opens no socket and starts no process but `etcd --version`. Latencies come in as
  seconds and leave as milliseconds (`*_ms`); durations stay seconds (`*_s`).
- Percentiles are nearest rank over every sample, never interpolated: a p99 is a latency some update really had.
- A target is met, missed, or not measured (a phase skipped by the options); a lost update (acknowledged by etcd,
  never served) or an incomplete move fails its target whatever the percentiles say.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import re
import resource
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.fleet_phases import Host, Move, Partition, Schedule, Update, now
from tests.support.etcd import EtcdCluster

TARGET_SYNC_S = 5.0
TARGET_P99_MS = 100.0  # at TARGET_RATE updates a second; also the bound a migrated VM may be on two hosts
TARGET_RATE = "100"
TARGET_CONVERGE_S = 5.0


def summary(values: list[float]) -> dict[str, float]:
    """count, p50/p99/max/mean in ms of `values` (seconds), by nearest rank."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000

    mean = sum(ordered) / len(ordered) * 1000
    return {"count": len(ordered), "p50_ms": rank(0.5), "p99_ms": rank(0.99), "max_ms": rank(1.0), "mean_ms": mean}


def propagation_figures(results: list[Update], schedule: Schedule) -> dict[str, Any]:
    acked = [r for r in results if r.acked is not None]
    served = [r for r in acked if r.served is not None]
    span = schedule.last - schedule.first
    return {
        "scheduled": len(results) + schedule.skipped,
        "skipped": schedule.skipped,
        "writes_acked": len(acked),
        "writes_failed": len(results) - len(acked),
        "write_errors": dict(Counter(r.error for r in results if r.acked is None and r.error)),
        "lost": len(acked) - len(served),
        "achieved_per_s": len(acked) / span if span > 0 else None,
        # The headline: from the write's send, so etcd's own commit is in it.
        "sent_to_served": summary([r.served - r.sent for r in served if r.served and r.sent]),
        "acked_to_served": summary([r.served - r.acked for r in served if r.served and r.acked]),
        "sent_to_acked": summary([r.acked - r.sent for r in acked if r.acked and r.sent]),
    }


def migration_figures(moves: list[Move], first: float, rate: float, problems: list[str]) -> dict[str, Any]:
    done = [m for m in moves if m.sent is not None and m.old_stop is not None and m.new_start is not None]
    finished = [max(m.old_stop, m.new_start) for m in done if m.old_stop is not None and m.new_start is not None]
    tracked = [m for m in done if m.tracked]
    overlaps = [bound for m in tracked if (bound := m.overlap_bound()) is not None]
    # The point estimate: the old host's answer arrived after the new host's first 200 (both as the client saw them).
    both = [m for m in done if m.old_stop is not None and m.new_start is not None and m.old_stop > m.new_start]
    return {
        "moves": len(moves),
        "rate_per_s": rate,
        "txn_failed": sum(1 for m in moves if m.error is not None),
        "incomplete": sum(1 for m in moves if m.error is None) - len(done),
        # From the first transaction's send to the last VM served by its new host and by its old host no more.
        "wave_s": max(finished) - first if finished and len(done) == len(moves) else None,
        "sent_to_new_host": summary([m.new_start - m.sent for m in done if m.new_start and m.sent]),
        "sent_to_old_host_stop": summary([m.old_stop - m.sent for m in done if m.old_stop and m.sent]),
        "sent_to_acked": summary([m.acked - m.sent for m in moves if m.acked and m.sent]),
        "tracked": len(tracked),
        "overlap_bound": summary([max(0.0, bound) for bound in overlaps]),
        "moves_served_by_both": len(both),
        "served_by_both": summary([m.old_stop - m.new_start for m in both if m.old_stop and m.new_start]),
        "overlaps_over_bound": sum(1 for bound in overlaps if bound * 1000 > TARGET_P99_MS),
        "problems_after": len(problems),
        "problem_examples": problems[:10],
    }


SEGMENTS = [
    ("before the leader kill", "start", "leader_killed"),
    ("leader killed, until the cluster is whole again", "leader_killed", "leader_back"),
    ("between", "leader_back", "stop_all"),
    ("cluster stopping, stopped, starting", "stop_all", "etcd_back"),
    ("after etcd's return", "etcd_back", "end"),
]


def partition_figures(record: Partition, hosts: int) -> dict[str, Any]:
    events, reads = record.events, record.reads
    back, stop = events["etcd_back"], events["stop_all"]
    converged = [u.served - back for u in record.converge if u.served is not None]
    connected = next((at - back for at, count in record.connected if at >= back and count == hosts), None)
    noticed = next((at - stop for at, count in record.connected if at >= stop and count == 0), None)
    acked = [u for u in record.updates if u.acked is not None]

    def segment(a: str, b: str) -> dict[str, int]:
        inside = [r for r in reads if events[a] <= r.at < events[b]]
        return {"reads": len(inside), "failed": sum(1 for r in inside if not r.ok)}

    return {
        "events_s": {name: at - events["start"] for name, at in events.items()},
        "etcd_down_s": events["start_all"] - events["all_stopped"],
        "leader_restart_to_whole_s": events["leader_back"] - events["leader_restarted"],
        "reads": len(reads),
        "failed_reads": sum(1 for r in reads if not r.ok),
        "read_errors": dict(Counter(r.error for r in reads if not r.ok).most_common(10)),
        "reads_by_segment": {label: segment(a, b) for label, a, b in SEGMENTS},
        "updates_acked": len(acked),
        "updates_failed": len(record.updates) - len(acked),
        "updates_lost": sum(1 for u in acked if u.served is None),
        "update_sent_to_served": summary([u.served - u.sent for u in acked if u.served and u.sent]),
        "hosts": hosts,
        "hosts_converged": len(converged),
        "converge_s": max(converged) if len(converged) == hosts else None,
        "converge": summary(converged),
        "all_connected_after_s": connected,
        "all_disconnected_after_stop_s": noticed,
    }


def machine(command: str) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    memory = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    etcd = "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else shutil.which("etcd") or "etcd"
    version = subprocess.run([etcd, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    return {
        "cpu_model": model[1].strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory[1]) / 2**20, 1) if memory else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "etcd": version.split("\n", 1)[0].removeprefix("etcd Version: "),
        "load_average_before": Path("/proc/loadavg").read_text().split()[:3],
        "command": command,
    }


# ---- CPU and memory, from /proc ----

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_rss(pid: int) -> tuple[float, float] | None:
    """(CPU seconds, RSS MiB) of a process; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    rss = re.search(r"VmRSS:\s+(\d+)", status)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, int(rss[1]) / 1024 if rss else 0.0


def command_of(pid: int) -> str:
    with contextlib.suppress(OSError):
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
        return command.strip() or f"[{Path(f'/proc/{pid}/comm').read_text().strip()}]"  # a kernel thread
    return "?"


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy since boot: user, nice, system, irq, softirq (guest time is in user;
    idle, iowait and steal are not this machine's work)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


class Usage:
    """Every process's CPU seconds and RSS at one moment."""

    def __init__(self, hosts: list[Host], cluster: EtcdCluster) -> None:
        self.at = now()
        pids = {host.name: host.proc.pid for host in hosts}
        pids |= {m.name: m.process.pid for m in cluster.members if m.process is not None and m.running}
        self.procs = {name: found for name, pid in pids.items() if (found := cpu_rss(pid)) is not None}
        ours = {*pids.values(), os.getpid()}
        others = (int(entry) for entry in os.listdir("/proc") if entry.isdigit() and int(entry) not in ours)
        self.others = {pid: found[0] for pid in others if (found := cpu_rss(pid)) is not None}
        self.machine = machine_busy_s()
        own = resource.getrusage(resource.RUSAGE_SELF)
        self.client = own.ru_utime + own.ru_stime

    def until(self, later: Usage) -> dict[str, Any]:
        """CPU (% of one core) over [self, later] and RSS at `later`: hosts' mean and max, each member, the client."""
        span = later.at - self.at
        cpu = {n: (later.procs[n][0] - c) / span * 100 for n, (c, _) in self.procs.items() if n in later.procs}
        hosts = [name for name in cpu if name.startswith("h")]
        ours = sum(cpu.values()) + (later.client - self.client) / span * 100
        machine = (later.machine - self.machine) / span * 100
        return {
            "seconds": span,
            "host_cpu_pct": {"mean": sum(cpu[h] for h in hosts) / len(hosts), "max": max(cpu[h] for h in hosts)},
            "host_rss_mib": {
                "mean": sum(later.procs[h][1] for h in hosts) / len(hosts),
                "max": max(later.procs[h][1] for h in hosts),
            },
            "etcd": {n: {"cpu_pct": cpu[n], "rss_mib": later.procs[n][1]} for n in cpu if n.startswith("etcd")},
            "client_cpu_pct": (later.client - self.client) / span * 100,
            "machine_busy_pct": machine,
            "others_cpu_pct": machine - ours,  # the kernel's own work (softirq of loopback traffic) included
            "busiest_others": [
                {"pid": pid, "cpu_pct": round(pct, 1), "command": command_of(pid)}
                for pct, pid in sorted(
                    ((later.others[pid] - c) / span * 100, pid) for pid, c in self.others.items() if pid in later.others
                )[-3:]
                if pct >= 1
            ],
        }


async def usage_during(hosts: list[Host], cluster: EtcdCluster, seconds: float) -> dict[str, Any]:
    before = Usage(hosts, cluster)
    await asyncio.sleep(seconds)
    return before.until(Usage(hosts, cluster))


# ---- targets and Markdown ----


@dataclass(frozen=True)
class Target:
    name: str
    figure: str
    met: bool | None  # None: not measured in this run

    @property
    def verdict(self) -> str:
        return "n/a" if self.met is None else "PASS" if self.met else "MISS"


def targets(figures: dict[str, Any]) -> list[Target]:
    sync, found = figures["initial_sync"], []
    found.append(
        Target(
            f"every host synced within {TARGET_SYNC_S:g} s of start",
            f"{sync['synced_max_s']:.2f} s (slowest of {len(sync['hosts'])}; median {sync['synced_p50_s']:.2f} s)",
            sync["synced_max_s"] <= TARGET_SYNC_S,
        )
    )
    name = f"propagation p99 <= {TARGET_P99_MS:g} ms at {TARGET_RATE} updates/s (write sent -> served)"
    if (rate := figures["propagation"].get(TARGET_RATE)) is None:
        found.append(Target(name, "not run", None))
    else:
        p99, lost = rate["sent_to_served"].get("p99_ms", math.inf), rate["lost"]
        figure = f"{p99:.1f} ms (p50 {rate['sent_to_served'].get('p50_ms', math.nan):.1f}, {lost} lost)"
        found.append(Target(name, figure, p99 <= TARGET_P99_MS and lost == 0))
    move = figures["migration"]
    problems = move["txn_failed"] + move["incomplete"] + move["problems_after"]
    wave = f"{move['wave_s']:.2f} s" if move["wave_s"] is not None else "never"
    found.append(
        Target(
            f"migration wave: all {move['moves']} moved VMs served by exactly their new host",
            f"{wave} after the first move; {problems} moves wrong or unfinished",
            problems == 0 and move["wave_s"] is not None,
        )
    )
    bound, seen = move["overlap_bound"].get("max_ms", 0.0), move["served_by_both"].get("max_ms", 0.0)
    found.append(
        Target(
            f"migration wave: no VM on two hosts for longer than {TARGET_P99_MS:g} ms",
            f"{move['tracked']} tracked moves: at most {bound:.1f} ms (upper bound); all moves, as seen: "
            f"{move['moves_served_by_both']} on both, longest {seen:.1f} ms",
            move["overlaps_over_bound"] == 0 and seen <= TARGET_P99_MS and move["incomplete"] == 0,
        )
    )
    part = figures["partition"]
    found.append(
        Target(
            "zero failed reads through the leader kill and the outage",
            f"{part['failed_reads']} failed of {part['reads']}",
            part["failed_reads"] == 0 and part["reads"] > 0,
        )
    )
    converge = part["converge_s"]
    found.append(
        Target(
            f"every host converged within {TARGET_CONVERGE_S:g} s of etcd's return",
            (f"{converge:.2f} s" if converge is not None else f"{part['hosts'] - part['hosts_converged']} hosts never")
            + f" (all connected again after {_s(part['all_connected_after_s'])})",
            converge is not None and converge <= TARGET_CONVERGE_S,
        )
    )
    return found


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def _lag(phase: dict[str, Any]) -> str:
    """The client's event-loop lag over a phase (inside every latency it measured then)."""
    lag = phase.get("client_loop_lag", {})
    return f"{_ms(lag, 'p99_ms')} / {_ms(lag, 'max_ms')}"


def _ms(figures: dict[str, float], key: str) -> str:
    return f"{figures[key]:.1f}" if key in figures else "-"


def markdown(report: dict[str, Any]) -> str:
    figures, box, plan = report["figures"], report["machine"], report["plan"]
    lines = [
        f"# Fleet simulation: {plan['hosts']} hosts x {plan['vms_per_host']} VMs, three etcd members, one machine",
        "",
        f"{box['cpu_model']}, {box['cores']} cores, {box['memory_gib']} GiB; Linux {box['kernel']}; "
        f"Python {box['python']}; etcd {box['etcd']}. Load average before: {' '.join(box['load_average_before'])}; "
        f"other processes at rest: {figures['usage']['at_rest']['others_cpu_pct']:.0f}% of a core. "
        f"Run time {report['run_s']:.0f} s, started {report['started_utc']}.",
        "",
        f"`{box['command']}`",
        "",
        "| Target | Figure | Result |",
        "|---|---|---|",
        *(f"| {t.name} | {t.figure} | {t.verdict} |" for t in targets(figures)),
        "",
        "## Initial sync",
        "",
    ]
    sync = figures["initial_sync"]
    lines += [
        f"Every VM written to etcd first ({figures['load']['vms']} in {figures['load']['seconds']:.2f} s), then all "
        f"hosts spawned at once ({sync['spawn_loop_s']:.2f} s to fork them). A host is synced when it prints its ready "
        "line (after its first sync) if the first round of reads after it finds every one of its VMs served, else "
        f"when a later round does. Slowest ready line {sync['ready_max_s']:.2f} s, slowest host synced "
        f"{sync['synced_max_s']:.2f} s, every VM confirmed by the client at {sync['verified_max_s']:.2f} s. "
        f"The hosts had used {sync['hosts_cpu_until_ready_s']:.1f} CPU seconds between them by their ready lines: "
        f"{sync['cpu_floor_s']:.1f} s on {box['cores']} cores even with nothing else running.",
        "",
        "## Propagation (open-loop, random VMs over the fleet; long-poll opened before each write)",
        "",
        "| updates/s | achieved | p50 ms | p99 ms | max ms | ack->served p99 ms | write p99 ms | lost | failed "
        "| skipped | client lag p99 / max ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate, p in figures["propagation"].items():
        sent = p["sent_to_served"]
        lines.append(
            f"| {rate} | {p['achieved_per_s'] or 0:.1f} | {_ms(sent, 'p50_ms')} | {_ms(sent, 'p99_ms')} | "
            f"{_ms(sent, 'max_ms')} | {_ms(p['acked_to_served'], 'p99_ms')} | {_ms(p['sent_to_acked'], 'p99_ms')} | "
            f"{p['lost']} | {p['writes_failed']} | {p['skipped']} | {_lag(p)} |"
        )
    move = figures["migration"]
    logged = move["hosts_logged"]
    lines += [
        "",
        "Latencies run from the write's send (the headline: etcd's commit included) to the long-poll's answer with "
        "the new value; `ack->served` from etcd's acknowledgement instead.",
        "",
        f"## Migration wave: {move['moves']} VMs, one transaction each, {move['rate_per_s']:g} a second",
        "",
        f"Served by exactly the new host {_s(move['wave_s'])} after the first move. Per move, from the "
        f"transaction's send: new host serves it p50 {_ms(move['sent_to_new_host'], 'p50_ms')} / p99 "
        f"{_ms(move['sent_to_new_host'], 'p99_ms')} / max {_ms(move['sent_to_new_host'], 'max_ms')} ms; old host "
        f"stops p50 {_ms(move['sent_to_old_host_stop'], 'p50_ms')} / p99 {_ms(move['sent_to_old_host_stop'], 'p99_ms')}"
        f" / max {_ms(move['sent_to_old_host_stop'], 'max_ms')} ms; etcd acknowledged the transaction p99 "
        f"{_ms(move['sent_to_acked'], 'p99_ms')} ms. The old host's stop is its held long-poll's answer; the new "
        f"host's start is polled, every 10 ms for {move['tracked']} tracked moves and every 50 ms for the rest. "
        "On both hosts at once, tracked moves (upper bound: the old host's answer minus the new host's last 404 or "
        f"the send): p50 {_ms(move['overlap_bound'], 'p50_ms')}, max {_ms(move['overlap_bound'], 'max_ms')} ms; "
        f"all moves as seen (the old host's answer after the new host's first 200): {move['moves_served_by_both']} "
        f"moves, longest {_ms(move['served_by_both'], 'max_ms')} ms. "
        f"Wrong after the wave: {move['problems_after']}; transactions the client gave up on {move['txn_failed']} "
        f"({move.get('txn_failed_but_committed', 0)} committed all the same). "
        f"Client loop lag p99 / max {_lag(move)} ms. The hosts' own event logs (old host's `vm_removed` minus new "
        f"host's `update_applied`, ms, free of the client's lag) found {logged['moves_found']} moves: "
        f"{logged['on_both']} on both, p99 {_ms(logged['overlap'], 'p99_ms')} / max "
        f"{_ms(logged['overlap'], 'max_ms')} ms.",
        "",
    ]
    lines += partition_markdown(figures["partition"]) + usage_markdown(figures["usage"])
    return "\n".join(lines) + "\n"


def partition_markdown(part: dict[str, Any]) -> list[str]:
    events = ", ".join(f"{name} {at:.1f}" for name, at in part["events_s"].items())
    lines = [
        "## Partition: the leader killed, then the whole cluster stopped",
        "",
        f"Events (s from the phase's start): {events}. etcd fully down {part['etcd_down_s']:.1f} s. "
        f"Hosts all reported disconnected {_s(part['all_disconnected_after_stop_s'])} after the stop began; "
        f"all connected again {_s(part['all_connected_after_s'])} after etcd's return; every host served a value "
        f"written after the return within {_s(part['converge_s'])} (p50 {_ms(part['converge'], 'p50_ms')} ms). "
        f"Updates meanwhile: {part['updates_acked']} acknowledged, {part['updates_failed']} refused while etcd "
        f"was away, {part['updates_lost']} acknowledged but never served. Client loop lag p99 / max {_lag(part)} ms.",
        "",
        "| segment | reads | failed |",
        "|---|---|---|",
        *(f"| {label} | {s['reads']} | {s['failed']} |" for label, s in part["reads_by_segment"].items()),
    ]
    if part["read_errors"]:
        lines += ["", f"Read errors: {part['read_errors']}"]
    return [*lines, ""]


def usage_markdown(usage: dict[str, Any]) -> list[str]:
    lines = [
        "## CPU (% of one core) and memory per host",
        "",
        "| window | host CPU mean | host CPU max | host RSS mean MiB | host RSS max MiB | etcd CPU each | "
        "client CPU | machine busy | others |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for window, u in usage.items():
        etcd = " / ".join(f"{m['cpu_pct']:.0f}" for m in u["etcd"].values())
        lines.append(
            f"| {window.replace('_', ' ')} | {u['host_cpu_pct']['mean']:.1f} | {u['host_cpu_pct']['max']:.1f} | "
            f"{u['host_rss_mib']['mean']:.0f} | {u['host_rss_mib']['max']:.0f} | {etcd} | "
            f"{u['client_cpu_pct']:.0f} | {u['machine_busy_pct']:.0f} | {u['others_cpu_pct']:.0f} |"
        )
    busy = [
        f"{window}: {o['command']} ({o['cpu_pct']:.0f}%)" for window, u in usage.items() for o in u["busiest_others"]
    ]
    lines += [
        "",
        "`others`: the machine's busy CPU (/proc/stat) less that of the hosts, the members and the client: the "
        "kernel's own loopback work, and any other process. " + ("Busiest others: " + "; ".join(busy) if busy else ""),
    ]
    return [*lines, ""]


# ---- the plot ----


@dataclass
class Raw:
    """What the plot draws beyond the figures."""

    propagation: dict[float, list[float]] = field(default_factory=dict)
    moves: list[Move] = field(default_factory=list)
    partition: Partition | None = None


def _cdf(axes: Any, values: list[float], label: str) -> None:
    ordered = sorted(value * 1000 for value in values)
    if ordered:
        axes.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)


def plot(path: Path, raw: Raw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (spread, moves, outage) = plt.subplots(3, 1, figsize=(10, 13))
    for rate, values in raw.propagation.items():
        _cdf(spread, values, f"{rate:g} updates/s")
    spread.axvline(TARGET_P99_MS, linestyle="--", color="grey", label=f"{TARGET_P99_MS:g} ms")
    spread.set(xscale="log", xlabel="etcd write sent -> new value served by its host (ms)", ylabel="fraction")
    spread.set_title("Propagation")
    done = [m for m in raw.moves if m.sent and m.new_start and m.old_stop]
    _cdf(moves, [m.new_start - m.sent for m in done if m.new_start and m.sent], "new host serves it")
    _cdf(moves, [m.old_stop - m.sent for m in done if m.old_stop and m.sent], "old host stops")
    moves.set(xscale="log", xlabel="transaction sent -> (ms)", ylabel="fraction", title="Migration wave, per VM")
    if (record := raw.partition) is not None:
        start = record.events["start"]
        seconds = int(record.events["end"] - start)  # whole seconds only: a partial last one would read as a drop
        ok, failed, written = [0] * seconds, [0] * seconds, [0] * seconds
        for read in record.reads:
            if int(read.at - start) < seconds:
                (ok if read.ok else failed)[int(read.at - start)] += 1
        for update in record.updates:
            if update.acked is not None and int(update.acked - start) < seconds:
                written[int(update.acked - start)] += 1
        outage.plot(range(seconds), ok, label="reads ok /s")
        outage.plot(range(seconds), failed, label="reads failed /s", color="red")
        outage.plot(range(seconds), written, label="writes acked /s")
        hosts = outage.twinx()
        hosts.plot([at - start for at, _ in record.connected], [n for _, n in record.connected], color="black")
        hosts.set_ylabel("hosts connected to etcd (black)")
        for name, at in record.events.items():
            if name not in ("start", "end"):
                outage.axvline(at - start, linestyle=":", color="grey")
                outage.annotate(name, (at - start, 0), rotation=90, fontsize=7, va="bottom")
        outage.set(xlabel="s", ylabel="per second", title="Leader kill and whole-cluster outage")
    for axes in (spread, moves, outage):
        axes.legend(loc="upper left", fontsize=8)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

"""What telemetry costs, measured with the variants running at the same moments on one core.

    python -m bench.telemetry_cost [--rounds 7] [--duration 8] [--scenario keepalive-text-leaf]

Why a bench of its own: on the shared 2-core VM this project runs on, one
server's throughput swings by 10-20 % from one round to the next with the
neighbours' load, so alternating rounds (bench.compare) leave ratios of
0.85 +- 0.15. Here fastimds with telemetry off, with its counters (the
default) and with counters plus the request log run *concurrently*, pinned
to the same core, each driven by its own wrk (pinned to the other core).
Whatever slows the machine slows all three alike; each one's CPU time per
request (from /proc) then compares their cost, and their req/s ratio is
what each would serve alone given the same core.

The capacity ratio of a variant is off's CPU per request ÷ the variant's:
the share of off's throughput it keeps on a core of its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.compare import SCENARIOS, Load, Server, free_port, pin, process_cpu_s, wrk_command, wrk_result, wrk_script

VARIANTS: dict[str, list[str]] = {
    "off": ["--no-telemetry"],
    "counters": [],
    "request-log": ["--request-log", "{workdir}/request-log"],
}
TARGETS: dict[str, float | None] = {"counters": 0.95, "request-log": 0.85}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--duration", type=int, default=8, help="whole seconds per round")
    parser.add_argument("--connections", type=int, default=30, help="per variant")
    parser.add_argument("--scenario", default="keepalive-text-leaf", choices=[s.name for s in SCENARIOS])
    parser.add_argument("--out", type=Path, help="write the rounds as JSON here")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="also run fastimds with these serve arguments (space-separated; {workdir} is a temp dir)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also run another checkout's fastimds (telemetry off and counters, as baseline-off and "
        "baseline-counters) at the same moments: this tree's CPU per request against it",
    )
    args = parser.parse_args(argv)
    scenario = next(s for s in SCENARIOS if s.name == args.scenario)
    with tempfile.TemporaryDirectory(prefix="fastimds-telemetry-cost-") as tmp:
        workdir = Path(tmp)
        servers = {}
        variants = VARIANTS | {name: extra.split() for name, _, extra in (v.partition("=") for v in args.variant)}
        for name, extra in variants.items():
            port = free_port()
            command = [*pin("0"), sys.executable, "-m", "fastimds", "serve", "--port", str(port)]
            command += [part.format(workdir=workdir) for part in extra]
            servers[name] = Server(name, command, port=port)
        if args.baseline is not None:
            for name in ("off", "counters"):
                port = free_port()
                command = [*pin("0"), sys.executable, "-m", "fastimds", "serve", "--port", str(port), *VARIANTS[name]]
                servers[f"baseline-{name}"] = Server(
                    f"baseline-{name}", command, port=port, cwd=args.baseline.resolve()
                )
        script = wrk_script(workdir, scenario)
        rounds: list[dict[str, Any]] = []
        try:
            for server in servers.values():
                server.start(workdir)
            for index in range(args.rounds):
                rounds.append(one_round(servers, script, scenario.target, args))
                row = rounds[-1]
                print(
                    f"round {index + 1}/{args.rounds}: "
                    + ", ".join(f"{name} {row[name]['rps']:,.0f}/s {row[name]['cpu_us']:.2f} µs" for name in servers),
                    flush=True,
                )
        finally:
            for server in servers.values():
                server.stop()
    report = summarise(rounds, [name for name, _, _ in (v.partition("=") for v in args.variant)])
    if args.baseline is not None:
        report += against_baseline(rounds)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=2, default=str))
    return 0


def one_round(servers: dict[str, Server], script: Path, target: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every variant loaded at once for `duration` seconds; req/s and CPU µs per request of each."""
    load = Load(args.duration, args.connections, "1")
    cpu_before = {name: process_cpu_s(server.proc.pid) for name, server in servers.items() if server.proc}
    started = time.monotonic()
    runs = {
        name: subprocess.Popen(wrk_command(server.port, target, script, load), stdout=subprocess.PIPE, text=True)
        for name, server in servers.items()
    }
    row: dict[str, Any] = {}
    for name, run in runs.items():
        out, _ = run.communicate(timeout=args.duration + 60)
        result = wrk_result(out)
        proc = servers[name].proc
        assert proc is not None
        cpu_s = process_cpu_s(proc.pid) - cpu_before[name]
        row[name] = {"rps": result["rps"], "cpu_us": cpu_s * 1e6 / max(result["requests"], 1)}
    row["wall_s"] = time.monotonic() - started
    return row


def summarise(rounds: list[dict[str, Any]], extra: list[str]) -> str:
    lines = [
        "",
        "Concurrent on one core; medians of per-round ratios (spread), against telemetry off:",
        "",
        "| variant | capacity (CPU/request off ÷ on) | CPU µs/request on, off | target | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    off_cpu = statistics.median(row["off"]["cpu_us"] for row in rounds)
    for name, target in [*TARGETS.items(), *((name, None) for name in extra)]:
        ratios = [row["off"]["cpu_us"] / row[name]["cpu_us"] for row in rounds]
        median = statistics.median(ratios)
        cpu = statistics.median(row[name]["cpu_us"] for row in rounds)
        lines.append(
            f"| {name} | {median:.3f} ({min(ratios):.3f}–{max(ratios):.3f}) | {cpu:.2f}, {off_cpu:.2f} "
            + (f"| ≥ {target} | {'yes' if median >= target else '**no**'} |" if target is not None else "| | |")
        )
    return "\n".join(lines)


def against_baseline(rounds: list[dict[str, Any]]) -> str:
    """This tree against --baseline, each pair measured at the same moments on the same core."""
    lines = [
        "",
        "",
        "This tree against --baseline; capacity = baseline's CPU/request ÷ this tree's (per round; medians, spread):",
        "",
        "| variant | capacity | CPU µs/request this, baseline |",
        "| --- | --- | --- |",
    ]
    for name in ("off", "counters"):
        ratios = [row[f"baseline-{name}"]["cpu_us"] / row[name]["cpu_us"] for row in rounds]
        ours = statistics.median(row[name]["cpu_us"] for row in rounds)
        theirs = statistics.median(row[f"baseline-{name}"]["cpu_us"] for row in rounds)
        spread = f"({min(ratios):.3f}–{max(ratios):.3f})"
        lines.append(f"| {name} | {statistics.median(ratios):.3f} {spread} | {ours:.2f}, {theirs:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

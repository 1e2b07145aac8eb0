"""The side-by-side comparison's report: medians, ratios with their spread, targets met or not, charts.

Rules of this module:
- Everything here reads the rounds bench.compare measured; nothing runs a server.
- Ratios are per round (the same round's runs), then the median and spread of rounds.
- Every target the performance issue names is printed with "met" or "**no**", and a
  ratio the load generator's own core capped is marked so it is not read past what it shows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
from pathlib import Path
from typing import Any

from bench.compare import (
    CPU_TARGETS_VS_NGINX,
    FLEET_SIZE,
    FLEET_TARGET,
    P99_TARGET_VS_NGINX,
    SCENARIOS,
    TARGETS,
    WRK_BOUND_SHARE,
    Scenario,
)


def summarise(rounds: list[dict[str, Any]], servers: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for scenario in SCENARIOS:
        per_server: dict[str, Any] = {}
        for server in servers:
            runs = [r for r in rounds if r["server"] == server and r["scenario"] == scenario.name]
            if not runs:
                continue
            per_server[server] = {
                key: statistics.median(r[key] for r in runs) for key in ("rps", "p50_us", "p99_us", "max_us")
            }
            for key in ("cpu_us_per_request", "wrk_cpu_share"):
                if all(key in r for r in runs):
                    per_server[server][key] = statistics.median(r[key] for r in runs)
            per_server[server]["unexpected_status"] = sum(r["unexpected_status"] for r in runs)
            per_server[server]["socket_errors"] = sum(r["socket_errors"] for r in runs)
        ratios: dict[str, Any] = {}
        for reference in servers:
            if reference.startswith("fastimds"):
                continue  # fastimds variants are compared with fastimds in markdown()
            by_round = []
            for index in sorted({r["round"] for r in rounds}):
                ours = [r for r in rounds if r["round"] == index and r["server"] == "fastimds"]
                theirs = [r for r in rounds if r["round"] == index and r["server"] == reference]
                ours = [r for r in ours if r["scenario"] == scenario.name]
                theirs = [r for r in theirs if r["scenario"] == scenario.name]
                if ours and theirs:
                    by_round.append(ours[0]["rps"] / theirs[0]["rps"])
            if by_round:
                ratios[reference] = {
                    "median": statistics.median(by_round),
                    "min": min(by_round),
                    "max": max(by_round),
                    "rounds": by_round,
                    "target": TARGETS.get((scenario.name, reference)),
                }
        telemetry = telemetry_cost(rounds, scenario)
        summary[scenario.name] = {
            "servers": per_server,
            "ratios": ratios,
            "telemetry": telemetry,
            "rounds": [r for r in rounds if r["scenario"] == scenario.name],
        }
    return summary


def rounds_of(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for data in summary.values() for r in data["rounds"]]


def cpu_ratios(rounds: list[dict[str, Any]], scenario: str, reference: str = "nginx") -> list[float]:
    """Per round: fastimds's CPU per request ÷ the reference's, the same round and scenario."""
    ratios = []
    for index in sorted({r["round"] for r in rounds}):
        pair = {
            r["server"]: r
            for r in rounds
            if r["round"] == index and r["scenario"] == scenario and r["server"] in ("fastimds", reference)
        }
        if len(pair) == 2 and pair[reference].get("cpu_us_per_request"):
            ratios.append(pair["fastimds"]["cpu_us_per_request"] / pair[reference]["cpu_us_per_request"])
    return ratios


TELEMETRY_VARIANTS = ("fastimds", "fastimds-requestlog")  # each against fastimds-notelemetry


def telemetry_cost(rounds: list[dict[str, Any]], scenario: Scenario) -> dict[str, Any]:
    """Per variant, per round: req/s ÷ off and off's CPU per request ÷ the variant's (capacity), with medians."""
    cost: dict[str, Any] = {}
    for variant in TELEMETRY_VARIANTS:
        rps_ratios, cpu_ratios = [], []
        for index in sorted({r["round"] for r in rounds}):
            pair = {
                r["server"]: r
                for r in rounds
                if r["round"] == index and r["scenario"] == scenario.name and r["server"] in (variant, OFF)
            }
            if len(pair) == 2:
                rps_ratios.append(pair[variant]["rps"] / pair[OFF]["rps"])
                if "cpu_us_per_request" in pair[variant] and "cpu_us_per_request" in pair[OFF]:
                    cpu_ratios.append(pair[OFF]["cpu_us_per_request"] / pair[variant]["cpu_us_per_request"])
        if rps_ratios:
            cost[variant] = {
                "rps_ratio": statistics.median(rps_ratios),
                "rps_ratios": rps_ratios,
                "cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
                "cpu_ratios": cpu_ratios,
            }
    return cost


OFF = "fastimds-notelemetry"


def markdown(summary: dict[str, Any], info: dict[str, Any], args: argparse.Namespace, skipped: list[str]) -> str:
    lines = [
        f"# fastimds side-by-side ({dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')})",
        "",
        f"Machine: {info['cores']} cores, {info['cpu']}, kernel {info['kernel']}, Python {info['python']}; "
        f"fastimds build: {info.get('build', 'unknown')}.",
        f"Tools: {', '.join(f'{k} {v}' for k, v in info['tools'].items())}.",
        f"Command: `python -m bench.compare --rounds {args.rounds} --duration {args.duration} "
        f"--connections {args.connections}`; wrk -t1 -c{args.connections}, {args.duration} s per run, "
        f"rounds alternate servers; values are medians of {args.rounds} rounds.",
        "",
        "CPU µs/req: the server's user + system CPU (itself and its children, /proc) over the run ÷ requests.",
        f"wrk CPU: the share of one core wrk used; at ≥ {WRK_BOUND_SHARE:.0%} wrk was the bottleneck (marked †),",
        "so that server's req/s is what wrk could drive, and a req/s ratio against it says 'at least'.",
        "",
        "| scenario | server | req/s | p50 µs | p99 µs | max µs | CPU µs/req | wrk CPU | bad status | socket errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario, data in summary.items():
        for server, values in data["servers"].items():
            cpu = values.get("cpu_us_per_request")
            share = values.get("wrk_cpu_share")
            bound = " †" if share is not None and share >= WRK_BOUND_SHARE else ""
            lines.append(
                f"| {scenario} | {server} | {values['rps']:,.0f} | {values['p50_us']:,.0f} | {values['p99_us']:,.0f}"
                f" | {values['max_us']:,.0f} | {'' if cpu is None else f'{cpu:.2f}'}"
                f" | {'' if share is None else f'{share:.0%}{bound}'}"
                f" | {values['unexpected_status']} | {values['socket_errors']} |"
            )
    lines += [
        "",
        "Ratios are per round (fastimds ÷ reference, same round), then the median and spread of rounds.",
        "'nginx ÷ it' is the same ratio of medians for nginx: what a server doing no work in C reaches here.",
        "",
        "| scenario | fastimds ÷ | median | spread (min–max) | target | met | nginx ÷ it |",
        "| --- | --- | ---: | --- | ---: | --- | ---: |",
    ]
    for scenario, data in summary.items():
        servers = data["servers"]
        for reference, ratio in data["ratios"].items():
            target = ratio["target"]
            met = "" if target is None else ("yes" if ratio["median"] >= target else "**no**")
            ceiling = ""
            if reference != "nginx" and "nginx" in servers:
                ceiling = f"{servers['nginx']['rps'] / servers[reference]['rps']:.2f}"
            lines.append(
                f"| {scenario} | {reference} | {ratio['median']:.2f} | {ratio['min']:.2f}–{ratio['max']:.2f}"
                f" | {'' if target is None else f'≥ {target}'} | {met} | {ceiling} |"
            )
    lines += [
        "",
        "What telemetry costs (targets: counters on ≥ 0.95 × off; request log on ≥ 0.85 × off), medians of",
        "per-round ratios: req/s on ÷ off, and capacity = off's server CPU per request ÷ on's:",
        "",
        "| scenario | variant | req/s ratio (spread) | capacity ratio (spread) | CPU µs/request on, off |",
        "| --- | --- | --- | --- | --- |",
    ]
    for scenario, data in summary.items():
        servers = data["servers"]
        for variant, cost in data.get("telemetry", {}).items():
            label = {"fastimds": "counters", "fastimds-requestlog": "counters + request log"}[variant]
            rps = f"{cost['rps_ratio']:.2f} ({min(cost['rps_ratios']):.2f}–{max(cost['rps_ratios']):.2f})"
            capacity = (
                f"{cost['cpu_ratio']:.2f} ({min(cost['cpu_ratios']):.2f}–{max(cost['cpu_ratios']):.2f})"
                if cost["cpu_ratio"] is not None
                else "n/a"
            )
            cpu_on = servers.get(variant, {}).get("cpu_us_per_request")
            cpu_off = servers.get(OFF, {}).get("cpu_us_per_request")
            cpus = f"{cpu_on:.2f}, {cpu_off:.2f}" if cpu_on is not None and cpu_off is not None else "n/a"
            lines.append(f"| {scenario} | {label} | {rps} | {capacity} | {cpus} |")
    fleet = f"fastimds-{FLEET_SIZE}vms"
    lines += ["", f"{FLEET_SIZE} resident VMs ÷ one VM, req/s (target ≥ 0.9):", ""]
    for scenario, data in summary.items():
        servers = data["servers"]
        if "fastimds" in servers and fleet in servers:
            ratio = servers[fleet]["rps"] / servers["fastimds"]["rps"]
            lines.append(f"- {scenario}: {ratio:.2f} (met: {'yes' if ratio >= FLEET_TARGET else '**no**'})")
    lines += [
        "",
        "Server CPU per request, fastimds ÷ nginx (median and spread of per-round ratios):",
        "",
    ]
    for scenario in summary:
        ratios = cpu_ratios(rounds_of(summary), scenario)
        if ratios:
            target = CPU_TARGETS_VS_NGINX.get(scenario)
            met = (
                ""
                if target is None
                else f", target ≤ {target}: {'met' if statistics.median(ratios) <= target else '**no**'}"
            )
            lines.append(f"- {scenario}: {statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}){met}")
    lines += ["", f"p99 latency, fastimds ÷ nginx (target ≤ {P99_TARGET_VS_NGINX}):", ""]
    for scenario in ("keepalive-text-leaf", "keepalive-whole-document"):
        servers = summary.get(scenario, {}).get("servers", {})
        if "fastimds" in servers and "nginx" in servers:
            ratio = servers["fastimds"]["p99_us"] / max(servers["nginx"]["p99_us"], 1)
            met = "yes" if ratio <= P99_TARGET_VS_NGINX else "**no**"
            lines.append(f"- {scenario}: {ratio:.2f} (met: {met})")
    baseline_cpu = [
        (scenario, data["servers"]["fastimds"]["cpu_us_per_request"], data["servers"]["baseline"]["cpu_us_per_request"])
        for scenario, data in summary.items()
        if "cpu_us_per_request" in data["servers"].get("fastimds", {})
        and "cpu_us_per_request" in data["servers"].get("baseline", {})
    ]
    if baseline_cpu:
        lines += ["", "Server CPU per request, this tree ÷ --baseline (medians of rounds, µs):", ""]
        lines += [
            f"- {scenario}: {ours:.2f} ÷ {theirs:.2f} = {ours / theirs:.3f}" for scenario, ours, theirs in baseline_cpu
        ]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def charts(summary: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("charts skipped: pip install -e '.[bench]' for matplotlib")
        return []
    scenarios = list(summary)
    servers = sorted({s for data in summary.values() for s in data["servers"]}, key=lambda s: (s != "fastimds", s))
    width = 0.8 / max(len(servers), 1)
    written = []
    for metric, label, filename, log in (
        ("rps", "requests/s (median of rounds)", "throughput.png", False),
        ("p99_us", "p99 latency, µs (median of rounds; log scale)", "latency.png", True),
    ):
        figure, axes = plt.subplots(figsize=(11, 5))
        for index, server in enumerate(servers):
            values = [summary[s]["servers"].get(server, {}).get(metric, 0) for s in scenarios]
            axes.bar([i + index * width for i in range(len(scenarios))], values, width, label=server)
        axes.set_xticks([i + width * (len(servers) - 1) / 2 for i in range(len(scenarios))], scenarios, fontsize=8)
        axes.set_ylabel(label)
        if log:
            axes.set_yscale("log")
        axes.legend()
        figure.tight_layout()
        path = out / filename
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written

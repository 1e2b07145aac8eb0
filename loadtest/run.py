"""Run locust against a fresh fastimds at a fixed request rate; gate on SLOs.

    python -m loadtest.run [--rate 2000] [--duration 60] [--p50-ms 1] [--p99-ms 5] [--max-failures 0]

Starts `fastimds serve` on an ephemeral loopback port (with `--pin`, pinned
to core 0 and locust to the other cores, where `taskset` exists), runs
locust headless for a fixed time at `--rate` requests/s (users x per-user
constant throughput), writes locust's CSV and HTML report to
loadtest/results/<UTC time>/, and exits 1 when an SLO is broken, 0 when all
hold. Locust runs as one process per core when the rate needs more than one
process can offer (`--rate-per-process`).

SLOs are checked on locust's aggregated row: unexpected failures, p50 and
p99 response time, and the achieved rate (at least `--min-rate-fraction` of
the offered rate, so a saturated generator cannot pass by sending less).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.server_process import running_server

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "loadtest" / "results"
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"


@dataclass(frozen=True)
class Slo:
    max_failures: int = 0
    p50_ms: float = 1.0
    p99_ms: float = 5.0
    min_rate_fraction: float = 0.95


@dataclass(frozen=True)
class Outcome:
    requests: int
    failures: int
    rate: float
    p50_ms: float
    p99_ms: float


def read_aggregate(stats_csv: Path) -> Outcome:
    """The "Aggregated" row of locust's <prefix>_stats.csv."""
    with open(stats_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == "Aggregated":
                return Outcome(
                    requests=int(row["Request Count"]),
                    failures=int(row["Failure Count"]),
                    rate=float(row["Requests/s"]),
                    p50_ms=float(row["50%"]),
                    p99_ms=float(row["99%"]),
                )
    raise ValueError(f"{stats_csv} has no Aggregated row")


def broken_slos(outcome: Outcome, slo: Slo, offered_rate: float) -> list[str]:
    """Every SLO the outcome breaks, each as a sentence with both numbers."""
    broken = []
    if outcome.requests == 0:
        return ["no request completed"]
    if outcome.failures > slo.max_failures:
        broken.append(f"{outcome.failures} unexpected failures (allowed {slo.max_failures})")
    if outcome.p50_ms > slo.p50_ms:
        broken.append(f"p50 {outcome.p50_ms:g} ms > {slo.p50_ms:g} ms")
    if outcome.p99_ms > slo.p99_ms:
        broken.append(f"p99 {outcome.p99_ms:g} ms > {slo.p99_ms:g} ms")
    if outcome.rate < slo.min_rate_fraction * offered_rate:
        broken.append(
            f"achieved {outcome.rate:,.0f} req/s < {slo.min_rate_fraction:.0%} of the offered {offered_rate:,.0f}"
        )
    return broken


def locust_command(args: argparse.Namespace, host: str, prefix: Path, cores: int, pin: bool) -> tuple[list[str], int]:
    processes = max(1, min(max(cores - 1, 1), math.ceil(args.rate / args.rate_per_process)))
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host]
    command += ["--users", str(args.users), "--spawn-rate", str(args.users), "--run-time", f"{args.duration}s"]
    command += ["--csv", str(prefix), "--html", str(prefix.parent / "report.html"), "--only-summary"]
    command += ["--stop-timeout", "5", "--loglevel", "WARNING"]
    if processes > 1:
        command += ["--processes", str(processes)]
    if pin:
        command = ["taskset", "-c", f"1-{cores - 1}", *command]
    return command, processes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=2000.0, help="offered requests/s (default 2000)")
    parser.add_argument("--duration", type=int, default=60, help="seconds of load (default 60)")
    parser.add_argument("--users", type=int, default=50, help="simulated VMs (default 50; see tuning.md)")
    parser.add_argument("--p50-ms", type=float, default=Slo.p50_ms)
    parser.add_argument("--p99-ms", type=float, default=Slo.p99_ms)
    parser.add_argument("--max-failures", type=int, default=Slo.max_failures)
    parser.add_argument("--min-rate-fraction", type=float, default=Slo.min_rate_fraction)
    parser.add_argument("--rate-per-process", type=float, default=1500.0, help="what one locust process offers")
    parser.add_argument("--out", type=Path, help="results folder (default loadtest/results/<UTC time>)")
    parser.add_argument("--workers", type=int, default=1, help="fastimds workers")
    parser.add_argument("--pin", action="store_true", help="server on core 0, locust on the others (taskset)")
    args = parser.parse_args(argv)
    slo = Slo(args.max_failures, args.p50_ms, args.p99_ms, args.min_rate_fraction)

    out = args.out or RESULTS_DIR / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    env = {**os.environ, "LOADTEST_USER_RPS": str(args.rate / args.users)}
    server_args = ["--workers", str(args.workers)]
    pin = args.pin and cores >= 2 and bool(shutil.which("taskset"))
    with running_server(*server_args, prefix=["taskset", "-c", "0"] if pin and args.workers == 1 else []) as server:
        command, processes = locust_command(args, server.base_url, out / "locust", cores, pin)
        print(f"offering {args.rate:,.0f} req/s from {args.users} users, {processes} locust process(es), "
              f"{args.duration} s against {server.base_url}", flush=True)  # fmt: skip
        done = subprocess.run(command, env=env, cwd=REPO, timeout=args.duration + 120, check=False)
    if done.returncode not in (0, 1):  # locust exits 1 when any request failed; the SLOs judge that
        print(f"locust exited with {done.returncode}", file=sys.stderr)
        return 2
    outcome = read_aggregate(out / "locust_stats.csv")
    print(
        f"requests {outcome.requests:,}  failures {outcome.failures}  rate {outcome.rate:,.0f} req/s  "
        f"p50 {outcome.p50_ms:g} ms  p99 {outcome.p99_ms:g} ms   (report: {out / 'report.html'})"
    )
    broken = broken_slos(outcome, slo, args.rate)
    for line in broken:
        print(f"SLO broken: {line}")
    print("SLOs met" if not broken else f"{len(broken)} SLO(s) broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

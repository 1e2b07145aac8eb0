"""One VM floods a worker with fresh-token requests: how long another VM waits, with and without it.

    python -m bench.tenant_flood [--requests 20000] [--alone 2000] [--interval-ms 2] [--json FILE]
                                 [-- extra fastimds serve flags, e.g. --signatures-per-vm 1e9]

Starts `fastimds serve --workers 1 --data-dir D` with two VMs (tests/support/
tenant_flood.py, the same flood the end-to-end test runs). The other VM
sends `--alone` single requests on its own connection, one every
`--interval-ms`, with nothing else running; then VM "flooder" pipelines
`--requests` token requests for resources never asked before, on one
connection, while the other VM goes on until the flood's last reply is
read. Prints the other VM's p50/p99/max round trip alone and during the
flood, side by side from one run, and the flood's 200/429 counts (every
reply is checked to arrive in order). The issue's target on the two-core
machine: during the flood, p99 <= 20 ms and max <= 100 ms. Exits 1 if a
flood reply was missing, out of order or neither 200 nor 429.

Run it on a quiet machine: it is a benchmark (reliability.md, "High: one
tenant stalling others").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests.support.server_process import running_server
from tests.support.tenant_flood import FLOOD_REQUESTS, FloodRun, measure, write_fleet

TARGET_P99_MS = 20.0
TARGET_MAX_MS = 100.0


def report(run: FloodRun) -> dict[str, object]:
    return {
        "other_vm_alone": run.alone.summary(),
        "other_vm_during_flood": run.during.summary(),
        "flood": {
            "replies": run.flood.replies,
            "ok_200": run.flood.ok,
            "refused_429": run.flood.refused,
            "seconds": run.flood.seconds,
            "problems": run.flood.problems,
        },
        "other_vm_errors": run.alone.errors + run.during.errors,
    }


def print_table(run: FloodRun) -> None:
    alone, during = run.alone.summary(), run.during.summary()
    print(f"{'other VM':<22}{'alone':>12}{'during flood':>16}")
    print(f"{'requests':<22}{alone['requests']:>12.0f}{during['requests']:>16.0f}")
    for key in ("p50_ms", "p99_ms", "max_ms", "mean_ms"):
        label = key.replace("_ms", " (ms)")
        print(f"{label:<22}{alone[key]:>12.3f}{during[key]:>16.3f}")
    flood = run.flood
    print(
        f"flood: {flood.replies} replies in {flood.seconds:.2f} s: {flood.ok} x 200, {flood.refused} x 429"
        + (f"; PROBLEMS: {flood.problems[:3]}" if flood.problems else "; all in order")
    )
    met = during["p99_ms"] <= TARGET_P99_MS and during["max_ms"] <= TARGET_MAX_MS
    print(f"target p99 <= {TARGET_P99_MS:.0f} ms, max <= {TARGET_MAX_MS:.0f} ms: {'met' if met else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=FLOOD_REQUESTS, help="the flood's pipelined token requests")
    parser.add_argument("--alone", type=int, default=2000, help="the other VM's requests before the flood")
    parser.add_argument("--interval-ms", type=float, default=2.0, help="between the other VM's requests")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("serve_flags", nargs="*", help="after --: extra `fastimds serve` flags")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastimds-flood-") as directory:
        data_dir = Path(directory)
        write_fleet(data_dir)
        with running_server("--data-dir", str(data_dir), "--workers", "1", *args.serve_flags) as server:
            run = measure(server.port, args.requests, alone=args.alone, interval_s=args.interval_ms / 1000)
    print_table(run)
    if args.json is not None:
        args.json.write_text(json.dumps(report(run), indent=2) + "\n")
    return 1 if run.flood.problems or run.alone.errors or run.during.errors else 0


if __name__ == "__main__":
    sys.exit(main())

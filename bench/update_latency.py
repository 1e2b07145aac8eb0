"""How long after an admin write's reply every worker serves the new data.

    python -m bench.update_latency [--workers 2] [--updates 300] [--interval-ms 50]

Starts `fastimds serve --workers N --data-dir D --admin-socket S`, sends
`--updates` PATCHes (each moves the VM's location) through the admin socket,
one every `--interval-ms`, and notes when each reply arrived. Every worker
logs `update_applied` with its time when it publishes a generation, so the
latency is that time minus the reply's, per worker and generation: no
polling, no sampling error beyond the log's millisecond resolution. A
negative latency means the worker published before the client had read the
reply. Prints p50/p99/max over every (worker, update) and writes JSON.

The event log is rate-limited (fastimds.ops.event_log: a burst of 100 lines, then 20
a second per event), so updates faster than that lose `update_applied`
lines, not updates: the default interval keeps under it, and a run that
misses lines says so (`missing_per_worker`) and exits 1.
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

from fastimds.cli.admin import UnixHTTPConnection

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--interval-ms", type=float, default=50.0, help="between updates (see the rate limit above)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fastimds-latency-") as tmp:
        work = Path(tmp)
        data_dir = work / "vms"
        data_dir.mkdir()
        sample = json.loads((REPO / "fastimds" / "sample_vm.json").read_text())
        (data_dir / "vm1.json").write_text(json.dumps(sample))
        socket_path = work / "admin.sock"
        stderr_path = work / "stderr.log"
        command = [sys.executable, "-m", "fastimds", "serve", "--port", "0", "--workers", str(args.workers)]
        command += ["--data-dir", str(data_dir), "--admin-socket", str(socket_path)]
        with open(stderr_path, "wb") as stderr:
            server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO)
        try:
            assert server.stdout is not None
            print(server.stdout.readline().decode().strip(), flush=True)
            replies: dict[int, float] = {}
            for index in range(args.updates):
                patch = json.dumps({"instance": {"compute": {"location": f"region-{index}"}}}).encode()
                connection = UnixHTTPConnection(str(socket_path), timeout=10)
                connection.request("PATCH", "/vms/vm1", body=patch, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                body = json.loads(response.read())
                replied = time.time()
                connection.close()
                if response.status != 200:
                    raise SystemExit(f"PATCH refused: {response.status} {body}")
                replies[body["generation"]] = replied
                time.sleep(args.interval_ms / 1000)
            time.sleep(1.0)  # let the last update reach every worker
        finally:
            server.terminate()
            server.wait(10)
            if server.stdout is not None:
                server.stdout.close()
        events = [json.loads(line) for line in stderr_path.read_text().splitlines() if line.startswith("{")]

    workers = {event["pid"] for event in events if event["event"] == "worker_ready"}
    latencies: dict[int, list[float]] = {pid: [] for pid in workers}
    for event in events:
        if event["event"] == "update_applied" and event["pid"] in workers and event["generation"] in replies:
            latencies[event["pid"]].append((event["ts"] - replies[event["generation"]]) * 1000)
    every = sorted(value for values in latencies.values() for value in values)
    missing = {pid: len(replies) - len(values) for pid, values in latencies.items() if len(values) != len(replies)}
    quantiles = statistics.quantiles(every, n=100) if len(every) >= 2 else [every[0]] * 99
    result = {
        "workers": args.workers,
        "updates": len(replies),
        "interval_ms": args.interval_ms,
        "samples": len(every),
        "p50_ms": statistics.median(every),
        "p99_ms": quantiles[98],
        "max_ms": every[-1],
        "min_ms": every[0],
        "missing_per_worker": missing,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())

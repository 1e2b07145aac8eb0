"""How long a /metrics scrape takes with many VMs.

    python -m bench.scrape_time [--vms 1000] [--workers 2] [--scrapes 50]

Starts `fastimds serve --workers N --data-dir D --admin-socket S` with D
holding `--vms` VMs (bench.compare's fleet), sends a request to warm every
worker, then times `--scrapes` GETs of /metrics over the admin socket and
prints the median and max in milliseconds (target: under 50 ms at 1,000 VMs).
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

from bench.compare import fleet_dir
from fastimds.cli.admin import UnixHTTPConnection

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scrapes", type=int, default=50)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastimds-scrape-") as tmp:
        work = Path(tmp)
        data_dir = fleet_dir(work, args.vms)
        socket_path = work / "admin.sock"
        command = [sys.executable, "-m", "fastimds", "serve", "--port", "0", "--workers", str(args.workers)]
        command += ["--data-dir", str(data_dir), "--admin-socket", str(socket_path)]
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
        try:
            assert server.stdout is not None
            print(server.stdout.readline().decode().strip(), flush=True)
            time.sleep(1.5)  # every worker has published its counters
            timings = []
            size = 0
            for _ in range(args.scrapes):
                connection = UnixHTTPConnection(str(socket_path), timeout=10)
                started = time.perf_counter()
                connection.request("GET", "/metrics")
                body = connection.getresponse().read()
                timings.append((time.perf_counter() - started) * 1000)
                connection.close()
                size = len(body)
        finally:
            server.terminate()
            server.wait(10)
            if server.stdout is not None:
                server.stdout.close()
    result = {
        "vms": args.vms,
        "workers": args.workers,
        "scrapes": args.scrapes,
        "bytes": size,
        "median_ms": statistics.median(timings),
        "max_ms": max(timings),
        "first_ms": timings[0],
        "max_after_first_ms": max(timings[1:]) if len(timings) > 1 else None,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

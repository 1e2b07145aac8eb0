"""Hostile clients, run as their own process so they never share the measuring test's interpreter.

    python -m tests.support.hostile_clients loris PORT --sources 127.0.1.1,127.0.1.2 --idle 500 --slow 500
    python -m tests.support.hostile_clients hammer PORT --source 127.0.0.2 --seconds 3

`loris` opens idle connections (nothing sent) and slow ones (a request head
sent a byte a second, each on its own schedule, never finished), prints one JSON line `{"open": t}`
when all are connected, then watches them until the server has closed every
one (or --timeout passes) and prints one JSON summary line: per connection
its kind, when its first byte went, when it closed, how (eof or reset), and
the status of what the server wrote before closing. `hammer` sends pipelined
requests on one keep-alive connection as fast as the server answers them and
prints the count of each status. Times are time.monotonic(), which is
system-wide, so the test can compare them with its own. Loopback only; both
stop by their own deadline.
"""

from __future__ import annotations

import argparse
import heapq
import json
import selectors
import socket
import sys
import time
from typing import Any

# Long enough never to finish at a byte a second within any test.
SLOW_HEAD = (
    b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: 169.254.169.254\r\n"
    b"Metadata: true\r\nUser-Agent: slow-loris/1.0\r\n\r\n"
)
HAMMER_REQUEST = (
    b"GET /metadata/instance/compute/vmId?api-version=2021-02-01&format=text HTTP/1.1\r\n"
    b"Host: 169.254.169.254\r\nMetadata: true\r\n\r\n"
)
HAMMER_DEPTH = 32  # requests per send


def loris(port: int, sources: list[str], *, idle: int, slow: int, interval_s: float, timeout_s: float) -> None:
    selector = selectors.DefaultSelector()
    conns: list[dict[str, Any]] = []
    for index in range(idle + slow):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((sources[index % len(sources)], 0))
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        conn: dict[str, Any] = {
            "kind": "slow" if index < slow else "idle",
            "sock": sock,
            "sent": 0,
            "opened": time.monotonic(),
            "first_byte": None,
            "closed": None,
            "how": None,
            "received": b"",
        }
        if conn["kind"] == "slow":
            sock.send(SLOW_HEAD[:1])
            conn["sent"], conn["first_byte"] = 1, time.monotonic()
        selector.register(sock, selectors.EVENT_READ, conn)
        conns.append(conn)
    opened_at = time.monotonic()
    print(json.dumps({"open": opened_at, "connections": len(conns)}), flush=True)

    # Each slow connection drips on its own schedule, spread evenly over the
    # interval: a thousand attackers do not send in step.
    drips = [(opened_at + interval_s * (n + 1) / max(1, slow), n) for n in range(slow)]
    give_up_at = opened_at + timeout_s
    open_count = len(conns)
    while open_count and time.monotonic() < give_up_at:
        next_drip = drips[0][0] if drips else give_up_at
        for key, _ in selector.select(timeout=max(0.0, min(next_drip, give_up_at) - time.monotonic())):
            conn = key.data
            try:
                data = conn["sock"].recv(65536)
            except ConnectionResetError:
                data, conn["how"] = b"", "reset"
            if data:
                conn["received"] += data
                continue
            conn["closed"], conn["how"] = time.monotonic(), conn["how"] or "eof"
            selector.unregister(conn["sock"])
            conn["sock"].close()
            open_count -= 1
        while drips and drips[0][0] <= time.monotonic():
            due, index = heapq.heappop(drips)
            conn = conns[index]
            if conn["closed"] is not None or conn["sent"] >= len(SLOW_HEAD):
                continue
            try:
                conn["sock"].send(SLOW_HEAD[conn["sent"] : conn["sent"] + 1])
                conn["sent"] += 1
            except OSError:
                continue  # closed under us: the read side reports it
            heapq.heappush(drips, (due + interval_s, index))
    summary = []
    for conn in conns:
        status_line = conn["received"].split(b"\r\n", 1)[0].decode("latin-1")
        summary.append(
            {
                "kind": conn["kind"],
                "opened": conn["opened"],
                "first_byte": conn["first_byte"],
                "closed": conn["closed"],
                "how": conn["how"],
                "status": int(status_line.split()[1]) if status_line.startswith("HTTP/1.1 ") else None,
                "sent": conn["sent"],
            }
        )
        if conn["closed"] is None:
            conn["sock"].close()
    print(json.dumps({"connections": summary}), flush=True)


def hammer(port: int, source: str, seconds: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.settimeout(5.0)
    counts: dict[int, int] = {}
    batch = HAMMER_REQUEST * HAMMER_DEPTH
    buffer = b""
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        sock.sendall(batch)
        answered = 0
        while answered < HAMMER_DEPTH:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                chunk = sock.recv(262144)
                if not chunk:
                    raise ConnectionError("the server closed the hammer's connection")
                buffer += chunk
                continue
            head = buffer[:head_end]
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            if len(buffer) < head_end + 4 + length:
                buffer += sock.recv(262144)
                continue
            status = int(head.split(b" ", 2)[1])
            counts[status] = counts.get(status, 0) + 1
            buffer = buffer[head_end + 4 + length :]
            answered += 1
    sock.close()
    print(json.dumps({"statuses": {str(code): n for code, n in sorted(counts.items())}}), flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.hostile_clients")
    commands = parser.add_subparsers(dest="command", required=True)
    slow = commands.add_parser("loris")
    slow.add_argument("port", type=int)
    slow.add_argument("--sources", default="127.0.0.1")
    slow.add_argument("--idle", type=int, default=0)
    slow.add_argument("--slow", type=int, default=0)
    slow.add_argument("--interval", type=float, default=1.0)
    slow.add_argument("--timeout", type=float, default=30.0)
    hard = commands.add_parser("hammer")
    hard.add_argument("port", type=int)
    hard.add_argument("--source", default="127.0.0.1")
    hard.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.command == "loris":
        loris(
            args.port,
            args.sources.split(","),
            idle=args.idle,
            slow=args.slow,
            interval_s=args.interval,
            timeout_s=args.timeout,
        )
    else:
        hammer(args.port, args.source, args.seconds)


if __name__ == "__main__":
    main(sys.argv[1:])

"""`fastimds probe URL`: a dial tone from outside. Real IMDS requests, availability, latency, an exit code.

Rules of this module:
- Every probe is a real IMDS request (`Metadata: true`) on a NEW connection
  (http.client), as a fresh VM process would make it: connect, request, read
  the whole reply. Its latency is all of that, in milliseconds.
- URL is the IMDS base (http://127.0.0.1:8080): the probes then alternate
  between DEFAULT_TARGETS, a text leaf and the whole JSON document. A URL
  with a path (and query) probes exactly that target.
- A probe succeeds on HTTP 200 with a non-blank body that, when the reply
  says it is JSON, parses as JSON. Anything else (refused, timed out, another
  status, an empty vmId) fails, with the reason on its line.
- Probes start on a fixed schedule (`--interval` apart, not after one
  another), --count N of them (0: until stopped). SIGINT and SIGTERM stop
  it early, with the summary. One line per probe unless --quiet, then the
  summary; latency percentiles are over the successful probes.
- Exit 0 when availability (successes / probes) >= --threshold, 1 when it is
  below (no probe at all is 0 % available), 2 on bad arguments: for cron and
  for monitoring systems that run a command and read its exit code.
"""

from __future__ import annotations

import argparse
import http.client
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Final
from urllib.parse import urlsplit

import orjson

from fastimds import __version__
from fastimds.cli.durations import format_moment, parse_duration

DEFAULT_TARGETS: Final = (
    "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
    "/metadata/instance?api-version=2021-02-01",
)
DEFAULT_INTERVAL: Final = "1s"
DEFAULT_TIMEOUT: Final = "2s"
DEFAULT_THRESHOLD: Final = 0.99
USER_AGENT: Final = f"fastimds-probe/{__version__}"
PERCENTILES: Final = (50, 90, 99)


class UsageError(ValueError):
    """A bad argument: exit 2 with this message."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="the IMDS base (http://169.254.169.254) or a full target URL")
    parser.add_argument(
        "--interval", default=DEFAULT_INTERVAL, help=f"between probe starts (default {DEFAULT_INTERVAL})"
    )
    parser.add_argument("--count", type=int, default=0, help="probes to send, 0 until stopped (default 0)")
    parser.add_argument("--timeout", default=DEFAULT_TIMEOUT, help=f"per probe (default {DEFAULT_TIMEOUT})")
    parser.add_argument(
        "--threshold",
        default=str(DEFAULT_THRESHOLD),
        help=f"lowest availability that exits 0: a fraction or a percentage (default {DEFAULT_THRESHOLD})",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


@dataclass(frozen=True)
class Plan:
    scheme: str
    host: str
    port: int
    targets: tuple[str, ...]
    interval_s: float
    count: int
    timeout_s: float
    threshold: float


def plan_of(args: argparse.Namespace) -> Plan:
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"URL {args.url!r}: expected http://HOST[:PORT][/PATH?QUERY]")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UsageError(f"URL {args.url!r}: bad port") from None
    targets: tuple[str, ...]
    if parts.path in ("", "/") and not parts.query:
        targets = DEFAULT_TARGETS
    else:
        targets = ((parts.path or "/") + (f"?{parts.query}" if parts.query else ""),)
    try:
        interval_s = parse_duration(args.interval)
        timeout_s = parse_duration(args.timeout)
    except ValueError as exc:
        raise UsageError(f"--interval/--timeout: {exc}") from None
    if timeout_s <= 0:
        raise UsageError("--timeout must be more than 0")
    if args.count < 0:
        raise UsageError(f"--count must be 0 (forever) or more, not {args.count}")
    return Plan(
        parts.scheme, parts.hostname, port, targets, interval_s, args.count, timeout_s, parse_threshold(args.threshold)
    )


def parse_threshold(text: str) -> float:
    """0.99 or 99%: a fraction between 0 and 1."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"--threshold {text!r}: expected a fraction (0.99) or a percentage (99%)") from None
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"--threshold {text!r}: must be between 0 and 1 (0 % and 100 %)")
    return value


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status: int | None
    latency_s: float
    size: int
    error: str | None


def probe_once(plan: Plan, target: str) -> Outcome:
    """One request on a new connection; never raises for a network or HTTP failure."""
    connection_class = http.client.HTTPSConnection if plan.scheme == "https" else http.client.HTTPConnection
    started = time.perf_counter()
    connection = connection_class(plan.host, plan.port, timeout=plan.timeout_s)
    try:
        connection.request("GET", target, headers={"Metadata": "true", "User-Agent": USER_AGENT})
        response = connection.getresponse()
        body = response.read()
        content_type = response.getheader("Content-Type") or ""
    except (OSError, http.client.HTTPException) as exc:
        return Outcome(False, None, time.perf_counter() - started, 0, _describe(exc))
    finally:
        connection.close()
    latency_s = time.perf_counter() - started
    status = response.status
    error = None
    if status != 200:
        error = f"HTTP {status}"
    elif not body.strip():
        error = "empty body"
    elif content_type.startswith("application/json"):
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            error = "body is not JSON"
    return Outcome(error is None, status, latency_s, len(body), error)


def _describe(exc: BaseException) -> str:
    text = str(exc) or "no detail"
    return f"{type(exc).__name__}: {text}"


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (not empty)."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Tally:
    threshold: float
    probes: int = 0
    successes: int = 0
    latencies_s: list[float] = field(default_factory=list)  # successful probes only

    def add(self, outcome: Outcome) -> None:
        self.probes += 1
        if outcome.ok:
            self.successes += 1
            self.latencies_s.append(outcome.latency_s)

    @property
    def availability(self) -> float:
        return self.successes / self.probes if self.probes else 0.0

    @property
    def passed(self) -> bool:
        return self.probes > 0 and self.availability >= self.threshold

    def summary_line(self) -> str:
        ordered = sorted(self.latencies_s)
        stats = [(f"p{pct}", percentile(ordered, pct) if ordered else None) for pct in PERCENTILES]
        stats.append(("max", ordered[-1] if ordered else None))
        latency = " ".join(f"{name}_ms={'-' if value is None else f'{value * 1000:.3f}'}" for name, value in stats)
        return (
            f"summary probes={self.probes} successes={self.successes} failures={self.probes - self.successes} "
            f"availability={self.availability * 100:.2f}% threshold={self.threshold * 100:.2f}% {latency}"
        )


def probe_line(number: int, target: str, outcome: Outcome) -> str:
    line = (
        f"{format_moment(time.time())} probe={number} result={'ok' if outcome.ok else 'fail'} "
        f"status={outcome.status if outcome.status is not None else '-'} "
        f"latency_ms={outcome.latency_s * 1000:.3f} bytes={outcome.size} target={target}"
    )
    return line if outcome.error is None else f"{line} error={orjson.dumps(outcome.error).decode()}"


class Stop(Exception):
    """SIGTERM: end early with the summary, as SIGINT does."""


@contextmanager
def sigterm_stops() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        raise Stop

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    try:
        plan = plan_of(args)
    except UsageError as exc:
        print(f"fastimds probe: {exc}", file=sys.stderr)
        return 2
    tally = Tally(plan.threshold)
    try:
        with sigterm_stops():
            probe_loop(plan, tally, quiet=args.quiet)
    except (KeyboardInterrupt, Stop):
        pass
    print(tally.summary_line(), flush=True)
    return 0 if tally.passed else 1


def probe_loop(plan: Plan, tally: Tally, quiet: bool) -> None:
    """Probe on schedule until `plan.count` probes are done (forever with 0)."""
    anchor = time.monotonic()
    number = 0
    while plan.count == 0 or number < plan.count:
        target = plan.targets[number % len(plan.targets)]
        outcome = probe_once(plan, target)
        number += 1
        tally.add(outcome)
        if not quiet:
            print(probe_line(number, target, outcome), flush=True)
        if plan.count and number >= plan.count:
            return
        delay = anchor + number * plan.interval_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -plan.interval_s:  # far behind (a long timeout): start a new schedule, no burst
            anchor = time.monotonic() - number * plan.interval_s

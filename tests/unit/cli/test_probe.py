"""`fastimds probe`: against a real `fastimds serve`, a closed port, and a scripted flaky server."""

from __future__ import annotations

import http.server
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import pytest

from fastimds.cli.main import main
from fastimds.cli.probe import DEFAULT_TARGETS, Outcome, Tally, percentile
from tests.support.server_process import ServerProcess, running_server

SUMMARY = re.compile(
    r"^summary probes=(?P<probes>\d+) successes=(?P<successes>\d+) failures=(?P<failures>\d+) "
    r"availability=(?P<availability>\d+\.\d\d)% threshold=(?P<threshold>\d+\.\d\d)% "
    r"p50_ms=(?P<p50>[\d.]+|-) p90_ms=(?P<p90>[\d.]+|-) p99_ms=(?P<p99>[\d.]+|-) max_ms=(?P<max>[\d.]+|-)$"
)
PROBE_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z probe=(?P<number>\d+) result=(?P<result>ok|fail) "
    r"status=(?P<status>\d{3}|-) latency_ms=(?P<latency>\d+\.\d{3}) bytes=(?P<bytes>\d+) target=(?P<target>\S+)"
    r'(?: error="(?P<error>[^"]*)")?$'
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server() as served:
        yield served


def probe(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[re.Match[str]], re.Match[str]]:
    code = main(["probe", *argv])
    *lines, last = capsys.readouterr().out.splitlines()
    summary = SUMMARY.match(last)
    assert summary is not None, last
    matches = [PROBE_LINE.match(line) for line in lines]
    assert all(matches), lines
    return code, [m for m in matches if m is not None], summary


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when we return: nothing listens


def test_a_healthy_server_is_100_percent_available(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code, lines, summary = probe(capsys, server.base_url, "--count", "5", "--interval", "50ms")
    elapsed = time.monotonic() - started
    assert code == 0
    assert summary["probes"] == "5" and summary["successes"] == "5" and summary["failures"] == "0"
    assert summary["availability"] == "100.00" and summary["threshold"] == "99.00"
    assert all(summary[name] != "-" for name in ("p50", "p90", "p99", "max"))
    assert float(summary["p50"]) <= float(summary["p90"]) <= float(summary["p99"]) <= float(summary["max"])
    assert [line["number"] for line in lines] == ["1", "2", "3", "4", "5"]
    assert [line["target"] for line in lines] == [*DEFAULT_TARGETS, *DEFAULT_TARGETS, DEFAULT_TARGETS[0]]
    assert {line["result"] for line in lines} == {"ok"} and {line["status"] for line in lines} == {"200"}
    assert lines[0]["bytes"] == str(len(server.vm_id))  # the vmId, as text
    assert int(lines[1]["bytes"]) > 1000  # the whole document
    assert 0.2 <= elapsed < 5  # four intervals of 50 ms between five probes


def test_a_full_target_url_probes_that_target(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    target = "/metadata/instance/compute/location?api-version=2021-02-01&format=text"
    code, lines, summary = probe(capsys, server.url(target), "--count", "2", "--interval", "10ms")
    assert code == 0 and summary["availability"] == "100.00"
    assert [line["target"] for line in lines] == [target, target]


def test_an_error_reply_is_a_failure(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, summary = probe(capsys, server.url("/metadata/instance?api-version=1999-01-01"), "--count", "1")
    assert code == 1 and summary["availability"] == "0.00"
    assert lines[0]["result"] == "fail" and lines[0]["status"] == "400" and lines[0]["error"] == "HTTP 400"


def test_quiet_prints_only_the_summary(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, summary = probe(capsys, server.base_url, "--count", "3", "--interval", "0", "--quiet")
    assert code == 0 and lines == [] and summary["probes"] == "3"


def test_a_closed_port_is_0_percent_available(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    code, lines, summary = probe(capsys, f"http://127.0.0.1:{port}", "--count", "3", "--interval", "10ms")
    assert code == 1
    assert (summary["probes"], summary["successes"], summary["availability"]) == ("3", "0", "0.00")
    assert summary["p50"] == summary["max"] == "-"  # no successful probe, no latency
    assert all(line["result"] == "fail" and line["status"] == "-" for line in lines)
    assert lines[0]["error"] is not None and "Connection refused" in lines[0]["error"]


class Scripted(http.server.BaseHTTPRequestHandler):
    """Replies taken in turn from `script`: (status, content type, body)."""

    script: ClassVar[list[tuple[int, str, bytes]]] = []
    seen: ClassVar[list[tuple[str, str | None]]] = []
    lock = threading.Lock()

    def do_GET(self) -> None:
        with self.lock:
            status, content_type, body = self.script[len(self.seen) % len(self.script)]
            self.seen.append((self.path, self.headers.get("Metadata")))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[tuple[str, type[Scripted]]]:
    handler = type("Handler", (Scripted,), {"script": [], "seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


OK_TEXT = (200, "text/plain; charset=utf-8", b"b1f2c3d4")
OK_JSON = (200, "application/json; charset=utf-8", b'{"compute": {}}')


@pytest.mark.parametrize(
    ("threshold", "expected_code"),
    [("0.5", 0), ("50%", 0), ("0.51", 1), ("0", 0), ("1", 1)],
)
def test_threshold_decides_the_exit_code(
    scripted: tuple[str, type[Scripted]], capsys: pytest.CaptureFixture[str], threshold: str, expected_code: int
) -> None:
    url, handler = scripted
    handler.script = [OK_TEXT, (503, "application/json", b'{"error": "x"}')]
    code, _, summary = probe(capsys, url, "--count", "4", "--interval", "0", "--threshold", threshold)
    assert (summary["successes"], summary["availability"]) == ("2", "50.00")
    assert code == expected_code


def test_what_counts_as_success(scripted: tuple[str, type[Scripted]], capsys: pytest.CaptureFixture[str]) -> None:
    url, handler = scripted
    handler.script = [
        OK_TEXT,
        OK_JSON,
        (200, "text/plain", b""),  # an empty vmId
        (200, "application/json", b"{not json"),
        (200, "text/plain", b"  \n"),
        (404, "application/json", b'{"error": "Not found"}'),
    ]
    code, lines, summary = probe(capsys, url, "--count", "6", "--interval", "0", "--threshold", "0.3")
    assert [line["result"] for line in lines] == ["ok", "ok", "fail", "fail", "fail", "fail"]
    assert [line["error"] for line in lines[2:]] == ["empty body", "body is not JSON", "empty body", "HTTP 404"]
    assert code == 0 and summary["availability"] == "33.33"
    assert [path for path, _ in handler.seen] == [*DEFAULT_TARGETS] * 3
    assert {metadata for _, metadata in handler.seen} == {"true"}


def test_a_timeout_is_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        code, lines, _ = probe(capsys, f"http://127.0.0.1:{port}", "--count", "1", "--timeout", "200ms")
        assert time.monotonic() - started < 3
    assert code == 1 and lines[0]["error"] is not None and "timed out" in lines[0]["error"]


def test_percentiles_and_the_summary_line() -> None:
    assert percentile([1.0], 99) == 1.0
    values = [float(n) for n in range(1, 101)]
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    tally = Tally(threshold=0.99)
    assert not tally.passed  # no probe: nothing shows it is available
    for latency_ms in (1.0, 2.0, 3.0, 4.0):
        tally.add(Outcome(True, 200, latency_ms / 1000, 10, None))
    tally.add(Outcome(False, None, 9.0, 0, "refused"))
    assert tally.summary_line() == (
        "summary probes=5 successes=4 failures=1 availability=80.00% threshold=99.00% "
        "p50_ms=2.000 p90_ms=4.000 p99_ms=4.000 max_ms=4.000"
    )
    assert not tally.passed
    tally.threshold = 0.8
    assert tally.passed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ftp://127.0.0.1"], "URL 'ftp://127.0.0.1'"),
        (["http://"], "URL 'http://'"),
        (["http://127.0.0.1:99999"], "URL 'http://127.0.0.1:99999': bad port"),
        (["http://127.0.0.1", "--interval", "fast"], "--interval/--timeout: 'fast' is not a duration"),
        (["http://127.0.0.1", "--timeout", "0"], "--timeout must be more than 0"),
        (["http://127.0.0.1", "--count", "-1"], "--count must be 0"),
        (["http://127.0.0.1", "--threshold", "1.5"], "--threshold '1.5': must be between 0 and 1"),
        (["http://127.0.0.1", "--threshold", "most"], "--threshold 'most': expected a fraction"),
    ],
)
def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(["probe", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"fastimds probe: {message}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_it_with_the_summary(server: ServerProcess, signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastimds", "probe", server.base_url, "--interval", "50ms"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 15
        with selectors.DefaultSelector() as selector:  # wait for three probe lines, with a deadline
            selector.register(proc.stdout, selectors.EVENT_READ)
            while len(lines) < 3 and time.monotonic() < deadline:
                if selector.select(timeout=1):
                    lines.append(proc.stdout.readline().decode())
        assert len(lines) == 3, lines
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    *more, last = out.decode().splitlines()
    summary = SUMMARY.match(last)
    assert summary is not None, (out, err)
    assert int(summary["probes"]) == len(lines) + len(more) >= 3
    assert summary["availability"] == "100.00"
    assert proc.returncode == 0 and err == b""

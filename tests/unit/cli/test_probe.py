"""`fastimds probe`: against a closed port, a silent one, and a scripted flaky server, in process.

Probes of a real `fastimds serve`, and the probe as a process that a signal stops,
are in tests/e2e/test_probe_e2e.py.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import pytest

from fastimds.cli.main import main
from fastimds.cli.probe import DEFAULT_TARGETS, Outcome, Tally, percentile
from tests.support.probe_output import probe


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when we return: nothing listens


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
    # serve_forever checks for shutdown() every poll_interval: its 0.5 s default made each teardown wait 0.5 s.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
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

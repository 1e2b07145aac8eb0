"""`fastimds probe` against a real `fastimds serve`, in process and as its own process.

Probes of closed, silent and scripted servers are in tests/unit/cli/test_probe.py.
"""

from __future__ import annotations

import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from fastimds.cli.probe import DEFAULT_TARGETS
from tests.support.probe_output import SUMMARY, probe
from tests.support.server_process import ServerProcess, running_server


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server() as served:
        yield served


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

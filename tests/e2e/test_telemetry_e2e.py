"""/metrics and /readyz against a real multi-worker server."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.admin_token import write_token_file
from tests.support.server_process import admin_unix, fresh_get, log_events, poll_until, running_server, worker_pids

LEAF = "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text"


def metrics(url: str, token: str) -> dict[str, float]:
    """/metrics over the TCP admin port: it names every VM id, so it needs the token there."""
    response = requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert response.status_code == 200, response.text
    text = response.text
    return {
        sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def served_ok(url: str, token: str) -> float:
    return metrics(url, token).get("fastimds_requests_total|category=instance|code=200", 0.0)


def test_one_scrape_sums_every_worker_and_survives_a_restart(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token = write_token_file(token_file)
    args = ("--workers", "2", "--admin-port", "0", "--admin-token-file", str(token_file))
    with running_server(*args) as server:
        [admin_url] = [name for name in server.admin if name.startswith("http")]
        for _ in range(40):
            assert fresh_get(server.port, LEAF)[0] == 200
        # Workers publish once a second.
        assert poll_until(lambda: served_ok(admin_url, token) == 40, timeout=5)
        samples = metrics(admin_url, token)
        assert samples["fastimds_workers"] == 2
        assert samples["fastimds_connections_opened_total"] >= 40
        assert samples["fastimds_vms"] == 1
        ready = requests.get(f"{admin_url}/readyz", timeout=5)
        assert (ready.status_code, ready.json()["workers_serving"]) == (200, [1, 1])

        # A killed worker's replacement continues its counts: the total never drops.
        victim = min(worker_pids(server))
        os.kill(victim, signal.SIGKILL)
        assert poll_until(lambda: len(worker_pids(server)) == 2 and victim not in worker_pids(server))
        assert served_ok(admin_url, token) >= 40
        for _ in range(10):
            assert fresh_get(server.port, LEAF)[0] == 200
        assert poll_until(lambda: served_ok(admin_url, token) == 50, timeout=5)
        counted = metrics(admin_url, token)
        assert counted["fastimds_requests_total|category=admin|code=200"] >= 1  # the scrapes themselves
        assert log_events(server, "worker_exited")


def test_readyz_is_503_while_a_worker_is_down(tmp_path: Path) -> None:
    socket_path = tmp_path / "a.sock"
    with running_server("--workers", "2", "--admin-socket", str(socket_path)) as server:
        assert poll_until(lambda: admin_unix(socket_path, "GET", "/readyz")[0] == 200)
        victim = min(worker_pids(server))
        os.kill(victim, signal.SIGSTOP)  # alive but not ticking
        try:
            assert poll_until(lambda: admin_unix(socket_path, "GET", "/readyz")[0] == 503, timeout=6)
            _status, body = admin_unix(socket_path, "GET", "/readyz")
            assert None in body["workers_serving"]
        finally:
            os.kill(victim, signal.SIGCONT)
        assert poll_until(lambda: admin_unix(socket_path, "GET", "/readyz")[0] == 200, timeout=6)


def test_no_telemetry_serves_no_metrics(tmp_path: Path) -> None:
    with running_server("--no-telemetry", "--admin-socket", str(tmp_path / "a.sock")) as server:
        assert fresh_get(server.port, LEAF)[0] == 200
        status, body = admin_unix(tmp_path / "a.sock", "GET", "/metrics")
        assert status == 404
        assert "--no-telemetry" in body["error"]


def test_request_log_end_to_end(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    log_dir = tmp_path / "requests"
    with running_server("--request-log", str(log_dir)) as server:
        for _ in range(3):
            assert fresh_get(server.port, LEAF)[0] == 200
        assert fresh_get(server.port, "/metadata/instance")[0] == 400  # no api-version
    # Stopped: the worker flushed and closed its file. `fastimds logs` reads it back.
    found = subprocess.run(
        [sys.executable, "-m", "fastimds", "logs", str(log_dir)], capture_output=True, text=True, timeout=30, check=True
    )
    records = [json.loads(line) for line in found.stdout.splitlines()]
    assert [(r["status"], r["target"]) for r in records] == [(200, LEAF)] * 3 + [(400, "/metadata/instance")]
    assert {r["caller"] for r in records} == {"127.0.0.1"}
    assert {r["vm"] for r in records} == {"default"} and {r["generation"] for r in records} == {1}
    assert all(r["latency_us"] >= 0 and r["method"] == "GET" for r in records)


def test_a_request_log_folder_that_cannot_be_made_is_refused_at_start() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "fastimds", "serve", "--port", "0", "--request-log", "/proc/no/such/folder"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "--request-log" in done.stderr

"""Side-by-side load comparison on loopback: fastimds against references.

    python -m bench.compare [--rounds 5] [--duration 10] [--connections 50]

Servers (each started once, measured in alternating rounds A B A B ...):
  fastimds       one worker (and `fastimds-wN`, N workers, where the machine
                 has cores to spare for the load generator)
  nginx          one worker, `return 200` with byte-identical body and
                 Content-Type: the C reference for "a server that does no work"
  uvicorn        httptools + uvloop, a minimal ASGI app (bench/reference_app.py)
  granian        the same ASGI app
Load: wrk (Debian package `wrk`), one thread. Where `taskset` exists and
there are two or more cores, servers are pinned to core 0 and wrk to core 1,
so every server gets exactly one core and the generator never competes.

Every reference is checked to answer each scenario with the same status,
Content-Type and body as fastimds before it is measured. A reference that
cannot start is skipped with the reason (and how to install it).

Output in bench/results/<UTC time>/: results.json (every round), summary.md
(medians, ratios with their spread, targets), throughput.png, latency.png.

What telemetry costs is also measured as server CPU time per request (from
/proc, for the one-process fastimds variants): on this shared VM req/s swings
by 10-20 % between rounds with the neighbours' load, while CPU per request
only moves with the work the server itself does.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"

TEXT_LEAF = "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text"
WHOLE_DOCUMENT = "/metadata/instance?api-version=2021-02-01"


@dataclass(frozen=True)
class Scenario:
    name: str
    target: str
    metadata: bool = True
    pipeline: int = 1
    close: bool = False
    status: int = 200


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("keepalive-text-leaf", TEXT_LEAF),
    Scenario("keepalive-whole-document", WHOLE_DOCUMENT),
    Scenario("pipeline-16", TEXT_LEAF, pipeline=16),
    Scenario("connection-close", TEXT_LEAF, close=True),
    Scenario("error-missing-header", WHOLE_DOCUMENT, metadata=False, status=400),
)

# Targets from the performance issue: fastimds / reference, medians of one run.
TARGETS: dict[tuple[str, str], float] = {
    ("keepalive-text-leaf", "nginx"): 1.0,
    ("keepalive-whole-document", "nginx"): 1.0,
    ("pipeline-16", "nginx"): 4.0,
    ("connection-close", "nginx"): 0.9,
    **{(s.name, "uvicorn"): 4.0 for s in SCENARIOS},
    **{(s.name, "granian"): 2.0 for s in SCENARIOS},
}
P99_TARGET_VS_NGINX = 1.5  # fastimds p99 <= 1.5 x nginx p99, keep-alive scenarios
FLEET_TARGET = 0.9  # 1,000 resident VMs within 10 % of one VM


# ---------------------------------------------------------------- replies ----


def reference_replies() -> dict[str, tuple[int, str, str]]:
    """What fastimds answers for every scenario, for the references to copy."""
    from fastimds.imds.datafile import load_vm
    from fastimds.imds.render import ERRORS
    from fastimds.imds.routing import resolve
    from fastimds.imds.snapshot import build_snapshot

    snapshot = build_snapshot(load_vm(None), generation=1)
    replies: dict[str, tuple[int, str, str]] = {}
    for target in {s.target for s in SCENARIOS}:
        reply = resolve(snapshot, b"GET", target.encode(), True, False)
        replies[target] = (reply.status, _content_type(reply.head), reply.body.decode())
    for key, name in (("<missing-header>", "missing_metadata_header"), ("<not-found>", "not_found")):
        reply = ERRORS[name]
        replies[key] = (reply.status, _content_type(reply.head), reply.body.decode())
    return replies


def _content_type(head: bytes) -> str:
    for line in head.decode().split("\r\n"):
        if line.lower().startswith("content-type: "):
            return line.split(": ", 1)[1]
    raise ValueError("reply without Content-Type")


# ---------------------------------------------------------------- servers ----


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(cores: str | None) -> list[str]:
    return ["taskset", "-c", cores] if cores and shutil.which("taskset") else []


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    skipped: str = ""
    cwd: Path = REPO  # `python -m fastimds` imports the fastimds of this folder

    def start(self, workdir: Path) -> None:
        log = open(workdir / f"{self.name}.log", "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, cwd=self.cwd
        )
        give_up = time.monotonic() + 20
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: see {workdir / (self.name + '.log')}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen on {self.port} within 20 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{locations}
    }}
}}
"""


def _nginx_string(text: str) -> str:
    if "$" in text:
        raise ValueError("nginx would expand '$' in a return body")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def nginx_config(tmp: Path, port: int, replies: dict[str, tuple[int, str, str]]) -> str:
    missing_status, missing_type, missing_body = replies["<missing-header>"]
    locations = []
    for path in sorted({s.target.split("?")[0] for s in SCENARIOS}):
        status, content_type, body = next(r for t, r in replies.items() if t.split("?")[0] == path)
        # nginx sets one Content-Type per location, so only JSON locations answer the
        # missing-header 400 (the error scenario targets the JSON document).
        check = ""
        if content_type == missing_type:
            check = f"if ($http_metadata !~* ^true$) {{ return {missing_status} {_nginx_string(missing_body)}; }}"
        locations.append(
            f"        location = {path} {{\n"
            f'            default_type "{content_type}";\n'
            f"            {check}\n"
            f"            return {status} {_nginx_string(body)};\n"
            f"        }}"
        )
    return NGINX_CONF.format(tmp=tmp, port=port, locations="\n".join(locations))


FLEET_SIZE = 1000


def fleet_dir(workdir: Path, count: int = FLEET_SIZE) -> Path:
    """`count` VM files: the sample itself for 127.0.0.1 (so replies match the
    other servers byte for byte) and count-1 others with their own ids and IPs."""
    sample = json.loads((REPO / "fastimds" / "sample_vm.json").read_text())
    directory = workdir / "fleet"
    directory.mkdir()
    for index in range(count):
        document = json.loads(json.dumps(sample))
        if index == count // 2:
            document["callers"] = ["127.0.0.1"]
        else:
            compute = document["instance"]["compute"]
            compute["vmId"] = f"00000000-0000-4000-8000-{index:012d}"
            compute["name"] = f"fleet-vm-{index}"
            for nic, interface in enumerate(document["instance"]["network"]["interface"]):
                for slot, address in enumerate(interface["ipv4"]["ipAddress"]):
                    address["privateIpAddress"] = f"10.{100 + nic}.{index // 250}.{(index % 250) * 4 + slot + 1}"
                interface["ipv6"]["ipAddress"] = []
        (directory / f"vm-{index:05d}.json").write_text(json.dumps(document))
    return directory


def build_servers(
    workdir: Path,
    replies_path: Path,
    server_cores: str | None,
    cores: int,
    workers: int,
    *,
    baseline: Path | None = None,
) -> list[Server]:
    python = sys.executable
    servers = []
    if baseline is not None:
        # Another checkout of fastimds (an earlier commit), measured as a reference:
        # `baseline` ratios are this tree's throughput over that one's, round by round.
        port = free_port()
        command = [*pin(server_cores), python, "-m", "fastimds", "serve", "--port", str(port)]
        servers.append(Server("baseline", command, port=port, cwd=baseline.resolve()))
    port = free_port()
    servers.append(
        Server("fastimds", [*pin(server_cores), python, "-m", "fastimds", "serve", "--port", str(port)], port=port)
    )
    # What telemetry costs: the same server counting nothing, and with the cold-path request log on.
    for name, extra in (
        ("fastimds-notelemetry", ["--no-telemetry"]),
        ("fastimds-requestlog", ["--request-log", str(workdir / "request-log")]),
    ):
        port = free_port()
        command = [*pin(server_cores), python, "-m", "fastimds", "serve", "--port", str(port), *extra]
        servers.append(Server(name, command, port=port))
    # The many-VM scenario: the same server with 1,000 resident VMs. wrk cannot
    # choose source addresses, so every request comes from 127.0.0.1 (one of the
    # VMs): this measures what 1,000 resident VMs cost, not switching between
    # them, which happens once per connection, not per request.
    port = free_port()
    command = [*pin(server_cores), python, "-m", "fastimds", "serve", "--port", str(port)]
    servers.append(Server(f"fastimds-{FLEET_SIZE}vms", [*command, "--data-dir", str(fleet_dir(workdir))], port=port))
    if workers > 1:
        port = free_port()
        # Pinned to its own cores only where wrk keeps cores of its own.
        cores_for_workers = f"0-{workers - 1}" if cores >= 2 * workers else None
        command = [*pin(cores_for_workers), python, "-m", "fastimds", "serve", "--port", str(port)]
        servers.append(Server(f"fastimds-w{workers}", [*command, "--workers", str(workers)], port=port))
    else:
        print(f"fastimds-wN: skipped, {cores} cores leave none for more workers beside wrk (--workers N forces it)")

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    port = free_port()
    if nginx:
        conf = workdir / "nginx.conf"
        replies = json.loads(replies_path.read_text())
        conf.write_text(nginx_config(workdir, port, {k: tuple(v) for k, v in replies.items()}))
        servers.append(Server("nginx", [*pin(server_cores), nginx, "-c", str(conf), "-e", "stderr"], port=port))
    else:
        servers.append(Server("nginx", [], port=port, skipped="nginx not found: apt-get install nginx-light"))

    env = {"BENCH_REPLIES": str(replies_path)}
    port = free_port()
    uvicorn_cmd = [*pin(server_cores), python, "-m", "uvicorn", "bench.reference_app:app", "--port", str(port)]
    uvicorn_cmd += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    uvicorn_cmd += ["--backlog", "4096"]
    servers.append(Server("uvicorn", uvicorn_cmd, env=env, port=port))

    port = free_port()
    granian_cmd = [*pin(server_cores), python, "-m", "granian", "--interface", "asgi", "--port", str(port)]
    granian_cmd += ["--workers", "1", "--loop", "uvloop", "--no-ws", "--log-level", "warning", "--backlog", "4096"]
    servers.append(Server("granian", [*granian_cmd, "bench.reference_app:app"], env=env, port=port))
    for server in servers:
        module = {"uvicorn": "uvicorn", "granian": "granian"}.get(server.name)
        if module and not _importable(module):
            server.skipped = f"{module} not installed: pip install -e '.[bench]'"
    return servers


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------ the checks ----


def raw_exchange(port: int, scenario: Scenario) -> tuple[int, str, bytes]:
    """One request, as wrk will send it; returns status, Content-Type, body."""
    headers = "Host: 127.0.0.1\r\n"
    if scenario.metadata:
        headers += "Metadata: true\r\n"
    headers += "Connection: close\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {scenario.target} HTTP/1.1\r\n{headers}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    if "content-length" in fields:
        body = body[: int(fields["content-length"])]
    return int(lines[0].split()[1]), fields.get("content-type", ""), body


# ------------------------------------------------------------------ wrk ----

WRK_SCRIPT = """
wrk.method = "GET"
{headers}
local depth = {depth}
local batch
init = function(args)
  local parts = {{}}
  for i = 1, depth do parts[i] = wrk.format(nil, "{target}") end
  batch = table.concat(parts)
end
request = function() return batch end
done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk_script(workdir: Path, scenario: Scenario) -> Path:
    headers = []
    if scenario.metadata:
        headers.append('wrk.headers["Metadata"] = "true"')
    if scenario.close:
        headers.append('wrk.headers["Connection"] = "close"')
    path = workdir / f"{scenario.name}.lua"
    path.write_text(WRK_SCRIPT.format(headers="\n".join(headers), depth=scenario.pipeline, target=scenario.target))
    return path


@dataclass(frozen=True)
class Load:
    duration: int
    connections: int
    cores: str | None


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of one process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_command(port: int, target: str, script: Path, load: Load) -> list[str]:
    """One wrk thread driving `script` (wrk_script) at `port`, pinned to `load.cores`."""
    command = [*pin(load.cores), "wrk", "-t1", f"-c{load.connections}", f"-d{load.duration}s", "-s", str(script)]
    return [*command, f"http://127.0.0.1:{port}{target.partition('?')[0]}"]


def wrk_result(out: str) -> dict[str, Any]:
    """The summary line WRK_SCRIPT prints, with `rps` added."""
    line = next(line for line in out.splitlines() if line.startswith("WRKJSON "))
    result: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def run_wrk(port: int, scenario: Scenario, script: Path, load: Load) -> dict[str, Any]:
    command = wrk_command(port, scenario.target, script, load)
    out = subprocess.run(command, capture_output=True, text=True, timeout=load.duration + 60, check=True).stdout
    result = wrk_result(out)
    # wrk counts non-2xx as status errors; the error scenario expects them.
    result["unexpected_status"] = 0 if scenario.status != 200 else result["status"]
    result["socket_errors"] = result["connect"] + result["read"] + result["write"] + result["timeout"]
    return result


# ------------------------------------------------------------- reporting ----


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for tool, args in (("wrk", ["wrk", "--version"]), ("nginx", ["nginx", "-v"])):
        with contextlib.suppress(OSError):
            done = subprocess.run(args, capture_output=True, text=True, check=False)
            versions[tool] = (done.stdout + done.stderr).strip().splitlines()[0]
    for module in ("uvloop", "httptools", "uvicorn", "granian"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[module] = version(module)
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tools": versions,
    }


def summarise(rounds: list[dict[str, Any]], servers: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for scenario in SCENARIOS:
        per_server: dict[str, Any] = {}
        for server in servers:
            runs = [r for r in rounds if r["server"] == server and r["scenario"] == scenario.name]
            if not runs:
                continue
            per_server[server] = {
                key: statistics.median(r[key] for r in runs) for key in ("rps", "p50_us", "p99_us", "max_us")
            }
            if all("cpu_us_per_request" in r for r in runs):
                per_server[server]["cpu_us_per_request"] = statistics.median(r["cpu_us_per_request"] for r in runs)
            per_server[server]["unexpected_status"] = sum(r["unexpected_status"] for r in runs)
            per_server[server]["socket_errors"] = sum(r["socket_errors"] for r in runs)
        ratios: dict[str, Any] = {}
        for reference in servers:
            if reference.startswith("fastimds"):
                continue  # fastimds variants are compared with fastimds in markdown()
            by_round = []
            for index in sorted({r["round"] for r in rounds}):
                ours = [r for r in rounds if r["round"] == index and r["server"] == "fastimds"]
                theirs = [r for r in rounds if r["round"] == index and r["server"] == reference]
                ours = [r for r in ours if r["scenario"] == scenario.name]
                theirs = [r for r in theirs if r["scenario"] == scenario.name]
                if ours and theirs:
                    by_round.append(ours[0]["rps"] / theirs[0]["rps"])
            if by_round:
                ratios[reference] = {
                    "median": statistics.median(by_round),
                    "min": min(by_round),
                    "max": max(by_round),
                    "rounds": by_round,
                    "target": TARGETS.get((scenario.name, reference)),
                }
        telemetry = telemetry_cost(rounds, scenario)
        summary[scenario.name] = {"servers": per_server, "ratios": ratios, "telemetry": telemetry}
    return summary


TELEMETRY_VARIANTS = ("fastimds", "fastimds-requestlog")  # each against fastimds-notelemetry


def telemetry_cost(rounds: list[dict[str, Any]], scenario: Scenario) -> dict[str, Any]:
    """Per variant, per round: req/s ÷ off and off's CPU per request ÷ the variant's (capacity), with medians."""
    cost: dict[str, Any] = {}
    for variant in TELEMETRY_VARIANTS:
        rps_ratios, cpu_ratios = [], []
        for index in sorted({r["round"] for r in rounds}):
            pair = {
                r["server"]: r
                for r in rounds
                if r["round"] == index and r["scenario"] == scenario.name and r["server"] in (variant, OFF)
            }
            if len(pair) == 2:
                rps_ratios.append(pair[variant]["rps"] / pair[OFF]["rps"])
                if "cpu_us_per_request" in pair[variant] and "cpu_us_per_request" in pair[OFF]:
                    cpu_ratios.append(pair[OFF]["cpu_us_per_request"] / pair[variant]["cpu_us_per_request"])
        if rps_ratios:
            cost[variant] = {
                "rps_ratio": statistics.median(rps_ratios),
                "rps_ratios": rps_ratios,
                "cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
                "cpu_ratios": cpu_ratios,
            }
    return cost


OFF = "fastimds-notelemetry"


def markdown(summary: dict[str, Any], info: dict[str, Any], args: argparse.Namespace, skipped: list[str]) -> str:
    lines = [
        f"# fastimds side-by-side ({dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')})",
        "",
        f"Machine: {info['cores']} cores, {info['cpu']}, kernel {info['kernel']}, Python {info['python']}.",
        f"Tools: {', '.join(f'{k} {v}' for k, v in info['tools'].items())}.",
        f"Command: `python -m bench.compare --rounds {args.rounds} --duration {args.duration} "
        f"--connections {args.connections}`; wrk -t1 -c{args.connections}, {args.duration} s per run, "
        f"rounds alternate servers; values are medians of {args.rounds} rounds.",
        "",
        "| scenario | server | req/s | p50 µs | p99 µs | max µs | bad status | socket errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario, data in summary.items():
        for server, values in data["servers"].items():
            lines.append(
                f"| {scenario} | {server} | {values['rps']:,.0f} | {values['p50_us']:,.0f} | {values['p99_us']:,.0f}"
                f" | {values['max_us']:,.0f} | {values['unexpected_status']} | {values['socket_errors']} |"
            )
    lines += [
        "",
        "Ratios are per round (fastimds ÷ reference, same round), then the median and spread of rounds.",
        "'nginx ÷ it' is the same ratio of medians for nginx: what a server doing no work in C reaches here.",
        "",
        "| scenario | fastimds ÷ | median | spread (min–max) | target | met | nginx ÷ it |",
        "| --- | --- | ---: | --- | ---: | --- | ---: |",
    ]
    for scenario, data in summary.items():
        servers = data["servers"]
        for reference, ratio in data["ratios"].items():
            target = ratio["target"]
            met = "" if target is None else ("yes" if ratio["median"] >= target else "**no**")
            ceiling = ""
            if reference != "nginx" and "nginx" in servers:
                ceiling = f"{servers['nginx']['rps'] / servers[reference]['rps']:.2f}"
            lines.append(
                f"| {scenario} | {reference} | {ratio['median']:.2f} | {ratio['min']:.2f}–{ratio['max']:.2f}"
                f" | {'' if target is None else f'≥ {target}'} | {met} | {ceiling} |"
            )
    lines += [
        "",
        "What telemetry costs (targets: counters on ≥ 0.95 × off; request log on ≥ 0.85 × off), medians of",
        "per-round ratios: req/s on ÷ off, and capacity = off's server CPU per request ÷ on's:",
        "",
        "| scenario | variant | req/s ratio (spread) | capacity ratio (spread) | CPU µs/request on, off |",
        "| --- | --- | --- | --- | --- |",
    ]
    for scenario, data in summary.items():
        servers = data["servers"]
        for variant, cost in data.get("telemetry", {}).items():
            label = {"fastimds": "counters", "fastimds-requestlog": "counters + request log"}[variant]
            rps = f"{cost['rps_ratio']:.2f} ({min(cost['rps_ratios']):.2f}–{max(cost['rps_ratios']):.2f})"
            capacity = (
                f"{cost['cpu_ratio']:.2f} ({min(cost['cpu_ratios']):.2f}–{max(cost['cpu_ratios']):.2f})"
                if cost["cpu_ratio"] is not None
                else "n/a"
            )
            cpu_on = servers.get(variant, {}).get("cpu_us_per_request")
            cpu_off = servers.get(OFF, {}).get("cpu_us_per_request")
            cpus = f"{cpu_on:.2f}, {cpu_off:.2f}" if cpu_on is not None and cpu_off is not None else "n/a"
            lines.append(f"| {scenario} | {label} | {rps} | {capacity} | {cpus} |")
    fleet = f"fastimds-{FLEET_SIZE}vms"
    lines += ["", f"{FLEET_SIZE} resident VMs ÷ one VM, req/s (target ≥ 0.9):", ""]
    for scenario, data in summary.items():
        servers = data["servers"]
        if "fastimds" in servers and fleet in servers:
            ratio = servers[fleet]["rps"] / servers["fastimds"]["rps"]
            lines.append(f"- {scenario}: {ratio:.2f} (met: {'yes' if ratio >= FLEET_TARGET else '**no**'})")
    lines += ["", "p99 latency, fastimds ÷ nginx (target ≤ 1.5):", ""]
    for scenario in ("keepalive-text-leaf", "keepalive-whole-document"):
        servers = summary.get(scenario, {}).get("servers", {})
        if "fastimds" in servers and "nginx" in servers:
            ratio = servers["fastimds"]["p99_us"] / max(servers["nginx"]["p99_us"], 1)
            met = "yes" if ratio <= P99_TARGET_VS_NGINX else "**no**"
            lines.append(f"- {scenario}: {ratio:.2f} (met: {met})")
    baseline_cpu = [
        (scenario, data["servers"]["fastimds"]["cpu_us_per_request"], data["servers"]["baseline"]["cpu_us_per_request"])
        for scenario, data in summary.items()
        if "cpu_us_per_request" in data["servers"].get("fastimds", {})
        and "cpu_us_per_request" in data["servers"].get("baseline", {})
    ]
    if baseline_cpu:
        lines += ["", "Server CPU per request, this tree ÷ --baseline (medians of rounds, µs):", ""]
        lines += [
            f"- {scenario}: {ours:.2f} ÷ {theirs:.2f} = {ours / theirs:.3f}" for scenario, ours, theirs in baseline_cpu
        ]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def charts(summary: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("charts skipped: pip install -e '.[bench]' for matplotlib")
        return []
    scenarios = list(summary)
    servers = sorted({s for data in summary.values() for s in data["servers"]}, key=lambda s: (s != "fastimds", s))
    width = 0.8 / max(len(servers), 1)
    written = []
    for metric, label, filename, log in (
        ("rps", "requests/s (median of rounds)", "throughput.png", False),
        ("p99_us", "p99 latency, µs (median of rounds; log scale)", "latency.png", True),
    ):
        figure, axes = plt.subplots(figsize=(11, 5))
        for index, server in enumerate(servers):
            values = [summary[s]["servers"].get(server, {}).get(metric, 0) for s in scenarios]
            axes.bar([i + index * width for i in range(len(scenarios))], values, width, label=server)
        axes.set_xticks([i + width * (len(servers) - 1) / 2 for i in range(len(scenarios))], scenarios, fontsize=8)
        axes.set_ylabel(label)
        if log:
            axes.set_yscale("log")
        axes.legend()
        figure.tight_layout()
        path = out / filename
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


# ------------------------------------------------------------------ main ----


@contextlib.contextmanager
def running(servers: list[Server], workdir: Path) -> Iterator[list[Server]]:
    started = []
    try:
        for server in servers:
            if server.skipped:
                print(f"{server.name}: skipped ({server.skipped})")
                continue
            try:
                server.start(workdir)
            except (RuntimeError, OSError) as exc:
                server.skipped = str(exc)
                print(f"{server.name}: skipped ({exc})")
                continue
            started.append(server)
        yield started
    finally:
        for server in started:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=10, help="whole seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--scenarios", nargs="*", default=[s.name for s in SCENARIOS])
    parser.add_argument("--servers", nargs="*", help="only these servers (default: all)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<UTC time>)")
    parser.add_argument(
        "--workers", type=int, help="also run fastimds with N workers (default: half the cores, from 4 cores up)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also run the fastimds of this checkout (e.g. `git worktree add /tmp/base <commit>`) as server `baseline`",
    )
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk (or `make bench-tools`)", file=sys.stderr)
        return 2

    cores = os.cpu_count() or 1
    server_cores, wrk_cores = ("0", "1") if cores >= 2 else (None, None)
    if cores >= 4:
        wrk_cores = f"{cores // 2}-{cores - 1}"
    out = args.out or RESULTS_DIR / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    scenarios = [s for s in SCENARIOS if s.name in args.scenarios]
    info = machine()

    with tempfile.TemporaryDirectory(prefix="fastimds-bench-") as tmp:
        workdir = Path(tmp)
        replies_path = workdir / "replies.json"
        replies_path.write_text(json.dumps(reference_replies()))
        workers = args.workers if args.workers is not None else (cores // 2 if cores >= 4 else 0)
        servers = build_servers(workdir, replies_path, server_cores, cores, workers, baseline=args.baseline)
        if args.servers:
            servers = [s for s in servers if s.name in args.servers]
        with running(servers, workdir) as live:
            expected = {s.name: raw_exchange(live[0].port, s) for s in scenarios}
            for server in list(live):
                for scenario in scenarios:
                    got = raw_exchange(server.port, scenario)
                    if got != expected[scenario.name]:
                        raise SystemExit(f"{server.name} answers {scenario.name} differently: {got!r:.300}")
            scripts = {s.name: wrk_script(workdir, s) for s in scenarios}
            load = Load(args.duration, args.connections, wrk_cores)
            rounds: list[dict[str, Any]] = []
            for index in range(args.rounds):
                for scenario in scenarios:
                    order = live if index % 2 == 0 else list(reversed(live))
                    for server in order:
                        measure_cpu = server.name.startswith(("fastimds", "baseline")) and server.proc is not None
                        cpu_before = process_cpu_s(server.proc.pid) if measure_cpu and server.proc else 0.0
                        result = run_wrk(server.port, scenario, scripts[scenario.name], load)
                        if measure_cpu and server.proc:
                            cpu = process_cpu_s(server.proc.pid) - cpu_before
                            result["cpu_us_per_request"] = cpu * 1e6 / max(result["requests"], 1)
                        result |= {"round": index, "server": server.name, "scenario": scenario.name}
                        rounds.append(result)
                        print(
                            f"round {index + 1}/{args.rounds} {scenario.name:26} {server.name:12} "
                            f"{result['rps']:>10,.0f} req/s  p50 {result['p50_us']:>6} µs  "
                            f"p99 {result['p99_us']:>6} µs",
                            flush=True,
                        )
        skipped = [f"{s.name} ({s.skipped})" for s in servers if s.skipped]
        names = [s.name for s in servers if not s.skipped]

    summary = summarise(rounds, names)
    (out / "results.json").write_text(
        json.dumps({"machine": info, "args": vars(args) | {"out": str(out)}, "rounds": rounds, "summary": summary},
                   indent=2, default=str)
    )  # fmt: skip
    report = markdown(summary, info, args, skipped)
    (out / "summary.md").write_text(report)
    charts(summary, out)
    print(report)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

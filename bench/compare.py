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
(medians, ratios with their spread, every target met or not: bench.compare_report),
throughput.png, latency.png.

Every server's CPU time per request (user + system from /proc, the process
and its children, over the same run) is reported beside req/s: on this
shared VM req/s swings by 10-20 % between rounds with the neighbours' load,
while CPU per request only moves with the work the server itself does; and
on two cores wrk's own core saturates near nginx's rate, so only CPU per
request can show a server doing less work than nginx. wrk's own CPU share
is reported too: at WRK_BOUND_SHARE and above, wrk was the bottleneck.
The summary names the fastimds build measured (mypyc-compiled or pure Python).
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
    ("pipeline-16", "nginx"): 6.0,
    ("connection-close", "nginx"): 1.0,
    **{(s.name, "uvicorn"): 4.0 for s in SCENARIOS},
    **{(s.name, "granian"): 2.0 for s in SCENARIOS},
}
P99_TARGET_VS_NGINX = 1.3  # fastimds p99 <= 1.3 x nginx p99 at 50 connections, keep-alive scenarios
# Server CPU (user + system, /proc) per request, fastimds ÷ nginx, keep-alive scenarios: on two cores
# wrk's own core saturates near nginx's rate, so req/s cannot show a server beating nginx there.
CPU_TARGETS_VS_NGINX = {"keepalive-text-leaf": 1.0, "keepalive-whole-document": 1.0}
# The load generator counts as the bottleneck when its core is this busy: a req/s ratio then
# says "at least", not "exactly".
WRK_BOUND_SHARE = 0.95
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


def tree_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process and every live descendant (nginx's worker is its
    master's child; fastimds with --workers forks its own)."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError, ValueError):
            total += process_cpu_s(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
    return total


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
    """One wrk run; with `wrk_cpu_share`, the share of one core wrk itself used (its rusage over the run)."""
    command = wrk_command(port, scenario.target, script, load)
    started = time.monotonic()
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - started
        output.seek(0)
        out = output.read().decode()
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, command, out)
    result = wrk_result(out)
    result["wrk_cpu_share"] = (usage.ru_utime + usage.ru_stime) / max(elapsed, 1e-9)
    # wrk counts non-2xx as status errors; the error scenario expects them.
    result["unexpected_status"] = 0 if scenario.status != 200 else result["status"]
    result["socket_errors"] = result["connect"] + result["read"] + result["write"] + result["timeout"]
    return result


# ------------------------------------------------------------- reporting ----


def fastimds_build() -> str:
    """Which build of fastimds this tree runs: "mypyc" when its hot modules are compiled, else "python"."""
    probe = "import fastimds.http.connection as c; print('mypyc' if c.__file__.endswith('.so') else 'python')"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False, cwd=REPO)
    return done.stdout.strip() or "unknown"


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
        "build": fastimds_build(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tools": versions,
    }


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
                        assert server.proc is not None
                        cpu_before = tree_cpu_s(server.proc.pid)
                        result = run_wrk(server.port, scenario, scripts[scenario.name], load)
                        cpu = tree_cpu_s(server.proc.pid) - cpu_before
                        result["cpu_us_per_request"] = cpu * 1e6 / max(result["requests"], 1)
                        result |= {"round": index, "server": server.name, "scenario": scenario.name}
                        rounds.append(result)
                        print(
                            f"round {index + 1}/{args.rounds} {scenario.name:26} {server.name:12} "
                            f"{result['rps']:>10,.0f} req/s  p50 {result['p50_us']:>6} µs  "
                            f"p99 {result['p99_us']:>6} µs  cpu {result['cpu_us_per_request']:.2f} µs/req  "
                            f"wrk {result['wrk_cpu_share']:.0%}",
                            flush=True,
                        )
        skipped = [f"{s.name} ({s.skipped})" for s in servers if s.skipped]
        names = [s.name for s in servers if not s.skipped]

    from bench.compare_report import charts, markdown, summarise  # it reads this module's constants

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

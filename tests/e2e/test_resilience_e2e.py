"""End-to-end: crashes, restarts, shutdown, and the security checks of issue #7.

Against the real `fastimds serve` (tests.support.server_process), loopback only.
Nothing here may hang: every wait is a poll_until with a deadline, every
client socket has a timeout, every load thread stops on an Event and is
joined with a timeout, and the figures each test prints are its own counts.

What may fail, and why (the definitions the assertions use):
- kill -9 of a worker. SO_REUSEPORT gives each worker its own accept queue,
  and the kernel drops every connection the dead worker held: accepted, or
  still waiting in its queue. So a request may fail only if its connection
  was opened before the worker was seen gone (every thread exited: its
  sockets are closed then) and was still in use when the kill was sent, and
  only as a dropped connection (reset, or closed before a whole response).
  Never a refusal, a timeout, a wrong status, a partial body or another VM's
  data; and every connection opened after the worker was gone is served.
- kill -9 of the whole server. A write acknowledged with 2xx was written to
  the state directory (and fsynced) before its reply, so it is served after a
  restart; a refused one changed nothing. (kill -9 keeps the page cache: this
  proves the order, write then acknowledge; the fsync is for power loss.)
  Each writer has at most one write in flight at the kill: that one may land
  or not, but whole (every write sets two fields to one marker, so a
  half-applied VM would show two markers).
- SIGTERM. Every response already begun arrives whole. A client that keeps
  sending on its keep-alive connection gets every request answered, the last
  one with `Connection: close`, then a clean end of stream. A request may go
  unanswered only if it was sent DRAIN_ANSWER_S / 2 or more after the signal
  (the worker's answer window, which starts when it handles the signal, may
  be ending), and then it meets a clean end of stream (a FIN: the case RFC
  9112 §9.3.1 lets a client retry), never a reset.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import secrets
import select
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastimds.process.supervisor import CRASH_LOOP_WINDOW_S
from fastimds.process.worker import DRAIN_ANSWER_S
from tests.support.admin_token import write_token_file
from tests.support.server_process import (
    RawReader,
    ServerProcess,
    UnixHTTPConnection,
    admin_call,
    admin_unix,
    connect,
    get_from,
    get_request,
    http_from,
    log_events,
    poll_until,
    running_server,
    serve_command,
    vm_document,
    vm_uuid,
)

API = "2021-02-01"
INSTANCE = f"/metadata/instance?api-version={API}"
VMID_TEXT = f"/metadata/instance/compute/vmId?api-version={API}&format=text"
NAME_TEXT = f"/metadata/instance/compute/name?api-version={API}&format=text"
TAGS_TEXT = f"/metadata/instance/compute/tags?api-version={API}&format=text"
FIRST_IP_TEXT = (
    f"/metadata/instance/network/interface/0/ipv4/ipAddress/0/privateIpAddress?api-version={API}&format=text"
)
NO_VM_BODY = {"error": "Not found. No VM is registered for this caller's address"}
# A replacement worker serves the current data within this of the kill (issue #7).
REPLACEMENT_SERVES_WITHIN_S = 1.0
# What a dropped connection looks like to http.client: reset, or closed before a whole response.
DROPPED = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.RemoteDisconnected)


def gone(pid: int) -> bool:
    """True once every thread of `pid` has exited (or it was reaped): its sockets are closed by then.

    Not the leader's state alone: a worker has threads (the bus watch's), and
    its leader shows as a zombie while they are still exiting and its
    descriptors, shared by them, are still open.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for task in tasks:
        try:
            status = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        except OSError:
            continue  # exited while we looked
        if status[status.rindex(")") + 2] != "Z":
            return False
    return True


def live_workers(server: ServerProcess) -> set[int]:
    """Worker pids (they log worker_ready) that are the server's children and still running."""
    ready = {record["pid"] for record in log_events(server, "worker_ready")}
    return {pid for pid in ready & set(server.child_pids()) if not gone(pid)}


def _proc_net_address(address: str, port: int) -> str:
    """How /proc/net/tcp spells an IPv4 address and port (the address as a host-order word)."""
    (word,) = struct.unpack("<I", socket.inet_aton(address))
    return f"{word:08X}:{port:04X}"


def serving_pid(client: socket.socket, candidates: set[int]) -> int | None:
    """Which of `candidates` holds the server side of `client`'s connection (None: not accepted yet).

    /proc/net/tcp names the socket's inode; the pid holding that inode among
    its descriptors holds the connection. The table lists every socket of the
    host (tens of thousands in TIME_WAIT on a busy test machine), so it is
    searched as bytes, not split into lines.
    """
    local_address, local_port = client.getsockname()
    server_address, server_port = client.getpeername()
    key = f" {_proc_net_address(server_address, server_port)} {_proc_net_address(local_address, local_port)} "
    table = Path("/proc/net/tcp").read_bytes()
    at = table.find(key.encode())
    if at < 0:
        return None
    line = table[at : table.find(b"\n", at)].split()
    inode = line[8].decode()  # fields after the address pair: st, queues, timers, retransmits, uid, timeout, inode
    if inode == "0":
        return None
    for pid in candidates:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
    return None


def connection_served_by(server: ServerProcess, pid: int, source: str) -> http.client.HTTPConnection:
    """A keep-alive connection from `source` that worker `pid` accepted (the kernel picks; we retry)."""
    workers = live_workers(server) | {pid}
    for _ in range(64):  # each try lands on `pid` with probability 1/2: 2^-64 to miss
        conn = http_from(source, server.port)
        conn.connect()
        assert conn.sock is not None
        owner: list[int | None] = [None]

        def accepted(sock: socket.socket = conn.sock, found: list[int | None] = owner) -> bool:
            found[0] = serving_pid(sock, workers)
            return found[0] is not None

        assert poll_until(accepted, timeout=2), "no worker accepted the connection"
        if owner[0] == pid:
            return conn
        conn.close()
    pytest.fail(f"64 connections, none accepted by worker {pid}")


def instance_of(conn: http.client.HTTPConnection) -> dict[str, Any]:
    conn.request("GET", INSTANCE, headers={"Metadata": "true"})
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, body
    document: dict[str, Any] = json.loads(body)
    return document


def admin_patch(socket_path: Path, vm_id: str, compute: dict[str, Any]) -> int:
    """PATCH instance.compute of `vm_id` over the admin socket; returns the acknowledged generation."""
    status, reply = admin_unix(socket_path, "PATCH", f"/vms/{vm_id}", {"instance": {"compute": compute}})
    assert status == 200, reply
    return int(reply["generation"])


# ---- kill -9 of a worker under load ----


@dataclass
class Attempt:
    opened: float  # when its connection was opened
    ended: float
    outcome: str  # "ok", "dropped: ..." (allowed around a kill) or anything else (never allowed)


@dataclass
class KillRound:
    sent: float  # just before os.kill
    gone: float  # every thread of the worker was seen exited


REQUESTS_PER_CONNECTION = 8


def test_killed_workers_are_replaced_under_load_and_nothing_is_lost(tmp_path: Path) -> None:
    rounds = 4
    vms = {f"vm{index}": f"127.0.1.{index + 2}" for index in range(3)}
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for vm_id, address in vms.items():
        (data_dir / f"{vm_id}.json").write_text(json.dumps(vm_document(vm_id, private_ips=[address])))
    admin_socket = tmp_path / "admin.sock"
    args = ("--data-dir", str(data_dir), "--workers", "2", "--admin-socket", str(admin_socket))
    with running_server(*args) as server:
        born = dict.fromkeys(live_workers(server), time.monotonic())
        assert len(born) == 2
        attempts: list[Attempt] = []
        stop = threading.Event()

        def load(vm_id: str) -> None:
            """Fresh connections from the VM's address, a few requests each, until told to stop."""
            source, expected = vms[vm_id], vm_uuid(vm_id).encode()
            while not stop.is_set():
                opened = time.monotonic()
                conn = http_from(source, server.port)
                try:
                    for _ in range(REQUESTS_PER_CONNECTION):
                        try:
                            conn.request("GET", VMID_TEXT, headers={"Metadata": "true"})
                            response = conn.getresponse()
                            status, body = response.status, response.read()
                            outcome = "ok" if (status, body) == (200, expected) else f"wrong: {status} {body[:80]!r}"
                        except DROPPED as exc:
                            outcome = f"dropped: {exc!r}"
                        except Exception as exc:  # a refusal or a timeout is never allowed
                            outcome = f"error: {exc!r}"
                        attempts.append(Attempt(opened, time.monotonic(), outcome))
                        if outcome != "ok":
                            break
                finally:
                    conn.close()

        threads = [threading.Thread(target=load, args=(vm_id,), daemon=True) for vm_id in vms]
        for thread in threads:
            thread.start()
        kills: list[KillRound] = []
        ready_after_s: list[float] = []
        fresh_after_s: list[float] = []
        try:
            for index in range(rounds):
                victim = min(born, key=lambda pid: born[pid])  # the oldest worker
                # Deaths soon after a start count toward the supervisor's crash-loop limit: pace the kills.
                time.sleep(max(0.0, born[victim] + CRASH_LOOP_WINDOW_S + 0.2 - time.monotonic()))
                admin_patch(admin_socket, "vm0", {"location": f"before-{index}"})
                before_acked = time.monotonic()
                sent = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                assert poll_until(lambda pid=victim: gone(pid), timeout=5, interval=0.001)
                kills.append(KillRound(sent, time.monotonic()))
                # Acknowledged while the replacement starts: perhaps between its first scan and its watch.
                admin_patch(admin_socket, "vm0", {"tags": f"during:{index}"})
                during_acked = time.monotonic()
                assert poll_until(lambda: len(live_workers(server) - set(born)) == 1, timeout=5), (
                    f"worker {victim} was not replaced: {server.child_pids()}"
                )
                [replacement] = live_workers(server) - set(born)
                ready_after_s.append(time.monotonic() - sent)
                del born[victim]
                born[replacement] = time.monotonic()

                conn = connection_served_by(server, replacement, vms["vm0"])
                try:
                    compute = instance_of(conn)["compute"]
                    assert compute["vmId"] == vm_uuid("vm0")
                    # It started after the kill, from the bus: never older than the write before the kill.
                    assert compute["location"] == f"before-{index}"

                    def serves(wanted: tuple[str, str, str], c: http.client.HTTPConnection = conn) -> bool:
                        seen = instance_of(c)["compute"]
                        return (seen["location"], seen["tags"], seen["osProfile"]["computerName"]) == wanted

                    # Each write is served at the latest a second after its acknowledgement.
                    around = (f"before-{index}", f"during:{index}", f"after-{index - 1}" if index else "vm0-name")
                    within = max(0.0, max(before_acked, during_acked) + REPLACEMENT_SERVES_WITHIN_S - time.monotonic())
                    assert poll_until(lambda wanted=around: serves(wanted), within), (
                        f"round {index}: the replacement {replacement} does not serve the writes acknowledged "
                        f"around the kill: {instance_of(conn)['compute']}"
                    )
                    admin_patch(admin_socket, "vm0", {"osProfile": {"computerName": f"after-{index}"}})
                    after_acked = time.monotonic()
                    latest = (around[0], around[1], f"after-{index}")
                    assert poll_until(lambda wanted=latest: serves(wanted), REPLACEMENT_SERVES_WITHIN_S), (
                        f"round {index}: the replacement {replacement} never serves a write made after it started"
                    )
                    fresh_after_s.append(time.monotonic() - after_acked)
                finally:
                    conn.close()
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=10)
        assert not any(thread.is_alive() for thread in threads)
        assert max(ready_after_s) < REPLACEMENT_SERVES_WITHIN_S, ready_after_s

        # Every failure was a dropped connection opened before a worker was gone and still in use at its kill.
        def excused(attempt: Attempt) -> bool:
            return attempt.outcome.startswith("dropped") and any(
                attempt.opened < kill.gone and attempt.ended >= kill.sent for kill in kills
            )

        failed = [attempt for attempt in attempts if attempt.outcome != "ok"]
        unexcused = [attempt for attempt in failed if not excused(attempt)]
        assert not unexcused, "\n".join(map(str, [*unexcused[:5], *kills]))
        after_gone = [a for a in attempts if any(kill.gone <= a.opened < kill.gone + 1.0 for kill in kills)]
        assert len(after_gone) >= rounds, "hardly any request ran just after a kill: the load proves nothing"

        # Nothing acknowledged was lost: the control holds the last write, and every worker serves it.
        status, document = admin_unix(admin_socket, "GET", "/vms/vm0")
        assert (status, document["generation"]) == (200, 1 + 3 * rounds)
        last = rounds - 1
        wanted = (f"before-{last}", f"during:{last}", f"after-{last}")

        def everywhere() -> bool:
            for _ in range(20):  # 20 fresh connections: both workers, but for 2^-19
                status, body = get_from(vms["vm0"], server.port, INSTANCE)
                compute = json.loads(body)["compute"] if status == 200 else {}
                served = (
                    compute.get("location"),
                    compute.get("tags"),
                    compute.get("osProfile", {}).get("computerName"),
                )
                if served != wanted:
                    return False
            return True

        assert poll_until(everywhere, timeout=REPLACEMENT_SERVES_WITHIN_S)
        exits = log_events(server, "worker_exited")
        assert [record["status"] for record in exits] == [-signal.SIGKILL] * rounds
        assert not log_events(server, "crash_loop")
        assert server.stop() == 0

    print(
        f"\nworker kill -9 under load, --workers 2: {rounds} restarts survived; {len(attempts)} requests "
        f"({REQUESTS_PER_CONNECTION} per fresh connection), {len(failed)} dropped (each on a connection opened "
        f"before its worker was gone), 0 failed on a connection opened after ({len(after_gone)} requests in "
        f"the second after each kill); replacement ready {max(ready_after_s) * 1000:.0f} ms after the kill at "
        f"worst, a write after it served {max(fresh_after_s) * 1000:.0f} ms after its acknowledgement at worst "
        f"(limit {REPLACEMENT_SERVES_WITHIN_S * 1000:.0f} ms)"
    )


# ---- kill -9 of the whole server during a burst of admin writes ----

ANCHOR_ADDRESS = "127.0.9.1"  # claimed by a VM no writer touches: a PUT claiming it is always refused (409)


@dataclass
class Write:
    vm_id: str
    method: str
    body: bytes
    expected_status: int
    after: str | None  # the VM's marker once this write is applied (None: absent)
    marker: str  # the marker this write carries (never served if it is refused)


@dataclass
class VmLedger:
    """What one VM must be after the restart: its last acknowledged state, or that of its write in flight."""

    address: str
    state: str | None = None  # marker of the last acknowledged state; None: absent
    generation: int = 0
    in_flight: Write | None = None


def marked_document(vm_id: str, address: str, marker: str) -> dict[str, Any]:
    """A whole VM whose location and tags both carry `marker`: a half-applied write would show two markers."""
    document = vm_document(vm_id, private_ips=[address], location=f"L-{marker}")
    document["instance"]["compute"]["tags"] = f"w:{marker}"
    return document


def next_write(rng: random.Random, vm_id: str, ledger: VmLedger, marker: str) -> Write:
    """A random write for `vm_id` in its current state; about a third of them are refused."""
    exists = ledger.state is not None
    marks = {"location": f"L-{marker}", "tags": f"w:{marker}"}
    kinds = ["put", "put", "patch", "patch", "patch", "delete", "bad_put", "bad_patch", "conflict", "bad_json"]
    kind = rng.choice(kinds if exists else ["put", "put", "put", "bad_put", "conflict", "patch", "delete"])
    document = marked_document(vm_id, ledger.address, marker)
    state = ledger.state
    if kind == "put":
        return Write(vm_id, "PUT", json.dumps(document).encode(), 200 if exists else 201, marker, marker)
    if kind == "patch":
        body = json.dumps({"instance": {"compute": marks}}).encode()
        return Write(vm_id, "PATCH", body, 200 if exists else 404, marker if exists else None, marker)
    if kind == "delete":
        return Write(vm_id, "DELETE", b"", 200 if exists else 404, None, marker)
    if kind == "bad_put":  # schema: no network
        del document["instance"]["network"]
        return Write(vm_id, "PUT", json.dumps(document).encode(), 400, state, marker)
    if kind == "bad_patch":  # a merge patch that would make the VM invalid
        body = json.dumps({"instance": {"compute": marks, "network": "flat"}}).encode()
        return Write(vm_id, "PATCH", body, 400, state, marker)
    if kind == "conflict":  # another VM's address
        clash = vm_document(vm_id, private_ips=[ledger.address, ANCHOR_ADDRESS], location=f"L-{marker}")
        clash["instance"]["compute"]["tags"] = f"w:{marker}"
        return Write(vm_id, "PUT", json.dumps(clash).encode(), 409, state, marker)
    body = json.dumps(document).encode()[:-40]  # bad_json: cut short
    return Write(vm_id, "PUT", body, 400, state, marker)


def test_kill9_of_the_server_during_admin_writes_loses_no_acknowledged_write(tmp_path: Path) -> None:
    writers, vms_per_writer, acks_before_kill = 6, 4, 600
    state_dir = tmp_path / "state"
    empty = tmp_path / "data"
    empty.mkdir()
    admin_socket = tmp_path / "admin.sock"
    args = ("--data-dir", str(empty), "--state-dir", str(state_dir), "--admin-socket", str(admin_socket))
    ledgers = {
        f"w{writer}v{index}": VmLedger(f"127.0.{20 + writer}.{index + 2}")
        for writer in range(writers)
        for index in range(vms_per_writer)
    }
    acknowledged: list[Write] = []
    refused: list[Write] = []
    surprises: list[str] = []
    with running_server(*args, "--workers", "2") as first:
        anchor = vm_document("anchor", private_ips=[ANCHOR_ADDRESS])
        assert admin_unix(admin_socket, "PUT", "/vms/anchor", anchor)[0] == 201

        def write(writer: int) -> None:
            """Sequential writes to this writer's own VMs until the server dies under it."""
            rng = random.Random(7000 + writer)
            conn = UnixHTTPConnection(admin_socket)
            try:
                for serial in range(10_000):
                    vm_id = f"w{writer}v{rng.randrange(vms_per_writer)}"
                    ledger = ledgers[vm_id]
                    planned = next_write(rng, vm_id, ledger, f"{writer}-{serial}")
                    ledger.in_flight = planned
                    try:
                        conn.request(planned.method, f"/vms/{vm_id}", body=planned.body)
                        response = conn.getresponse()
                        reply = json.loads(response.read())
                    except (OSError, http.client.HTTPException):
                        return  # killed: `planned` stays in flight, applied or not
                    ledger.in_flight = None
                    if response.status != planned.expected_status:
                        surprises.append(f"{planned.method} {vm_id}: {response.status} {reply}, not {planned}")
                        return
                    if response.status >= 300:
                        refused.append(planned)
                        continue
                    acknowledged.append(planned)
                    ledger.state = planned.after
                    ledger.generation = int(reply["generation"])
            finally:
                conn.close()

        threads = [threading.Thread(target=write, args=(writer,), daemon=True) for writer in range(writers)]
        for thread in threads:
            thread.start()
        try:
            assert poll_until(lambda: len(acknowledged) >= acks_before_kill or bool(surprises), timeout=40)
        finally:
            first.kill_group()  # kill -9 of the supervisor, the control process and the workers, mid-burst
            for thread in threads:
                thread.join(timeout=10)
        assert not surprises, surprises[:5]
        assert not any(thread.is_alive() for thread in threads)
    assert admin_socket.is_socket()  # left behind by the kill: the restart must replace it

    in_flight = [ledger.in_flight for ledger in ledgers.values() if ledger.in_flight is not None]
    with running_server(*args, "--workers", "2") as second:
        assert stat.S_IMODE(admin_socket.stat().st_mode) == 0o600
        status, listing = admin_unix(admin_socket, "GET", "/vms")
        assert status == 200
        listed = {vm["id"]: vm["generation"] for vm in listing["vms"]}
        lost, landed, served_markers, present = [], 0, set(), set()
        for vm_id, ledger in ledgers.items():
            allowed = {ledger.state}
            pending = ledger.in_flight
            if pending is not None:
                allowed.add(pending.after)
            status, document = admin_unix(admin_socket, "GET", f"/vms/{vm_id}")
            served = None
            if status == 200:
                compute = document["vm"]["instance"]["compute"]
                served = compute["location"].removeprefix("L-")
                # All or nothing: the two fields one write sets carry one marker.
                assert compute["tags"] == f"w:{served}", (vm_id, compute["location"], compute["tags"])
                served_markers.add(served)
                present.add(vm_id)
                assert listed[vm_id] == document["generation"]
            else:
                assert status == 404
                assert vm_id not in listed
            if served not in allowed:
                lost.append(f"{vm_id}: serves {served!r}, allowed {allowed} (generation {ledger.generation})")
                continue
            if pending is not None and served == pending.after != ledger.state:
                landed += 1
                if served is not None:
                    assert document["generation"] == ledger.generation + 1, (vm_id, document["generation"], ledger)
            elif served is not None:
                assert document["generation"] == ledger.generation, (vm_id, document["generation"], ledger)
            # The workers serve what the control holds, to the VM's own address.
            status, body = get_from(ledger.address, second.port, INSTANCE)
            if served is None:
                assert (status, json.loads(body)) == (404, NO_VM_BODY), vm_id
            else:
                assert status == 200, body
                compute = json.loads(body)["compute"]
                assert (compute["vmId"], compute["location"], compute["tags"]) == (
                    vm_uuid(vm_id),
                    f"L-{served}",
                    f"w:{served}",
                )
        assert not lost, lost
        assert not served_markers & {write.marker for write in refused}
        assert set(listed) == {"anchor"} | present
        assert get_from(ANCHOR_ADDRESS, second.port, VMID_TEXT) == (200, vm_uuid("anchor").encode())

    print(
        f"\nkill -9 of the server during admin writes ({writers} writers, {len(ledgers)} VMs, --workers 2, "
        f"--state-dir): {len(acknowledged)} writes acknowledged, 0 lost; {len(refused)} refused, none served; "
        f"{len(in_flight)} in flight at the kill, {landed} of them landed, all whole"
    )


# ---- SIGTERM under load ----


@dataclass
class KeepAlive:
    """One keep-alive client connection through a SIGTERM, and how it ended."""

    sock: socket.socket
    reader: RawReader
    answered: int = 0
    answered_after_signal: int = 0
    ended: str = ""  # "close" (a Connection: close reply, then a clean FIN), "fin" (a FIN while idle), ...
    unanswered_at: float | None = None  # when the request that met the end of stream (or the FIN) was attempted

    def converse(self, targets: list[bytes], stop: threading.Event, signalled: list[float]) -> None:
        """Send, read the whole reply, repeat, until the server ends the connection; never send after a FIN."""
        try:
            for index in range(100_000):
                if stop.is_set():
                    self.ended = "stopped"
                    return
                if select.select([self.sock], [], [], 0)[0]:
                    # Readable between replies: only a FIN may be waiting (the server sends nothing unasked).
                    if self.sock.recv(1, socket.MSG_PEEK) == b"":
                        self.ended, self.unanswered_at = "fin", time.monotonic()
                    else:
                        self.ended = "unasked bytes"
                    return
                attempted = time.monotonic()
                self.sock.sendall(targets[index % len(targets)])
                try:
                    response = self.reader.read_response()
                except ConnectionResetError:
                    raise
                except ConnectionError:
                    if not self.reader.buffer:
                        self.ended, self.unanswered_at = "eof", attempted  # nothing of a reply: unanswered
                    else:
                        self.ended = f"partial reply: {self.reader.buffer[:80]!r}"
                    return
                if response.status != 200:
                    self.ended = f"status {response.status}"
                    return
                self.answered += 1
                if signalled:
                    self.answered_after_signal += 1
                if response.header("Connection") == "close":
                    self.ended = "close" if self.reader.at_eof() else "close without a FIN"
                    return
            self.ended = "too many requests"
        except (ConnectionResetError, BrokenPipeError) as exc:
            self.ended = f"reset: {exc!r}"
        except OSError as exc:
            self.ended = f"error: {exc!r}"


def test_sigterm_under_load_answers_in_flight_requests_and_resets_nothing() -> None:
    location = get_request(f"/metadata/instance/compute/location?api-version={API}&format=text", "Metadata: true")
    instance = get_request(INSTANCE, "Metadata: true")
    with running_server("--workers", "2") as server:
        stop = threading.Event()
        signalled: list[float] = []  # when SIGTERM was sent (empty before)

        def opened() -> KeepAlive:
            sock = connect(server.port)
            client = KeepAlive(sock, RawReader(sock))
            sock.sendall(location)
            assert client.reader.read_response().status == 200
            return client

        hammers = [opened() for _ in range(4)]  # sending all the time
        senders = [opened() for _ in range(6)]  # idle until the signal, then sending
        idlers = [opened() for _ in range(4)]  # idle throughout
        partials = [connect(server.port) for _ in range(4)]  # a request head in flight, less its last CRLF
        for sock in partials:
            sock.sendall(location[:-2])
        go = threading.Event()

        def send_after_signal(client: KeepAlive) -> None:
            if go.wait(timeout=10):
                client.converse([location], stop, signalled)

        threads = [
            threading.Thread(target=client.converse, args=([location, instance], stop, signalled), daemon=True)
            for client in hammers
        ]
        threads += [threading.Thread(target=send_after_signal, args=(client,), daemon=True) for client in senders]
        for thread in threads:
            thread.start()
        try:
            assert poll_until(lambda: min(client.answered for client in hammers) >= 50, timeout=10)
            server.send_signal(signal.SIGTERM)
            signalled.append(time.monotonic())
            go.set()

            def refused() -> bool:
                try:
                    connect(server.port).close()
                except ConnectionRefusedError:
                    return True
                return False

            assert poll_until(refused, timeout=5), "still accepting after SIGTERM"
            for sock in partials:
                sock.sendall(b"\r\n")  # the in-flight request completes after the server stopped accepting
            finished = []
            for sock in partials:
                reader = RawReader(sock)
                finished.append((reader.read_response(), reader.at_eof()))
            assert server.wait_exit(timeout=10) == 0
            stopped = log_events(server, "worker_stopped")
            idle_ends = []
            for client in idlers:
                try:
                    idle_ends.append("fin" if client.reader.at_eof() else "bytes")
                except ConnectionResetError:
                    idle_ends.append("reset")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=10)
            for client in hammers + senders + idlers:
                client.sock.close()
            for sock in partials:
                sock.close()
        assert not any(thread.is_alive() for thread in threads)

    for response, at_eof in finished:
        assert (response.status, response.header("Connection"), at_eof) == (200, "close", True)
    assert idle_ends == ["fin"] * len(idlers)

    # No reset, ever; unanswered (a FIN seen, or met) only once the answer window may be ending.
    endings = Counter(client.ended for client in hammers + senders)
    assert not [ended for ended in endings if ended.startswith("reset")], endings
    assert set(endings) <= {"close", "fin", "eof"}, endings
    window_end = signalled[0] + DRAIN_ANSWER_S / 2
    early = [
        (client.ended, client.answered_after_signal, round(client.unanswered_at - signalled[0], 3))
        for client in hammers + senders
        if client.unanswered_at is not None and client.unanswered_at < window_end
    ]
    assert not early, f"closed under a client still sending (ending, answered, seconds after SIGTERM): {early}"
    assert [record["aborted"] for record in stopped] == [0, 0]

    total = sum(client.answered for client in hammers + senders) + len(partials)
    after = sum(client.answered_after_signal for client in hammers + senders) + len(partials)
    print(
        f"\nSIGTERM under load, --workers 2: {total} requests on {len(hammers) + len(senders)} keep-alive "
        f"connections and {len(partials)} in flight, {after} answered after the signal; 0 resets; endings "
        f"{dict(endings)}, the {len(idlers)} idle connections a clean FIN; exit 0, 0 connections aborted"
    )


# ---- security: the admin API is never on the VM-facing listener ----

ADMIN_TARGETS = (
    "/vms",
    "/vms/",
    "/vms/vm1",
    "/vms/vm2",
    "/vms?verbose=1",
    "/vms/vm1/scheduledevents",
    "/scheduledevents",
    "/metrics",
    "/healthz",
    "/readyz",
    "/jwks",
    "//vms",
    "/VMS",
    "/./vms",
    "/%76ms",
    "/metadata/../vms",
    "/metadata/%2e%2e/vms",
    "/metadata/vms",
    "/metadata/metrics",
    "http://127.0.0.1/vms",
)
ADMIN_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
IMDS_ERROR_STATUSES = {400, 404, 405}
# Bytes only admin replies carry: the VM list and documents, metrics, health, the token key.
ADMIN_MARKERS = (b'"vms"', b'"generation"', b"fastimds_", b'"status"', b'"keys"', b'"kty"', b"vm2-name")


def test_the_admin_api_is_never_reachable_on_the_vm_listener(tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    token_file = tmp_path / "token"
    write_token_file(token_file, token)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    callers = {"vm1": "127.0.2.2", "vm2": "127.0.2.3"}
    for vm_id, address in callers.items():
        (data_dir / f"{vm_id}.json").write_text(json.dumps(vm_document(vm_id, private_ips=[address])))
    admin_socket = tmp_path / "admin.sock"
    args = ("--data-dir", str(data_dir), "--workers", "2", "--admin-socket", str(admin_socket))
    with running_server(*args, "--admin-port", "0", "--admin-token-file", str(token_file)) as server:
        [unix, tcp] = server.admin
        admin_port = int(tcp.rsplit(":", 1)[1])
        authorized = {"Authorization": f"Bearer {token}"}
        # The markers do find admin data where it is served: on the admin listener.
        admin_conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
        try:
            for target in ("/vms", "/vms/vm2", "/metrics", "/healthz", "/readyz", "/jwks"):
                admin_conn.request("GET", target, headers=authorized)
                response = admin_conn.getresponse()
                body = response.read()
                assert response.status == 200, (target, body)
                assert any(marker in body for marker in ADMIN_MARKERS), target
        finally:
            admin_conn.close()

        stolen = json.dumps(vm_document("vm1", private_ips=[callers["vm1"]], location="stolen")).encode()
        header_sets = ({"Metadata": "true"}, {"Metadata": "true", **authorized}, {})
        checked = Counter[int]()
        for source in (callers["vm1"], "127.0.2.200"):
            for headers in header_sets:
                conn = http_from(source, server.port)
                try:
                    for target in ADMIN_TARGETS:
                        for method in ADMIN_METHODS:
                            body = stolen if method in ("POST", "PUT", "PATCH") else None
                            conn.request(method, target, body=body, headers=headers)
                            response = conn.getresponse()
                            reply = response.read()
                            where = (source, method, target, sorted(headers))
                            assert response.status in IMDS_ERROR_STATUSES, (where, response.status, reply[:200])
                            assert not any(marker in reply for marker in ADMIN_MARKERS), (where, reply[:200])
                            if method != "HEAD":
                                error = json.loads(reply)
                                assert set(error) <= {"error", "newest-versions"}, (where, error)
                            checked[response.status] += 1
                finally:
                    conn.close()

        # Nothing written through the VM port took effect.
        status, document = admin_unix(admin_socket, "GET", "/vms/vm1")
        assert (status, document["generation"]) == (200, 1)
        assert get_from(callers["vm1"], server.port, VMID_TEXT) == (200, vm_uuid("vm1").encode())
        assert unix == f"unix:{admin_socket}"
    print(f"\nadmin routes on the VM listener: {sum(checked.values())} requests, all IMDS errors {dict(checked)}")


# ---- security: the admin socket's file ----


def serve_and_fail(*args: str) -> subprocess.CompletedProcess[str]:
    """`fastimds serve` that must refuse to start; returns its result."""
    return subprocess.run(
        serve_command(args), capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL, check=False
    )


def test_the_admin_socket_is_private_and_its_path_is_never_clobbered(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = tmp_path / "admin.sock"
    common = ("--data-dir", str(data_dir))
    old_umask = os.umask(0)  # the server must not rely on a strict umask in its environment
    try:
        with running_server(*common, "--admin-socket", str(path)) as first:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            inode = path.stat().st_ino
            # A second server must not take over (or unlink) a socket that answers.
            refused = serve_and_fail(*common, "--admin-socket", str(path))
            assert refused.returncode == 1, refused.stderr
            assert "another server is using the admin socket" in refused.stderr
            assert path.stat().st_ino == inode
            assert admin_unix(path, "GET", "/healthz") == (200, {"status": "ok"})
            first.kill_group()
        assert path.is_socket()  # stale now: nobody answers it

        with running_server(*common, "--admin-socket", str(path)) as second:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert admin_unix(path, "GET", "/healthz") == (200, {"status": "ok"})
            assert second.stop() == 0
        assert not path.exists()  # removed on a clean stop

        # Never a file that is not a socket: a regular file, a symlink, a missing folder.
        path.write_text("precious")
        target = tmp_path / "elsewhere"
        target.write_text("also precious")
        link = tmp_path / "link.sock"
        link.symlink_to(target)
        missing = tmp_path / "no-such-folder" / "admin.sock"
        for where in (path, link, missing):
            result = serve_and_fail(*common, "--admin-socket", str(where))
            assert result.returncode == 1, (where, result.stderr)
            assert "cannot listen" in result.stderr
        assert path.read_text() == "precious"
        assert link.is_symlink()
        assert target.read_text() == "also precious"
        assert not missing.parent.exists()
    finally:
        os.umask(old_umask)


# ---- security: the TCP admin listener's token ----


def wrong_authorizations(token: str) -> dict[str, dict[str, str]]:
    """Every near miss of `Authorization: Bearer <token>`, by name."""
    flipped = {
        f"same length, position {at} wrong": token[:at] + ("0" if token[at] != "0" else "1") + token[at + 1 :]
        for at in (0, len(token) // 2, len(token) - 1)
    }
    cases: dict[str, dict[str, str]] = {
        "none": {},
        "empty": {"Authorization": ""},
        "scheme only": {"Authorization": "Bearer"},
        "scheme and space": {"Authorization": "Bearer "},
        "all wrong, same length": {"Authorization": "Bearer " + "x" * len(token)},
        "longer": {"Authorization": f"Bearer {token}0"},
        "twice": {"Authorization": f"Bearer {token}{token}"},
        "upper case": {"Authorization": f"Bearer {token.upper()}"},
        "basic scheme": {"Authorization": f"Basic {token}"},
        "no scheme": {"Authorization": token},
        "other header": {"X-Admin-Token": token, "Cookie": f"token={token}"},
    }
    cases.update({name: {"Authorization": f"Bearer {value}"} for name, value in flipped.items()})
    cases.update({f"prefix of {size}": {"Authorization": f"Bearer {token[:size]}"} for size in range(1, len(token))})
    return cases


def test_the_tcp_admin_listener_refuses_every_wrong_token(tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    token_file = tmp_path / "token"
    write_token_file(token_file, token)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "vm1.json").write_text(json.dumps(vm_document("vm1", private_ips=["127.0.3.2"])))
    protected = (
        ("GET", "/vms", None),
        ("GET", "/vms/vm1", None),
        ("GET", "/vms/vm1/scheduledevents", None),
        ("PUT", "/vms/vm9", vm_document("vm9", private_ips=["127.0.3.9"])),
        ("PATCH", "/vms/vm1", {"instance": {"compute": {"location": "stolen"}}}),
        ("DELETE", "/vms/vm1", None),
    )
    cases = wrong_authorizations(token)
    with running_server("--data-dir", str(data_dir), "--admin-port", "0", "--admin-token-file", str(token_file)) as s:
        port = int(s.admin[0].rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            for name, headers in cases.items():
                for method, target, body in protected:
                    target_with_query = target + f"?token={token}" if name == "other header" else target
                    conn.request(
                        method, target_with_query, body=None if body is None else json.dumps(body), headers=headers
                    )
                    response = conn.getresponse()
                    reply = response.read()
                    assert response.status == 401, (name, method, target, reply)
                    assert response.getheader("WWW-Authenticate") == 'Bearer realm="fastimds"'
                    assert json.loads(reply) == {"error": "a bearer token is required"}, (name, reply)
            status, listing = admin_call(conn, "GET", "/vms", headers={"Authorization": f"Bearer {token}"})
            assert (status, listing) == (200, {"vms": [{"id": "vm1", "generation": 1, "callers": ["127.0.3.2"]}]})
        finally:
            conn.close()
        assert get_from("127.0.3.2", s.port, f"{INSTANCE}")[0] == 200
    print(f"\nTCP admin token: {len(cases)} wrong authorizations x {len(protected)} requests, every one 401")


SPY_SITECUSTOMIZE = '''
"""Loaded by the server under test (PYTHONPATH): records, and can overrule, every hmac.compare_digest."""
import hmac
import json
import os

_real = hmac.compare_digest
_log = os.environ["FASTIMDS_TEST_COMPARE_LOG"]
_mode = os.environ["FASTIMDS_TEST_COMPARE_MODE"]


def compare_digest(a, b):
    result = _real(a, b)
    with open(_mode) as mode_file:
        forced = {"true": True, "false": False}.get(mode_file.read().strip())
    with open(_log, "a") as log:
        log.write(json.dumps([bytes(a).decode("latin-1"), bytes(b).decode("latin-1"), result]) + "\\n")
    return result if forced is None else forced


hmac.compare_digest = compare_digest
'''


def test_the_running_server_guards_the_token_with_compare_digest_alone(tmp_path: Path) -> None:
    """In the real serving process, hmac.compare_digest(credential, token) makes the decision, and nothing else.

    A sitecustomize loaded by the server wraps it: recording shows it is called once per /vms request with
    the credential and the token; forcing it False refuses the right token, forcing it True admits wrong
    tokens of any length, so no other comparison (`==`, a length check) decides first.
    """
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SPY_SITECUSTOMIZE)
    log, mode = tmp_path / "compare.log", tmp_path / "mode"
    mode.write_text("spy")
    token = secrets.token_hex(16)
    token_file = tmp_path / "token"
    write_token_file(token_file, token)
    environment = [
        "env",
        f"PYTHONPATH={os.pathsep.join(filter(None, [str(hooks), os.environ.get('PYTHONPATH')]))}",
        f"FASTIMDS_TEST_COMPARE_LOG={log}",
        f"FASTIMDS_TEST_COMPARE_MODE={mode}",
    ]
    args = ("--admin-port", "0", "--admin-token-file", str(token_file), "--workers", "2")
    with running_server(*args, prefix=environment) as server:
        port = int(server.admin[0].rsplit(":", 1)[1])

        def status_with(credential: str, target: str = "/vms") -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", target, headers={"Authorization": f"Bearer {credential}"})
                response = conn.getresponse()
                response.read()
                return response.status
            finally:
                conn.close()

        def calls() -> list[tuple[str, str, bool]]:
            return [tuple(json.loads(line)) for line in log.read_text().splitlines()] if log.exists() else []

        same_length = "0" * len(token)
        assert [status_with(token), status_with(same_length), status_with("short")] == [200, 401, 401]
        assert status_with("anything", "/healthz") == 200  # needs no token: no comparison
        assert calls() == [(token, token, True), (same_length, token, False), ("short", token, False)]
        mode.write_text("false")
        assert status_with(token) == 401
        mode.write_text("true")
        assert [status_with(same_length), status_with("short"), status_with("x" * 100)] == [200, 200, 200]
        assert len(calls()) == 7


# ---- randomised isolation: many VMs, every caller gets its own VM only ----

SECRET = re.compile(rb"secret-[0-9a-f]{16}")


@dataclass
class FleetVm:
    vm_id: str
    addresses: list[str]
    secrets: set[str]  # every tags value it has had: a reader may see any of them, and nobody else's


def test_randomised_callers_only_ever_see_their_own_vm(tmp_path: Path) -> None:
    vm_count, readers, rounds_per_reader, min_updates = 50, 4, 8, 50
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    fleet: dict[str, FleetVm] = {}
    owner_of_secret: dict[str, str] = {}
    for index in range(vm_count):
        vm_id = f"vm{index:02d}"
        addresses = [f"127.0.{10 + index}.2", f"127.0.{10 + index}.3"]
        secret = f"secret-{secrets.token_hex(8)}"
        document = vm_document(vm_id, private_ips=addresses)
        document["instance"]["compute"]["tags"] = secret
        (data_dir / f"{vm_id}.json").write_text(json.dumps(document))
        fleet[vm_id] = FleetVm(vm_id, addresses, {secret})
        owner_of_secret[secret] = vm_id
    unknown = ["127.0.200.2", "127.0.200.3"]
    admin_socket = tmp_path / "admin.sock"
    args = ("--data-dir", str(data_dir), "--workers", "2", "--admin-socket", str(admin_socket))
    lock = threading.Lock()
    with running_server(*args) as server:
        assert f" vms={vm_count} " in server.ready_line
        checked: Counter[str] = Counter()
        leaks: list[str] = []
        stop = threading.Event()

        def check(vm: FleetVm | None, source: str, target: str, status: int, body: bytes) -> None:
            """The reply belongs to `vm` (None: to nobody) and carries no other VM's secret."""
            with lock:
                allowed = set() if vm is None else set(vm.secrets)
            found = {secret.decode() for secret in SECRET.findall(body)}
            foreign = {owner_of_secret.get(secret, "?") for secret in found - allowed}
            problem = ""
            if foreign:
                problem = f"secrets of {sorted(foreign)}"
            elif vm is None:
                problem = "" if (status, json.loads(body)) == (404, NO_VM_BODY) else f"{status} for nobody"
            elif status != 200:
                problem = f"status {status}"
            elif target == INSTANCE:
                compute = json.loads(body)["compute"]
                addresses = [
                    entry["privateIpAddress"]
                    for entry in json.loads(body)["network"]["interface"][0]["ipv4"]["ipAddress"]
                ]
                mine = (vm_uuid(vm.vm_id), f"{vm.vm_id}-name", vm.addresses)
                if (compute["vmId"], compute["name"], addresses) != mine or compute["tags"] not in allowed:
                    problem = f"another VM's document: {compute['vmId']} {compute['name']} {addresses}"
            else:
                expected = {
                    VMID_TEXT: {vm_uuid(vm.vm_id)},
                    NAME_TEXT: {f"{vm.vm_id}-name"},
                    TAGS_TEXT: allowed,
                    FIRST_IP_TEXT: {vm.addresses[0]},
                }[target]
                if body.decode() not in expected:
                    problem = f"{body[:80]!r} is not {vm.vm_id}'s"
            if problem:
                leaks.append(f"{source} ({vm.vm_id if vm else 'no VM'}) {target}: {problem}")
            with lock:
                checked["responses"] += 1

        def read(reader: int) -> None:
            """Every VM's every address, in random order, over fresh and reused connections."""
            rng = random.Random(9000 + reader)
            plan = [(vm, address) for vm in fleet.values() for address in vm.addresses] * rounds_per_reader
            plan += [(None, address) for address in unknown] * 10
            rng.shuffle(plan)
            kept: dict[str, http.client.HTTPConnection] = {}
            try:
                for vm, source in plan:
                    if stop.is_set():
                        return
                    target = rng.choice([INSTANCE, VMID_TEXT, NAME_TEXT, TAGS_TEXT, FIRST_IP_TEXT])
                    fresh = rng.random() < 0.4
                    conn = (
                        http_from(source, server.port)
                        if fresh
                        else kept.setdefault(source, http_from(source, server.port))
                    )
                    try:
                        conn.request("GET", target, headers={"Metadata": "true"})
                        response = conn.getresponse()
                        check(vm, source, target, response.status, response.read())
                    finally:
                        if fresh:
                            conn.close()
            except Exception as exc:
                leaks.append(f"reader {reader}: {exc!r}")
            finally:
                for conn in kept.values():
                    conn.close()

        def update() -> None:
            """New secrets for random VMs while the readers run (allowed before they are written)."""
            rng = random.Random(4242)
            conn = UnixHTTPConnection(admin_socket)
            try:
                while not readers_done.is_set() or checked["updates"] < min_updates:
                    if stop.is_set():
                        return
                    vm = fleet[rng.choice(sorted(fleet))]
                    secret = f"secret-{secrets.token_hex(8)}"
                    with lock:
                        vm.secrets.add(secret)
                        owner_of_secret[secret] = vm.vm_id
                    status, reply = admin_call(
                        conn, "PATCH", f"/vms/{vm.vm_id}", {"instance": {"compute": {"tags": secret}}}
                    )
                    if status != 200:
                        leaks.append(f"update of {vm.vm_id}: {status} {reply}")
                        return
                    with lock:
                        checked["updates"] += 1
            finally:
                conn.close()

        readers_done = threading.Event()
        threads = [threading.Thread(target=read, args=(reader,), daemon=True) for reader in range(readers)]
        updater = threading.Thread(target=update, daemon=True)
        for thread in [*threads, updater]:
            thread.start()
        try:
            for thread in threads:
                thread.join(timeout=60)
            readers_done.set()
            updater.join(timeout=30)
        finally:
            stop.set()
        threads.append(updater)
        assert not any(thread.is_alive() for thread in threads)
        assert not leaks, leaks[:10]
        expected_responses = readers * (rounds_per_reader * 2 * vm_count + 10 * len(unknown))
        assert checked["responses"] == expected_responses
        assert checked["updates"] >= min_updates
        assert len(live_workers(server)) == 2
    print(
        f"\nisolation: {vm_count} VMs, 2 addresses each, --workers 2: {checked['responses']} responses from every "
        f"VM's addresses (and {len(unknown)} unknown ones) in random order, fresh and kept-alive connections, "
        f"{checked['updates']} admin updates meanwhile; every response its caller's own VM, none another's"
    )

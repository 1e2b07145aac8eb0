"""End-to-end: `fastimds fleet`, the real command against a real etcd (tests/support/etcd.py).

Every command runs as `python -m fastimds fleet ...`; what it wrote is checked
with etcdctl (the cluster helper), never with the client the command uses. The
tests that make a change land between a command's read and its write run the
command in-process, with that change slipped in after the read.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastimds.cli import fleet
from fastimds.cli.main import main
from fastimds.config import ETCD_REQUEST_TIMEOUT_S
from tests.support import etcd as etcd_support
from tests.support.etcd import EtcdCluster, make_tls, require_etcd
from tests.support.server_process import vm_document

CALLERS = {"a": "127.0.1.1", "b": "127.0.1.2", "c": "127.0.1.3"}
# An unreachable etcd is reported within its request timeout, plus a Python start and a little.
GIVE_UP_WITHIN_S = ETCD_REQUEST_TIMEOUT_S + 4.0
etcd = etcd_support.etcd  # the fixture: one etcd member, skipped without etcd (failed under FASTIMDS_CI=1)
ETCDCTL = "/usr/bin/etcdctl" if os.access("/usr/bin/etcdctl", os.X_OK) else "etcdctl"


def key(host: str, vm: str, prefix: str = "/fastimds") -> str:
    return f"{prefix}/hosts/{host}/vms/{vm}"


def document(vm: str, caller: str | None = None, **extra: Any) -> dict[str, Any]:
    return {**vm_document(vm, callers=[caller or CALLERS[vm]]), **extra}


def write(path: Path, value: Any) -> str:
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return str(path)


def run_fleet(
    endpoints: str, *args: str, stdin: str | None = None, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """The real `python -m fastimds fleet --etcd ENDPOINTS FLAGS ARGS`."""
    return subprocess.run(
        [sys.executable, "-m", "fastimds", "fleet", "--etcd", endpoints, *flags, *args],
        capture_output=True,
        text=True,
        timeout=30,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        check=False,
        env={name: value for name, value in os.environ.items() if "proxy" not in name.lower()},
    )


def stored(cluster: EtcdCluster, etcd_key: str) -> Any:
    value = cluster.get(etcd_key)
    return None if value is None else json.loads(value)


def mod_revision(cluster: EtcdCluster, etcd_key: str) -> tuple[int, int]:
    """(create_revision, mod_revision) of `etcd_key`, from etcdctl."""
    kvs = json.loads(cluster.etcdctl("-w", "json", "get", "--", etcd_key).stdout)["kvs"]
    return kvs[0]["create_revision"], kvs[0]["mod_revision"]


def put_keys(cluster: EtcdCluster, keys: list[str], value: str = "{}") -> None:
    """Many keys quickly: etcdctl txn, 128 puts each (etcd's --max-txn-ops)."""
    for start in range(0, len(keys), 128):
        ops = "".join(f"put {name} {value}\n" for name in keys[start : start + 128])
        done = subprocess.run(
            [ETCDCTL, "--endpoints", cluster.endpoints, "txn"],
            input=f"\n{ops}\n\n",  # no compares, the puts, no failure ops
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert done.stdout.startswith("SUCCESS"), done.stdout


@pytest.fixture
def files(tmp_path: Path) -> Path:
    directory = tmp_path / "files"
    directory.mkdir()
    return directory


# ---- put and get ----


def test_put_then_get_round_trip(etcd: EtcdCluster, files: Path) -> None:
    vm_a = document("a")
    put = run_fleet(etcd.endpoints, "put", "h1", "a", write(files / "a.json", vm_a))
    assert put.returncode == 0, put.stderr
    reply = json.loads(put.stdout)
    assert reply["key"] == key("h1", "a") and stored(etcd, key("h1", "a")) == vm_a
    assert reply["revision"] == mod_revision(etcd, key("h1", "a"))[1] == etcd.revision()

    got = run_fleet(etcd.endpoints, "get", "a")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == {"host": "h1", "key": key("h1", "a"), "revision": reply["revision"], "vm": vm_a}

    # From standard input, and an update of a VM in place (same host) is no conflict.
    changed = document("a", "127.0.1.9")
    again = run_fleet(etcd.endpoints, "put", "h1", "a", "-", stdin=json.dumps(changed))
    assert again.returncode == 0, again.stderr
    assert stored(etcd, key("h1", "a")) == changed and json.loads(again.stdout)["revision"] == reply["revision"] + 1


def test_a_bad_file_is_refused_with_every_problem_named_and_nothing_written(etcd: EtcdCluster, files: Path) -> None:
    before = etcd.revision()
    bad = {"id": "other", "instance": {"compute": {}}, "bogus": 1, "callers": ["not-an-ip"]}
    refused = run_fleet(etcd.endpoints, "put", "h1", "a", write(files / "bad.json", bad))
    assert refused.returncode == 2
    for problem in (
        "$.bogus: unknown top-level key",
        "$.callers[0]: 'not-an-ip' is not an IPv4 or IPv6 address",
        "$.instance.network: required key is missing",
        "the document's id 'other' does not match the VM id 'a'",
    ):
        assert problem in refused.stderr
    assert "(4 problems)" in refused.stderr and "Traceback" not in refused.stderr

    not_json = run_fleet(etcd.endpoints, "put", "h1", "a", write(files / "broken.json", '{"instance": '))
    assert not_json.returncode == 2 and "not valid JSON" in not_json.stderr
    bad_id = run_fleet(etcd.endpoints, "put", "h1", "_a", write(files / "a.json", document("a")))
    assert bad_id.returncode == 2 and "'_a' is not a VM id" in bad_id.stderr
    bad_host = run_fleet(etcd.endpoints, "put", "h/1", "a", str(files / "a.json"))
    assert bad_host.returncode == 2 and "'h/1' is not a host id" in bad_host.stderr
    missing = run_fleet(etcd.endpoints, "put", "h1", "a", str(files / "missing.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    assert etcd.revision() == before and etcd.get(key("h1", "a")) is None
    # Refused before etcd is contacted at all: the same bad file against no etcd is still a bad file.
    assert run_fleet("http://127.0.0.1:1", "put", "h1", "a", str(files / "bad.json")).returncode == 2


def test_a_document_id_that_is_not_the_vm_is_refused(etcd: EtcdCluster, files: Path) -> None:
    refused = run_fleet(etcd.endpoints, "put", "h1", "a", write(files / "b.json", document("b", id="b")))
    assert refused.returncode == 2
    assert "the document's id 'b' does not match the VM id 'a'" in refused.stderr
    assert etcd.get(key("h1", "a")) is None
    # The same document under its own id is fine.
    assert run_fleet(etcd.endpoints, "put", "h1", "b", str(files / "b.json")).returncode == 0


def test_a_vm_under_another_host_is_refused_pointing_to_move(etcd: EtcdCluster, files: Path) -> None:
    path = write(files / "a.json", document("a"))
    assert run_fleet(etcd.endpoints, "put", "h1", "a", path).returncode == 0
    before = etcd.revision()
    refused = run_fleet(etcd.endpoints, "put", "h2", "a", path)
    assert refused.returncode == 1
    assert f"lives under host h1 ({key('h1', 'a')})" in refused.stderr
    assert "fastimds fleet move a --to h2" in refused.stderr
    assert etcd.get(key("h2", "a")) is None and etcd.revision() == before


def test_an_address_another_vm_of_the_host_claims_is_refused(etcd: EtcdCluster, files: Path) -> None:
    assert run_fleet(etcd.endpoints, "put", "h1", "a", write(files / "a.json", document("a"))).returncode == 0
    clash = write(files / "b.json", document("b", CALLERS["a"]))
    refused = run_fleet(etcd.endpoints, "put", "h1", "b", clash)
    assert refused.returncode == 1
    assert "under host h1, address 127.0.1.1 is claimed by both VM 'a' and VM 'b'" in refused.stderr
    assert etcd.get(key("h1", "b")) is None
    # Another host's VMs are no conflict; but b may not then move onto a's host either.
    assert run_fleet(etcd.endpoints, "put", "h2", "b", clash).returncode == 0
    moved = run_fleet(etcd.endpoints, "move", "b", "--to", "h1")
    assert moved.returncode == 1 and "address 127.0.1.1 is claimed by both" in moved.stderr
    assert etcd.get(key("h1", "b")) is None and etcd.get(key("h2", "b")) is not None


# ---- ls and hosts ----


def test_ls_and_hosts_list_the_layout_and_ignore_other_keys(etcd: EtcdCluster, files: Path) -> None:
    for host, vm in (("h2", "c"), ("h1", "b"), ("h1", "a")):
        etcd.put(key(host, vm), json.dumps(document(vm)))
    etcd.put(key("h1-x", "a2"), "{}")  # sorts before h1 as a key ('-' < '/'), after it as a host
    for stray in ("/fastimds/hosts/h1/other", "/fastimds/hosts/h3/vms/not an id", "/fastimds/elsewhere"):
        etcd.put(stray, "{}")
    etcd.put(key("h9", "z", prefix="/other"), "{}")

    listed = run_fleet(etcd.endpoints, "ls")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == "h1 a\nh1 b\nh1-x a2\nh2 c\n"
    assert run_fleet(etcd.endpoints, "ls", "h1").stdout == "a\nb\n"
    assert run_fleet(etcd.endpoints, "ls", "nowhere").stdout == ""
    assert run_fleet(etcd.endpoints, "hosts").stdout == "h1 2\nh1-x 1\nh2 1\n"
    assert run_fleet(etcd.endpoints, "--etcd-prefix", "/other", "ls").stdout == "h9 z\n"
    assert run_fleet(etcd.endpoints, "get", "other").returncode == 1  # a stray key is no VM


def test_scans_read_every_page(etcd: EtcdCluster) -> None:
    per_host = fleet.SCAN_PAGE_KEYS // 2 + 20  # two hosts: more keys than one page holds
    names = [f"vm-{index:04d}" for index in range(per_host)]
    put_keys(etcd, [key(host, f"{host}-{name}") for host in ("h1", "h2") for name in names])
    listed = run_fleet(etcd.endpoints, "ls").stdout.splitlines()
    assert listed == [f"{host} {host}-{name}" for host in ("h1", "h2") for name in names]
    assert run_fleet(etcd.endpoints, "hosts").stdout == f"h1 {per_host}\nh2 {per_host}\n"
    last = run_fleet(etcd.endpoints, "get", f"h2-{names[-1]}")  # on the scan's last page
    assert last.returncode == 0 and json.loads(last.stdout)["host"] == "h2"


# ---- delete and move ----


def test_delete_removes_the_vm_where_it_is(etcd: EtcdCluster, files: Path) -> None:
    assert run_fleet(etcd.endpoints, "put", "h2", "a", write(files / "a.json", document("a"))).returncode == 0
    deleted = run_fleet(etcd.endpoints, "delete", "a")
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["deleted"] == key("h2", "a") and etcd.get(key("h2", "a")) is None
    again = run_fleet(etcd.endpoints, "delete", "a")
    assert again.returncode == 1 and "no VM 'a' under any host" in again.stderr


def test_move_is_one_transaction(etcd: EtcdCluster, files: Path) -> None:
    assert run_fleet(etcd.endpoints, "put", "h1", "a", write(files / "a.json", document("a"))).returncode == 0
    value, before = etcd.get(key("h1", "a")), etcd.revision()
    moved = run_fleet(etcd.endpoints, "move", "a", "--to", "h2")
    assert moved.returncode == 0, moved.stderr
    assert etcd.get(key("h1", "a")) is None and etcd.get(key("h2", "a")) == value
    # The delete and the put share one revision: two writes would have made two.
    assert etcd.revision() == before + 1 == json.loads(moved.stdout)["revision"]
    assert mod_revision(etcd, key("h2", "a")) == (before + 1, before + 1)
    assert json.loads(run_fleet(etcd.endpoints, "get", "a").stdout)["host"] == "h2"


def test_move_to_the_host_it_is_on_is_refused(etcd: EtcdCluster, files: Path) -> None:
    assert run_fleet(etcd.endpoints, "put", "h1", "a", write(files / "a.json", document("a"))).returncode == 0
    before = etcd.revision()
    refused = run_fleet(etcd.endpoints, "move", "a", "--to", "h1")
    assert refused.returncode == 1 and "is under host h1 already" in refused.stderr
    assert etcd.revision() == before and etcd.get(key("h1", "a")) is not None


def test_a_missing_vm_is_exit_1(etcd: EtcdCluster) -> None:
    for args in (("get", "ghost"), ("delete", "ghost"), ("move", "ghost", "--to", "h1")):
        done = run_fleet(etcd.endpoints, *args)
        assert done.returncode == 1 and done.stderr == "fastimds fleet: no VM 'ghost' under any host\n", args
    assert run_fleet(etcd.endpoints, "get", "bad/id").returncode == 2


def test_a_vm_under_two_hosts_is_named_not_guessed(etcd: EtcdCluster) -> None:
    for host in ("h1", "h2"):  # what two racing puts of one new VM can leave (see fastimds/cli/fleet.py)
        etcd.put(key(host, "a"), json.dumps(document("a")))
    for args in (("get", "a"), ("delete", "a"), ("move", "a", "--to", "h3")):
        done = run_fleet(etcd.endpoints, *args)
        assert done.returncode == 1 and f"under 2 hosts ({key('h1', 'a')}, {key('h2', 'a')})" in done.stderr, args
    assert etcd.get(key("h1", "a")) is not None and etcd.get(key("h2", "a")) is not None


def test_a_move_refuses_a_description_the_new_host_would_refuse(etcd: EtcdCluster) -> None:
    etcd.put(key("h1", "a"), json.dumps({"instance": {"compute": {}}, "id": "b"}))
    before = etcd.revision()
    refused = run_fleet(etcd.endpoints, "move", "a", "--to", "h2")
    assert refused.returncode == 1 and "(2 problems)" in refused.stderr
    assert "$.instance.network: required key is missing" in refused.stderr
    assert "the document's id 'b' does not match the VM id 'a'" in refused.stderr
    assert etcd.revision() == before


# ---- a change between the read and the write ----


def in_process(endpoints: str, *args: str) -> int:
    return main(["fleet", "--etcd", endpoints, *args])


SCAN = fleet.Fleet.vm_keys


def changed_after_read(monkeypatch: pytest.MonkeyPatch, change: Any) -> None:
    """Make `change()` (and only it) land after the command's scan of the fleet, before its write."""
    monkeypatch.setenv("GRPC_VERBOSITY", "NONE")  # what the command sets for itself, undone after the test

    async def scan_then_change(self: fleet.Fleet, host: str | None = None) -> Any:
        found = await SCAN(self, host)
        change()
        return found

    monkeypatch.setattr(fleet.Fleet, "vm_keys", scan_then_change)


def test_a_move_never_clobbers_a_change_made_meanwhile(
    etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    etcd.put(key("h1", "a"), json.dumps(document("a")))
    newer = json.dumps(document("a", "127.0.1.7"))
    changed_after_read(monkeypatch, lambda: etcd.put(key("h1", "a"), newer))
    assert in_process(etcd.endpoints, "move", "a", "--to", "h2") == 1
    assert "VM 'a' changed meanwhile" in capsys.readouterr().err
    assert etcd.get(key("h1", "a")) == newer.encode() and etcd.get(key("h2", "a")) is None
    # The new key appearing meanwhile fails the move too (and the VM stays where it was).
    changed_after_read(monkeypatch, lambda: etcd.put(key("h2", "a"), "{}"))
    assert in_process(etcd.endpoints, "move", "a", "--to", "h2") == 1
    assert etcd.get(key("h1", "a")) == newer.encode() and etcd.get(key("h2", "a")) == b"{}"


def test_put_and_delete_never_undo_a_move_made_meanwhile(
    etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], files: Path
) -> None:
    value = json.dumps(document("a"))
    etcd.put(key("h1", "a"), value)

    def moved() -> None:
        etcd.delete(key("h1", "a"))
        etcd.put(key("h2", "a"), value)

    changed_after_read(monkeypatch, moved)
    assert in_process(etcd.endpoints, "put", "h1", "a", write(files / "a.json", document("a", "127.0.1.8"))) == 1
    assert "changed meanwhile" in capsys.readouterr().err
    assert etcd.get(key("h1", "a")) is None  # not put back under h1 beside h2's copy

    etcd.put(key("h1", "b"), json.dumps(document("b")))
    changed_after_read(monkeypatch, lambda: etcd.put(key("h1", "b"), json.dumps(document("b", "127.0.1.6"))))
    assert in_process(etcd.endpoints, "delete", "b") == 1
    assert etcd.get(key("h1", "b")) is not None


# ---- etcd away, TLS and auth ----


def test_an_unreachable_etcd_is_one_line_and_exit_1(etcd: EtcdCluster) -> None:
    endpoints = etcd.endpoints
    etcd.close()  # its port is closed now
    started = time.monotonic()
    done = run_fleet(endpoints, "ls")
    assert time.monotonic() - started < GIVE_UP_WITHIN_S
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"fastimds fleet: etcd at {endpoints}: ") and done.stderr.count("\n") == 1


def test_a_silent_etcd_gives_up_after_the_request_timeout(etcd: EtcdCluster) -> None:
    del etcd  # only a port that accepts and never answers: a hung member
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        done = run_fleet(f"http://127.0.0.1:{silent.getsockname()[1]}", "get", "a")
        assert time.monotonic() - started < GIVE_UP_WITHIN_S
    assert done.returncode == 1 and f"no answer within {ETCD_REQUEST_TIMEOUT_S:g} s" in done.stderr
    assert done.stderr.count("\n") == 1


@pytest.fixture
def secure_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    require_etcd()
    cluster = EtcdCluster(tmp_path / "etcd-tls", tls=make_tls(tmp_path / "tls"), client_cert_auth=True).start()
    try:
        cluster.enable_auth("fleet", "s3cret-pass")
        yield cluster
    finally:
        cluster.remove_data()


def test_tls_with_a_client_certificate_and_user_password_auth(
    secure_etcd: EtcdCluster, files: Path, tmp_path: Path
) -> None:
    tls = secure_etcd.tls
    assert tls is not None and secure_etcd.endpoints.startswith("https://")
    password = tmp_path / "password"
    password.write_text("s3cret-pass\n")
    password.chmod(0o600)
    certs = ("--etcd-ca", str(tls.ca), "--etcd-cert", str(tls.client_cert), "--etcd-key", str(tls.client_key))
    flags = (*certs, "--etcd-user", "fleet", "--etcd-password-file", str(password))
    put = run_fleet(secure_etcd.endpoints, "put", "h1", "a", write(files / "a.json", document("a")), flags=flags)
    assert put.returncode == 0, put.stderr
    assert stored(secure_etcd, key("h1", "a")) == document("a")
    assert run_fleet(secure_etcd.endpoints, "move", "a", "--to", "h2", flags=flags).returncode == 0
    assert run_fleet(secure_etcd.endpoints, "ls", flags=flags).stdout == "h2 a\n"

    password.write_text("wrong\n")
    refused = run_fleet(secure_etcd.endpoints, "ls", flags=flags)
    assert refused.returncode == 1 and "authentication failed" in refused.stderr.lower()
    assert refused.stderr.count("\n") == 1
    no_auth = run_fleet(secure_etcd.endpoints, "ls", flags=certs)  # the certificate's CN is no etcd user
    assert no_auth.returncode == 1 and "permission denied" in no_auth.stderr and no_auth.stderr.count("\n") == 1
    # No client certificate: the handshake fails, in one line (gRPC's own TLS log lines are off).
    no_cert = run_fleet(secure_etcd.endpoints, "ls", flags=certs[:2])
    assert no_cert.returncode == 1 and no_cert.stderr.count("\n") == 1, no_cert.stderr

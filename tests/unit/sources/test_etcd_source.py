"""Fleet mode without etcd: the layout, the settings, the backoff, and what the source does with what it reads.

The source's applying half (a sync's values, a watch's events) runs against a
real Control and its in-process follower; the following half (connections,
watches, outages) is proven against real etcd processes in
tests/e2e/test_fleet_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fastimds.config import ConfigError, EtcdSettings, Settings
from fastimds.control.writer import ADMIN_SOURCE, ETCD_SOURCE_PREFIX, Control, UpdateError, source_kind
from fastimds.ops.event_log import EventLog
from fastimds.sources.etcd import DELETE, PUT, Backoff, EtcdSource
from fastimds.sources.etcd_layout import FleetLayout, prefix_end
from tests.support.server_process import vm_document

HOST = "h1"
LAYOUT = FleetLayout("/fastimds")


def key(vm: str, host: str = HOST) -> bytes:
    return LAYOUT.vm_key(host, vm)


def value(vm: str, caller: str, location: str = "westeurope") -> bytes:
    return json.dumps(vm_document(vm, callers=[caller], location=location)).encode()


def event(kind: int, event_key: bytes, revision: int, data: bytes = b"") -> Any:
    return SimpleNamespace(type=kind, kv=SimpleNamespace(key=event_key, value=data, mod_revision=revision))


def location_of(control: Control, vm_id: str) -> str | None:
    vm = control.vm(vm_id)
    return None if vm is None else str(vm.instance["compute"]["location"])


@pytest.fixture
def source(control: Control, log: EventLog) -> EtcdSource:
    return EtcdSource(EtcdSettings(("http://127.0.0.1:2379",), host_id=HOST), control, log)


# ---- the layout ----


def test_keys_name_a_host_and_a_vm_and_nothing_else_parses() -> None:
    assert LAYOUT.vm_key("h1", "vm-1") == b"/fastimds/hosts/h1/vms/vm-1"
    assert LAYOUT.parse(b"/fastimds/hosts/h1/vms/vm-1") == ("h1", "vm-1")
    for bad in (b"/fastimds/hosts/h1/vms/", b"/fastimds/hosts/h1/vms/a/b", b"/fastimds/hosts//vms/a", b"/other/x"):
        assert LAYOUT.parse(bad) is None
    assert LAYOUT.vm_of("h2", key("vm-1")) is None


def test_prefix_end_covers_exactly_the_prefix() -> None:
    end = prefix_end(b"/fastimds/hosts/h1/vms/")
    assert end == b"/fastimds/hosts/h1/vms0"  # the first key past every one under the prefix
    assert LAYOUT.vm_key(HOST, "z" * 128) < end
    assert prefix_end(b"a\xff") == b"b"


# ---- settings ----


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"endpoints": ()}, "at least one endpoint"),
        ({"endpoints": ("10.0.0.5:2379",)}, "is not http://HOST:PORT"),
        ({"endpoints": ("http://a:1", "https://b:1"), "ca_file": Path("ca")}, "mix http and https"),
        ({"endpoints": ("https://a:1",)}, "need --etcd-ca"),
        ({"endpoints": ("http://a:1",), "ca_file": Path("ca")}, "need https://"),
        ({"endpoints": ("https://a:1",), "ca_file": Path("ca"), "cert_file": Path("c")}, "go together"),
        ({"endpoints": ("http://a:1",), "user": "u"}, "--etcd-user and --etcd-password-file"),
        ({"endpoints": ("http://a:1",), "prefix": "fastimds/"}, "--etcd-prefix"),
        ({"endpoints": ("http://a:1",), "host_id": "a/b"}, "--host-id"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_flag(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EtcdSettings(**options)


def test_the_password_never_shows_in_a_settings_repr_or_the_config_log_line() -> None:
    settings = EtcdSettings(("http://a:1",), user="u", password="hunter2-secret", password_file=Path("/p"))
    assert "hunter2" not in repr(settings)
    shown = Settings(etcd=settings).describe()
    assert shown["etcd_user"] == "u" and shown["etcd_password_file"] == "/p"
    assert "hunter2" not in repr(shown)


def test_fleet_mode_refuses_data_and_allows_a_default_vm() -> None:
    etcd = EtcdSettings(("http://a:1",))
    with pytest.raises(ConfigError, match="--data and --etcd"):
        Settings(etcd=etcd, data_path=Path("vm.json"))
    assert Settings(etcd=etcd, default_vm="a").default_vm == "a"


# ---- backoff ----


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(first_s=0.1, cap_s=1.0)
    delays = [backoff.next() for _ in range(8)]
    steps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(step / 2 <= delay <= step for delay, step in zip(delays, steps, strict=True))
    backoff.reset()
    assert backoff.next() <= 0.1


# ---- applying a sync ----


def test_a_sync_puts_the_hosts_vms_and_removes_etcd_vms_it_no_longer_holds(
    source: EtcdSource, control: Control
) -> None:
    source._apply_sync({key("a"): value("a", "127.0.1.1"), key("b"): value("b", "127.0.1.2")})
    assert set(control.live_ids()) == {"a", "b"}
    assert control.source_of("a") == ETCD_SOURCE_PREFIX + key("a").decode()
    control.put("local", vm_document("local", callers=["127.0.1.9"]))  # the admin API's: not etcd's to remove
    source._apply_sync({key("b"): value("b", "127.0.1.2", location="eastus")})
    assert set(control.live_ids()) == {"b", "local"}
    assert location_of(control, "b") == "eastus"


def test_a_sync_lands_an_address_that_moved_between_two_vms(source: EtcdSource, control: Control) -> None:
    source._apply_sync({key("a"): value("a", "127.0.1.1")})
    # "b" now claims a's old address and "a" a new one: in key order "a" comes first, but either order must land.
    source._apply_sync({key("a"): value("a", "127.0.1.5"), key("b"): value("b", "127.0.1.1")})
    assert set(control.live_ids()) == {"a", "b"}
    source._apply_sync({key("b"): value("b", "127.0.1.7"), key("c"): value("c", "127.0.1.5")})
    assert set(control.live_ids()) == {"b", "c"}


# ---- applying watch events ----


def test_events_apply_in_order_and_a_delete_removes_only_etcd_s_own_vm(source: EtcdSource, control: Control) -> None:
    source.revision = 10
    source._apply_events(
        [
            event(PUT, key("a"), 11, value("a", "127.0.1.1")),
            event(PUT, key("a"), 12, value("a", "127.0.1.1", "eastus")),
            event(DELETE, key("ghost"), 13),
        ]
    )
    assert location_of(control, "a") == "eastus" and source.revision == 13
    source._apply_events([event(DELETE, key("a"), 14)])
    assert control.vm("a") is None


def test_events_at_or_below_the_revision_applied_are_skipped(source: EtcdSource, control: Control) -> None:
    source.revision = 20
    source._apply_events([event(PUT, key("a"), 20, value("a", "127.0.1.1"))])
    assert control.vm("a") is None


def test_a_refused_value_keeps_the_last_good_one_and_is_logged_with_its_key_and_problems(
    source: EtcdSource, control: Control, capfd: pytest.CaptureFixture[str]
) -> None:
    source.revision = 1
    source._apply_events([event(PUT, key("a"), 2, value("a", "127.0.1.1"))])
    capfd.readouterr()
    source._apply_events(
        [
            event(PUT, key("a"), 3, b'{"instance": {}, "extra": 1}'),
            event(PUT, key("a"), 4, b"{not json"),
            event(PUT, key("a"), 5, b"[1, 2]"),
            event(PUT, LAYOUT.host_prefix(HOST) + b"a/b", 6, value("a", "127.0.1.1")),
        ]
    )
    assert location_of(control, "a") == "westeurope"
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    refused = [line for line in lines if line["event"] == "update_refused"]
    assert len(refused) == 4 and control.updates["refused", "etcd"] == 4
    assert any("$.extra" in " ".join(line["problems"]) for line in refused)
    assert any("not JSON" in " ".join(line["problems"]) for line in refused)
    assert any("not a VM key" in " ".join(line["problems"]) for line in refused)
    assert all(line["source"].startswith("etcd:/fastimds/hosts/h1/vms/") for line in refused)


def test_a_value_refused_for_a_taken_address_lands_once_the_address_is_freed(
    source: EtcdSource, control: Control
) -> None:
    source.revision = 1
    source._apply_events([event(PUT, key("a"), 2, value("a", "127.0.1.1"))])
    source._apply_events([event(PUT, key("b"), 3, value("b", "127.0.1.1"))])  # conflict: waits
    assert control.vm("b") is None and control.updates["refused", "etcd"] == 1
    source._apply_events([event(PUT, key("c"), 4, value("c", "127.0.1.3"))])  # unrelated: no new refusal
    assert control.updates["refused", "etcd"] == 1
    source._apply_events([event(DELETE, key("a"), 5)])
    assert control.vm("b") is not None


# ---- ownership ----


def test_a_vm_etcd_holds_refuses_local_writes_naming_etcd(source: EtcdSource, control: Control) -> None:
    source._apply_sync({key("a"): value("a", "127.0.1.1")})
    for write in (
        lambda: control.put("a", vm_document("a", callers=["127.0.1.1"])),
        lambda: control.delete("a"),
        lambda: control.patch("a", {}),
        lambda: control.put("a", vm_document("a", callers=["127.0.1.1"]), "data-dir:a.json"),
    ):
        with pytest.raises(UpdateError, match=r"owned by etcd \(key /fastimds/hosts/h1/vms/a\)") as refused:
            write()
        assert refused.value.status == 409
    assert control.updates["refused", "admin"] == 3 and source_kind(ADMIN_SOURCE) == "admin"
    assert location_of(control, "a") == "westeurope"


def test_etcd_takes_over_a_vm_a_local_source_held(source: EtcdSource, control: Control) -> None:
    control.put("a", vm_document("a", callers=["127.0.1.1"], location="eastus"))
    source._apply_sync({key("a"): value("a", "127.0.1.1", location="westus")})
    assert control.source_of("a") == ETCD_SOURCE_PREFIX + key("a").decode()
    assert location_of(control, "a") == "westus"


# ---- the mark in the state dir ----


def test_the_mark_makes_a_restart_synced_only_for_the_same_host_and_prefix(control: Control, log: EventLog) -> None:
    first = EtcdSource(EtcdSettings(("http://127.0.0.1:2379",), host_id=HOST), control, log)
    assert first.status().synced is False
    first.revision = 42
    first._mark()
    again = EtcdSource(EtcdSettings(("http://127.0.0.1:2379",), host_id=HOST), control, log)
    again.load()
    assert again.status().synced is True and again.status().revision == 42 and not again.status().connected
    other = EtcdSource(EtcdSettings(("http://127.0.0.1:2379",), host_id="h2"), control, log)
    other.load()
    assert other.status().synced is False

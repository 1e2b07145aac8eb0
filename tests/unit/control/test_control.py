"""The control plane without sockets: writes, merge patches, the bus, followers and --data-dir.

Every update goes through Control: validated, checked for address
conflicts, numbered, written to the bus, then published. A refused update
changes nothing anywhere. Followers (the workers) apply what the bus holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastimds.bus.files import Bus, BusEntry
from fastimds.bus.follower import Follower, apply_entry
from fastimds.bus.watch import start_watch
from fastimds.control.writer import DATA_DIR_SOURCE_PREFIX, Control, UpdateError, merge_patch
from fastimds.imds.datafile import MAX_VM_FILE_BYTES
from fastimds.imds.registry import VmRegistry
from fastimds.ops.event_log import EventLog
from fastimds.sources.data_dir import DataDirSource
from fastimds.sources.data_file import DataFileSource
from tests.support.fakes import serving
from tests.support.server_process import vm_document, vm_uuid


def events(captured: str, name: str) -> list[dict[str, Any]]:
    """The log records named `name` in captured stderr."""
    found = []
    for line in captured.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
    return found


def served_vm_id(registry: VmRegistry, address: str) -> str | None:
    snapshot = registry.store_for(address).current
    return None if snapshot is None else str(snapshot.vm.instance["compute"]["vmId"])


def location(registry: VmRegistry, vm_id: str) -> str:
    snapshot = registry.stores[vm_id].current
    assert snapshot is not None
    return str(snapshot.vm.instance["compute"]["location"])


def bus_state(bus: Bus) -> dict[str, bytes]:
    """Every file in the bus directory (temp files included) and its bytes."""
    return {path.name: path.read_bytes() for path in sorted(bus.directory.iterdir())}


# ---- generations ----


def test_put_patch_delete_number_generations(control: Control, bus: Bus) -> None:
    assert control.put("a", vm_document("a", callers=["10.1.0.4"])) == 1
    assert control.put("a", vm_document("a", callers=["10.1.0.4"], location="eastus")) == 2
    assert control.patch("a", {"instance": {"compute": {"location": "northeurope"}}}) == 3
    assert control.put("b", vm_document("b", callers=["10.2.0.4"])) == 1  # numbered per VM

    document = control.document("a")
    assert document["id"] == "a"
    assert document["generation"] == 3
    assert document["source"] == "admin"
    assert document["vm"]["instance"]["compute"]["location"] == "northeurope"
    assert serving(control).stores["a"].current is not None
    assert serving(control).stores["a"].current.generation == 3
    entry = bus.read("a")
    assert entry is not None
    assert (entry.generation, entry.source) == (3, "admin")
    assert entry.document == document["vm"]

    assert control.delete("a") == 4  # a removal is numbered too
    assert bus.read("a") == BusEntry("a", 4, "admin", None)  # a tombstone keeps the generation
    assert "a" not in serving(control).live()
    assert served_vm_id(serving(control), "10.1.0.4") is None
    with pytest.raises(UpdateError) as caught:
        control.document("a")
    assert caught.value.status == 404
    with pytest.raises(UpdateError) as caught:
        control.delete("a")
    assert caught.value.status == 404
    # Generations only grow, even across a delete: followers that saw 3 must take the next write.
    assert control.put("a", vm_document("a", callers=["10.1.0.4"])) == 5  # above the removal (4)
    assert bus.read("a") is not None
    assert bus.read("a").generation == 5  # type: ignore[union-attr]


def test_patch_merges_and_keeps_the_rest(control: Control) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4", "10.1.0.5"]))
    before = control.document("a")["vm"]
    control.patch("a", {"instance": {"compute": {"location": "eastus", "tags": None}}, "callers": ["10.1.0.5"]})
    after = control.document("a")["vm"]
    assert after["instance"]["compute"]["location"] == "eastus"
    assert "tags" not in after["instance"]["compute"]
    assert after["instance"]["network"] == before["instance"]["network"]
    assert before["instance"]["compute"]["location"] == "westeurope"  # the old document was not mutated
    assert "tags" in before["instance"]["compute"]
    assert served_vm_id(serving(control), "10.1.0.4") is None
    assert served_vm_id(serving(control), "10.1.0.5") == vm_uuid("a")

    control.patch("a", {"callers": None})
    assert "callers" not in control.document("a")["vm"]
    assert served_vm_id(serving(control), "10.1.0.5") is None


def test_a_patch_that_changes_nothing_keeps_the_generation_and_writes_nothing(control: Control, bus: Bus) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    control.patch("a", {"instance": {"compute": {"location": "eastus"}}})
    before = bus.path_of("a").read_bytes()
    location = {"instance": {"compute": {"location": "eastus"}}}
    assert control.patch("a", {}) == control.patch("a", location) == 2
    assert bus.path_of("a").read_bytes() == before
    assert control.patch("a", {"instance": {"compute": {"location": "westus"}}}) == 3


def test_patch_of_a_missing_vm_is_404(control: Control) -> None:
    with pytest.raises(UpdateError) as caught:
        control.patch("nope", {"instance": {}})
    assert caught.value.status == 404


# ---- RFC 7396 ----

# RFC 7396 appendix A, every row, then a few more.
MERGE_CASES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    # nested merges several levels down keep every sibling
    ({"x": {"y": {"z": 1, "w": 2}, "v": 3}}, {"x": {"y": {"z": 9}}}, {"x": {"y": {"z": 9, "w": 2}, "v": 3}}),
    # deleting a key that is not there is a no-op
    ({"a": 1}, {"b": None}, {"a": 1}),
    # an object replaces a scalar, merged onto nothing (nulls inside it dropped)
    ({"a": 1}, {"a": {"b": None, "c": 2}}, {"a": {"c": 2}}),
    # the empty patch changes nothing
    ({"a": {"b": 1}}, {}, {"a": {"b": 1}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), MERGE_CASES)
def test_merge_patch_rfc_7396(target: Any, patch: Any, expected: Any) -> None:
    original = orjson.dumps(target)
    assert merge_patch(target, patch) == expected
    assert orjson.dumps(target) == original  # the target is never mutated


# ---- refused writes change nothing ----


def _too_large() -> dict[str, Any]:
    document = vm_document("a", callers=["10.1.0.4"])
    document["instance"]["compute"]["tags"] = "x" * MAX_VM_FILE_BYTES
    return document


def _without_instance() -> dict[str, Any]:
    document = vm_document("a", callers=["10.1.0.4"])
    del document["instance"]
    return document


def _bad_kind() -> dict[str, Any]:
    document = vm_document("a", callers=["10.1.0.4"])
    document["instance"]["compute"]["tagsList"] = "not a list"
    return document


# (VM id, document or callable building it) -> (status, text the message or a problem must contain)
REFUSED_PUTS: dict[str, tuple[str, Any, int, str]] = {
    "no_instance": ("a", _without_instance, 400, "$.instance: required key is missing"),
    "bad_kind": ("a", _bad_kind, 400, "$.instance.compute.tagsList"),
    "not_an_object": ("a", lambda: ["a"], 400, "expected an object"),
    "bad_caller": ("a", lambda: vm_document("a", callers=["not-an-ip"]), 400, "$.callers[0]"),
    "unknown_key": ("a", lambda: {**vm_document("a"), "bogus": 1}, 400, "$.bogus"),
    "id_mismatch": ("a", lambda: {**vm_document("a"), "id": "b"}, 400, "does not match"),
    "bad_id_slash": ("a/b", lambda: vm_document("x"), 400, "is not a VM id"),
    "bad_id_dots": ("..", lambda: vm_document("x"), 400, "is not a VM id"),
    "bad_id_empty": ("", lambda: vm_document("x"), 400, "is not a VM id"),
    "bad_id_long": ("a" * 129, lambda: vm_document("x"), 400, "is not a VM id"),
    "conflict": ("a", lambda: vm_document("a", callers=["10.1.0.4", "10.2.0.4"]), 409, "'b'"),
    "conflict_new_vm": ("c", lambda: vm_document("c", private_ips=["::ffff:10.2.0.4"]), 409, "'c'"),
    "too_large": ("a", _too_large, 413, str(MAX_VM_FILE_BYTES)),
    "too_large_new_vm": ("c", _too_large, 413, str(MAX_VM_FILE_BYTES)),
}


@pytest.mark.parametrize("case", REFUSED_PUTS)
def test_a_refused_put_changes_nothing(case: str, control: Control, bus: Bus) -> None:
    vm_id, build, status, needle = REFUSED_PUTS[case]
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    control.put("b", vm_document("b", callers=["10.2.0.4"]))
    registry = serving(control)
    before = (registry.summary(), dict(registry.callers), {k: s.current for k, s in registry.stores.items()})
    files = bus_state(bus)

    with pytest.raises(UpdateError) as caught:
        control.put(vm_id, build() if callable(build) else build)
    assert caught.value.status == status
    assert any(needle in text for text in [caught.value.message, *caught.value.problems]), (
        caught.value.message,
        caught.value.problems,
    )
    if status == 409:
        assert "'b'" in caught.value.message
        assert f"'{vm_id}'" in caught.value.message

    assert (registry.summary(), dict(registry.callers), {k: s.current for k, s in registry.stores.items()}) == before
    assert bus_state(bus) == files  # no new file, no temp file left, nothing rewritten
    assert served_vm_id(registry, "10.1.0.4") == vm_uuid("a")
    assert served_vm_id(registry, "10.2.0.4") == vm_uuid("b")


def test_a_refused_patch_changes_nothing(control: Control, bus: Bus) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    control.put("b", vm_document("b", callers=["10.2.0.4"]))
    files = bus_state(bus)
    summary = serving(control).summary()
    for patch, status in (
        ({"instance": {"compute": "flat"}}, 400),
        ({"instance": None}, 400),
        ({"id": "other"}, 400),
        ({"callers": ["10.2.0.4"]}, 409),
        (None, 400),  # RFC 7396: a null patch replaces the whole document with null
        ({"instance": {"compute": {"tags": "x" * MAX_VM_FILE_BYTES}}}, 413),
    ):
        with pytest.raises(UpdateError) as caught:
            control.patch("a", patch)
        assert caught.value.status == status, patch
    assert bus_state(bus) == files
    assert serving(control).summary() == summary
    assert location(serving(control), "a") == "westeurope"


# ---- the bus ----


def test_bus_write_is_readable_and_leaves_only_the_vm_file(bus: Bus) -> None:
    document = vm_document("a", callers=["10.1.0.4"])
    bus.write(BusEntry("a", 7, "admin", document))
    assert sorted(path.name for path in bus.directory.iterdir()) == ["a.json"]
    assert bus.read("a") == BusEntry("a", 7, "admin", document)
    assert orjson.loads(bus.path_of("a").read_bytes()) == {
        "generation": 7,
        "source": "admin",
        "vm": document,
        "events": None,
    }
    assert bus.ids() == ["a"]
    assert bus.read_all() == [BusEntry("a", 7, "admin", document)]
    assert bus.read("missing") is None
    bus.write(BusEntry("a", 8, "admin", None))  # a removal: a tombstone, still one file
    assert sorted(path.name for path in bus.directory.iterdir()) == ["a.json"]
    assert bus.read("a") == BusEntry("a", 8, "admin", None)


def test_bus_write_fsyncs_file_and_directory_when_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", spy)
    durable = Bus(tmp_path / "durable", durable=True, log=EventLog())
    durable.write(BusEntry("a", 1, "admin", vm_document("a")))
    assert len(synced) == 2
    assert Path(synced[0]).parent == durable.directory.resolve()  # the temp file, before its rename
    assert Path(synced[0]).name.startswith(".a.")
    assert Path(synced[1]) == durable.directory.resolve()  # then the directory, after it
    synced.clear()
    durable.write(BusEntry("a", 2, "admin", None))  # a tombstone is written just as durably
    assert len(synced) == 2
    assert Path(synced[1]) == durable.directory.resolve()
    synced.clear()
    Bus(tmp_path / "private", durable=False, log=EventLog()).write(BusEntry("a", 1, "admin", vm_document("a")))
    assert synced == []


def test_a_failed_bus_write_keeps_the_old_file_and_no_temp(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    bus.write(BusEntry("a", 1, "admin", vm_document("a")))
    files = bus_state(bus)

    def broken_replace(*_args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        bus.write(BusEntry("a", 2, "admin", vm_document("a", location="eastus")))
    assert bus_state(bus) == files


def test_a_failed_bus_write_fails_the_put_and_publishes_nothing(
    control: Control, monkeypatch: pytest.MonkeyPatch
) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))

    def broken_replace(*_args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        control.put("a", vm_document("a", callers=["10.1.0.4"], location="eastus"))
    assert location(serving(control), "a") == "westeurope"  # not acknowledged, so not served
    assert serving(control).stores["a"].generation == 1


def test_readers_never_see_a_partial_bus_file(bus: Bus, capfd: pytest.CaptureFixture[str]) -> None:
    documents = [vm_document("a", location=f"loc-{n}") for n in range(2)]
    documents[1]["instance"]["compute"]["tags"] = "y" * 200_000  # big enough that a write takes several syscalls
    bus.write(BusEntry("a", 1, "admin", documents[0]))
    stop = threading.Event()
    failures: list[str] = []

    def writer() -> None:
        generation = 1
        while not stop.is_set():
            generation += 1
            bus.write(BusEntry("a", generation, "admin", documents[generation % 2]))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(300):
            entry = bus.read("a")
            if entry is None or entry.document not in documents:
                failures.append(repr(entry)[:200])
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not failures
    assert not events(capfd.readouterr().err, "state_file_corrupt")


CORRUPT_FILES: dict[str, bytes] = {
    "not_json": b"\x00garbage{",
    "truncated": b'{"generation": 3, "source": "admin", "vm": {"instance": ',
    "a_list": b"[1, 2, 3]",
    "a_string": b'"hello"',
    "no_generation": b'{"source": "admin", "vm": {}}',
    "zero_generation": b'{"generation": 0, "source": "admin", "vm": {}}',
    "text_generation": b'{"generation": "three", "source": "admin", "vm": {}}',
    "vm_not_object": b'{"generation": 1, "source": "admin", "vm": [1]}',
    "empty": b"",
}


@pytest.mark.parametrize("case", CORRUPT_FILES)
def test_a_corrupt_bus_file_is_reported_and_skipped(
    case: str, control: Control, bus: Bus, capfd: pytest.CaptureFixture[str]
) -> None:
    bus.write(BusEntry("good", 2, "admin", vm_document("good", callers=["10.1.0.4"])))
    bus.path_of("bad").write_bytes(CORRUPT_FILES[case])
    capfd.readouterr()
    control.load_state()
    assert control.live_ids() == ["good"]  # the control's own model
    assert control.generation("good") == 2
    assert control.model.owners["10.1.0.4"] == "good"
    [corrupt] = events(capfd.readouterr().err, "state_file_corrupt")
    assert corrupt["path"] == str(bus.path_of("bad"))
    assert corrupt["error"]


def test_an_invalid_vm_in_the_bus_is_reported_and_skipped(
    control: Control, bus: Bus, capfd: pytest.CaptureFixture[str]
) -> None:
    bus.write(BusEntry("good", 1, "admin", vm_document("good", callers=["10.1.0.4"])))
    bus.write(BusEntry("bad", 1, "admin", {"instance": "not an object"}))
    capfd.readouterr()
    control.load_state()
    assert control.live_ids() == ["good"]
    [invalid] = events(capfd.readouterr().err, "state_file_invalid")
    assert invalid["vm"] == "bad"


def test_bus_ids_ignore_temp_probe_and_foreign_files(bus: Bus) -> None:
    bus.write(BusEntry("a", 1, "admin", vm_document("a")))
    for name in (".a.tmp123", ".probe-42", "b.json.tmp", "notes.txt", "has space.json", ".hidden.json"):
        (bus.directory / name).write_bytes(b"{}")
    assert bus.ids() == ["a"]
    assert set(bus.stamps()) == {"a"}


def test_load_state_resumes_generations(control: Control, bus: Bus) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    control.put("a", vm_document("a", callers=["10.1.0.4"], location="eastus"))
    restarted = Control(Bus(bus.directory, durable=True, log=EventLog()), EventLog())
    restarted.load_state()
    assert restarted.summary() == [{"id": "a", "generation": 2, "callers": ["10.1.0.4"]}]
    vm = restarted.vm("a")
    assert vm is not None and vm.instance["compute"]["location"] == "eastus"
    assert restarted.put("a", vm_document("a", callers=["10.1.0.4"])) == 3


# ---- Follower: a worker's view of the bus ----


@pytest.fixture
def worker(bus: Bus, log: EventLog) -> Follower:
    return Follower(bus, VmRegistry(), log)


def test_follower_applies_changed_files(control: Control, worker: Follower) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    control.put("b", vm_document("b", private_ips=["10.2.0.4"]))
    worker.apply({"a", "b"})
    assert worker.registry.summary() == serving(control).summary()
    assert served_vm_id(worker.registry, "10.2.0.4") == vm_uuid("b")
    control.patch("a", {"instance": {"compute": {"location": "eastus"}}})
    worker.apply({"a"})
    assert location(worker.registry, "a") == "eastus"
    assert worker.registry.stores["a"].generation == 2


def test_follower_removes_deleted_files(control: Control, worker: Follower) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    worker.apply({"a"})
    control.delete("a")
    worker.apply({"a"})
    assert worker.registry.live() == {}
    assert worker.registry.store_for("10.1.0.4") is worker.registry.nobody


def test_follower_keeps_serving_when_a_file_is_corrupt(
    control: Control, bus: Bus, worker: Follower, capfd: pytest.CaptureFixture[str]
) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    worker.apply({"a"})
    bus.path_of("a").write_bytes(b'{"generation": 9, "vm": ')
    capfd.readouterr()
    worker.apply({"a"})
    assert served_vm_id(worker.registry, "10.1.0.4") == vm_uuid("a")
    assert worker.registry.stores["a"].generation == 1
    assert events(capfd.readouterr().err, "state_file_corrupt")


def test_follower_ignores_older_generations(log: EventLog, control: Control, bus: Bus, worker: Follower) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    control.put("a", vm_document("a", callers=["10.1.0.4"], location="eastus"))
    control.put("a", vm_document("a", callers=["10.1.0.4"], location="eastasia"))
    worker.apply({"a"})
    assert worker.registry.stores["a"].generation == 3
    bus.write(BusEntry("a", 2, "admin", vm_document("a", callers=["10.1.0.4"], location="stale")))
    worker.apply({"a"})
    bus.write(BusEntry("a", 3, "admin", vm_document("a", callers=["10.1.0.4"], location="replayed")))
    worker.apply({"a"})
    assert location(worker.registry, "a") == "eastasia"
    assert worker.registry.stores["a"].generation == 3
    # apply_entry says so too: an old entry is "handled" without publishing.
    assert apply_entry(worker.registry, BusEntry("a", 1, "admin", vm_document("a")), worker.log) is True
    assert location(worker.registry, "a") == "eastasia"


def test_follower_rescan_finds_changes_without_being_told(control: Control, worker: Follower) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    worker.rescan()
    assert set(worker.registry.live()) == {"a"}
    control.put("b", vm_document("b", callers=["10.2.0.4"]))
    control.delete("a")
    worker.rescan()
    assert set(worker.registry.live()) == {"b"}
    worker.rescan()  # nothing changed: nothing re-applied
    assert worker.registry.stores["b"].generation == 1


@pytest.mark.parametrize(("claimant", "releaser"), [("a", "b"), ("b", "a")])
def test_follower_moves_an_address_within_one_batch(
    claimant: str, releaser: str, control: Control, worker: Follower
) -> None:
    control.put(releaser, vm_document(releaser, callers=["10.9.0.1", "10.9.0.2"]))
    control.put(claimant, vm_document(claimant, callers=["10.9.0.3"]))
    worker.apply({"a", "b"})
    # The control moves 10.9.0.1 from releaser to claimant; the worker sees both files in one batch.
    control.patch(releaser, {"callers": ["10.9.0.2"]})
    control.patch(claimant, {"callers": ["10.9.0.3", "10.9.0.1"]})
    worker.apply({"a", "b"})
    assert served_vm_id(worker.registry, "10.9.0.1") == vm_uuid(claimant)
    assert worker.registry.summary() == serving(control).summary()


@pytest.mark.parametrize(("claimant", "holder"), [("a", "b"), ("b", "a")])
def test_follower_gives_a_deleted_vms_address_to_another_within_one_batch(
    claimant: str, holder: str, control: Control, worker: Follower
) -> None:
    control.put(holder, vm_document(holder, callers=["10.9.0.1"]))
    worker.apply({holder})
    control.delete(holder)
    control.put(claimant, vm_document(claimant, callers=["10.9.0.1"]))
    worker.apply({"a", "b"})
    assert served_vm_id(worker.registry, "10.9.0.1") == vm_uuid(claimant)
    assert set(worker.registry.live()) == {claimant}


def test_follower_start_watches_the_bus(log: EventLog, control: Control, bus: Bus) -> None:
    registry = VmRegistry()
    control.put("before", vm_document("before", callers=["10.1.0.4"]))

    async def scenario() -> tuple[set[str], str]:
        task = await Follower(bus, registry, log).start()
        try:
            started = set(registry.live())
            control.put("after", vm_document("after", callers=["10.2.0.4"]))
            control.patch("before", {"instance": {"compute": {"location": "eastus"}}})
            deadline = asyncio.get_running_loop().time() + 5
            while asyncio.get_running_loop().time() < deadline:
                if "after" in registry.live() and location(registry, "before") == "eastus":
                    break
                await asyncio.sleep(0.01)
            return started, location(registry, "before")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    started, seen_location = asyncio.run(scenario())
    assert started == {"before"}  # the bus's content is applied before start() returns
    assert set(registry.live()) == {"before", "after"}
    assert seen_location == "eastus"


# ---- --data-dir ----


def write_vm_file(directory: Path, name: str, document: Any) -> Path:
    path = directory / name
    path.write_bytes(document if isinstance(document, bytes) else orjson.dumps(document))
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    return directory


def test_sync_data_dir_applies_refuses_and_deletes_by_file(
    dir_source: DataDirSource, control: Control, data_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    write_vm_file(data_dir, "a.json", vm_document("a", callers=["10.1.0.4"]))
    write_vm_file(data_dir, "b-file.json", vm_document("bee", callers=["10.2.0.4"], with_id=True))
    write_vm_file(data_dir, "broken.json", b"{not json")
    write_vm_file(data_dir, "clash.json", vm_document("clash", callers=["10.1.0.4"]))
    write_vm_file(data_dir, "notes.txt", b"ignored")
    control.put("admin-vm", vm_document("admin-vm", callers=["10.3.0.4"]))
    capfd.readouterr()

    dir_source.load()
    assert set(serving(control).live()) == {"a", "bee", "admin-vm"}  # VM id: the "id" key, else the stem
    assert control.document("a")["source"] == DATA_DIR_SOURCE_PREFIX + "a.json"
    assert control.document("bee")["source"] == DATA_DIR_SOURCE_PREFIX + "b-file.json"
    refused = events(capfd.readouterr().err, "update_refused")
    assert {record["source"] for record in refused} == {"data-dir:broken.json", "data-dir:clash.json"}
    [clash] = [record for record in refused if record["source"] == "data-dir:clash.json"]
    assert "'a'" in clash["error"]
    assert "'clash'" in clash["error"]

    # Unchanged files are not re-published.
    dir_source.load()
    assert serving(control).stores["a"].generation == 1
    # A changed file is; a deleted file's VM goes; VMs from other sources stay.
    write_vm_file(data_dir, "a.json", vm_document("a", callers=["10.1.0.4"], location="eastus"))
    (data_dir / "b-file.json").unlink()
    dir_source.load()
    assert set(serving(control).live()) == {"a", "admin-vm"}
    assert serving(control).stores["a"].generation == 2
    assert location(serving(control), "a") == "eastus"
    assert served_vm_id(serving(control), "10.2.0.4") is None


def test_sync_data_files_applies_refuses_and_forgets(
    dir_source: DataDirSource, control: Control, data_dir: Path
) -> None:
    path = write_vm_file(data_dir, "a.json", vm_document("a", callers=["10.1.0.4"]))
    dir_source.sync_files([path])
    dir_source.sync_files([path])  # unchanged: no new generation
    assert serving(control).stores["a"].generation == 1
    write_vm_file(data_dir, "a.json", orjson.dumps(vm_document("a", callers=["10.1.0.4"]))[:200])  # half-written
    dir_source.sync_files([path])
    assert served_vm_id(serving(control), "10.1.0.4") == vm_uuid("a")  # the good data keeps serving
    assert serving(control).stores["a"].generation == 1
    path.unlink()
    dir_source.sync_files([path])  # a deleted file takes its VM with it
    assert serving(control).live() == {}


def test_changing_the_id_in_a_data_file_replaces_its_vm(
    dir_source: DataDirSource, control: Control, data_dir: Path
) -> None:
    """The VM id is the file's "id" key: a file whose id changes from x to y now describes y, and x is gone."""
    path = write_vm_file(data_dir, "f.json", vm_document("x", callers=["10.9.0.1"], with_id=True))
    dir_source.sync_files([path])
    assert set(serving(control).live()) == {"x"}
    write_vm_file(data_dir, "f.json", {**vm_document("x", callers=["10.9.0.1"]), "id": "y"})
    dir_source.sync_files([path])
    assert set(serving(control).live()) == {"y"}
    assert serving(control).owner_of("10.9.0.1") == "y"


def test_sync_data_dir_keeps_serving_a_vm_whose_file_is_half_written(
    dir_source: DataDirSource, control: Control, data_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """SIGHUP (or a restart with --state-dir) while a file is being rewritten must not drop its VM."""
    write_vm_file(data_dir, "a.json", vm_document("a", callers=["10.1.0.4"]))
    write_vm_file(data_dir, "b.json", vm_document("b", callers=["10.2.0.4"]))
    dir_source.load()
    write_vm_file(data_dir, "a.json", orjson.dumps(vm_document("a", callers=["10.1.0.4"], location="eastus"))[:300])
    capfd.readouterr()
    dir_source.load()
    assert events(capfd.readouterr().err, "update_refused")
    assert served_vm_id(serving(control), "10.1.0.4") == vm_uuid("a"), (
        "a half-written file under --data-dir made sync_data_dir delete its VM: the VM's callers now get 404 "
        "instead of the last good data"
    )
    assert location(serving(control), "a") == "westeurope"


def test_sync_data_dir_moves_an_address_between_files(
    dir_source: DataDirSource, control: Control, data_dir: Path
) -> None:
    """Both files change at once: a.json takes 10.9.0.1 from b.json. The final directory is consistent."""
    write_vm_file(data_dir, "a.json", vm_document("a", callers=["10.9.0.3"]))
    write_vm_file(data_dir, "b.json", vm_document("b", callers=["10.9.0.1", "10.9.0.2"]))
    dir_source.load()
    write_vm_file(data_dir, "a.json", vm_document("a", callers=["10.9.0.3", "10.9.0.1"]))
    write_vm_file(data_dir, "b.json", vm_document("b", callers=["10.9.0.2"]))
    dir_source.load()
    assert serving(control).summary() == [
        {"id": "a", "generation": 2, "callers": ["10.9.0.1", "10.9.0.3"]},
        {"id": "b", "generation": 2, "callers": ["10.9.0.2"]},
    ], "sync_data_dir refused a.json (b still held the address) and then deleted VM a as if its file were gone"


def test_load_data_file_is_the_default_vm(log: EventLog, control: Control, tmp_path: Path) -> None:
    path = write_vm_file(tmp_path, "vm.json", vm_document("one", private_ips=["10.1.0.4"]))
    DataFileSource(path, control, log).load()
    assert served_vm_id(serving(control), "10.1.0.4") == vm_uuid("one")
    DataFileSource(path, control, log).load()  # unchanged: not re-published
    assert serving(control).stores["default"].generation == 1
    DataFileSource(None, control, log).load()  # the embedded sample
    assert serving(control).stores["default"].generation == 2
    assert control.document("default")["source"] == "<embedded sample_vm.json>"


def test_a_failing_watch_callback_does_not_end_the_watch(tmp_path: Path) -> None:
    seen: list[set[str]] = []

    def on_change(names: set[str]) -> None:
        seen.append(names)
        if len(seen) == 1:
            raise RuntimeError("a bug in one callback")

    async def scenario() -> None:
        task = await start_watch(tmp_path, on_change=on_change, on_idle=lambda: None, log=EventLog())
        try:
            (tmp_path / "first.json").write_bytes(b"{}")
            deadline = asyncio.get_running_loop().time() + 5
            while not seen and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            (tmp_path / "second.json").write_bytes(b"{}")
            while not any("second.json" in names for names in seen) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    assert any("second.json" in names for names in seen), seen  # still watching after the exception


@pytest.fixture
def dir_source(control: Control, data_dir: Path, log: EventLog) -> DataDirSource:
    return DataDirSource(data_dir, control, log)


# ---- the control's own model ----


def test_control_answers_from_its_own_model_with_no_serving_registry(bus: Bus, log: EventLog) -> None:
    control = Control(bus, log)  # nothing serves here: no registry, no follower
    assert not hasattr(control, "registry") and control.in_process is None
    assert control.put("a", vm_document("a", callers=["10.1.0.4"])) == 1
    assert control.patch("a", {"instance": {"compute": {"location": "eastus"}}}) == 2
    assert control.put("b", vm_document("b", callers=["10.2.0.4"])) == 1
    assert control.document("a")["generation"] == 2
    assert control.document("a")["vm"]["instance"]["compute"]["location"] == "eastus"
    assert control.summary() == [
        {"id": "a", "generation": 2, "callers": ["10.1.0.4"]},
        {"id": "b", "generation": 1, "callers": ["10.2.0.4"]},
    ]
    with pytest.raises(UpdateError) as caught:  # the conflict check reads the control's own address map
        control.put("c", vm_document("c", callers=["10.2.0.4"]))
    assert caught.value.status == 409 and "'b'" in caught.value.message
    assert control.delete("b") == 2
    assert (control.generation("b"), control.source_of("b")) == (2, None)  # the removal keeps its generation
    assert control.put("c", vm_document("c", callers=["10.2.0.4"])) == 1  # the address is free again

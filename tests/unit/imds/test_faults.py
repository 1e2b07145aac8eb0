"""Fault injection without sockets: validation, records, shared counts, the table, the protocol's use of it.

End-to-end behaviour against real server processes is in tests/e2e/test_faults_e2e.py.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastimds.bus.files import Bus
from fastimds.bus.follower import Follower
from fastimds.bus.layout import FAULTS_FILE
from fastimds.control.admin_api import AdminApi
from fastimds.control.faults import FaultList
from fastimds.control.plane import ControlPlane
from fastimds.control.writer import Control, UpdateError
from fastimds.http.connection import HttpProtocol
from fastimds.imds import faults
from fastimds.imds.faults import MAX_FAULTS, FaultBudgets, FaultTable, fault_problems, live, make_fault
from fastimds.imds.registry import VmRegistry
from fastimds.imds.render import Reply
from fastimds.imds.store import SnapshotStore
from fastimds.ops.event_log import EventLog
from fastimds.ops.telemetry import FAULT_KINDS, LAYOUT
from tests.support.fakes import (
    FakeTransport,
    Response,
    admin_api,
    make_connection,
    new_plane,
    remembered,
    request,
    sample_vm,
    serving,
    split_responses,
)
from tests.support.server_process import vm_document

NOW = 1_800_000_000.0
LEAF = request("/metadata/instance/compute/vmId?api-version=2021-02-01&format=text")
VERSIONS = request("/metadata/versions")
TOKEN = request("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net")
LONG_POLL = request("/metadata/instance?api-version=2021-02-01&wait_for_change=true")
VM_ID_TEXT = sample_vm().instance["compute"]["vmId"].encode()


# The counts of the faults `records` makes (a server makes one FaultBudgets at start and passes it in).
BUDGETS = FaultBudgets(MAX_FAULTS)


def records(
    *specs: dict[str, Any], vms: list[str] | None = None, now: float = NOW, budgets: FaultBudgets = BUDGETS
) -> list[dict[str, Any]]:
    """Validated records of `specs`, in slots 0, 1, ... (counts set in `budgets`)."""
    made = []
    for slot, spec in enumerate(specs):
        assert fault_problems(spec) == [], spec
        made.append(make_fault(spec, vms, now, slot, budgets))
    return made


def table(*specs: dict[str, Any], vms: list[str] | None = None, now: float = NOW) -> FaultTable:
    loaded = FaultTable(BUDGETS)
    loaded.load(records(*specs, vms=vms, now=now), now)
    return loaded


def real_table(*specs: dict[str, Any], vms: list[str] | None = None) -> FaultTable:
    """A table as of the real clock: the protocol matches with time.time()."""
    return table(*specs, vms=vms, now=time.time())


def load_real(state: Any, *specs: dict[str, Any], vms: list[str] | None = None) -> None:
    """Load `specs` into the worker's own table, as the real clock has them (as Control and Follower do)."""
    now = time.time()
    state.faults.load(records(*specs, vms=vms, now=now, budgets=state.faults.budgets), now)


# ---- validation ----

GOOD = [
    {"status": 410},
    {"status": 429},
    {"status": 500, "path": "/metadata/instance"},
    {"status": 503, "retryAfter": 0},
    {"status": 429, "retryAfter": 3600},
    {"latencyMs": 1},
    {"latencyMs": faults.MAX_LATENCY_MS},
    {"reset": True, "path": "/", "durationSeconds": 0.5, "count": 1},
    {"status": 503, "durationSeconds": faults.MAX_DURATION_S, "count": 2**31},
]


@pytest.mark.parametrize("value", GOOD)
def test_good_faults_have_no_problems(value: dict[str, Any]) -> None:
    assert fault_problems(value) == []


BAD: list[tuple[Any, str]] = [
    ([], "$: expected an object"),
    ("status", "$: expected an object"),
    (None, "$: expected an object"),
    ({"status": 503, "bogus": 1}, "$.bogus: unknown key"),
    ({"status": 503, "vms": ["a"]}, "$.vms: unknown key"),  # the admin API takes "vms" off before
    ({}, "$: give exactly one of status, latencyMs, reset"),
    ({"path": "/metadata"}, "$: give exactly one of status, latencyMs, reset"),
    ({"status": 503, "reset": True}, "$: give exactly one of status, latencyMs, reset"),
    ({"status": 503, "latencyMs": 5}, "$: give exactly one of status, latencyMs, reset"),
    ({"status": 404}, "$.status: one of 410, 429, 500, 503"),
    ({"status": 200}, "$.status: one of"),
    ({"status": "503"}, "$.status: one of"),
    ({"status": None}, "$.status: one of"),
    ({"status": True}, "$.status: one of"),
    ({"status": 500.0}, "$.status: one of"),  # equal to 500, but no status code: kind "500.0" has no counter
    ({"latencyMs": 0}, "$.latencyMs: a whole number from 1 to 600000"),
    ({"latencyMs": -5}, "$.latencyMs"),
    ({"latencyMs": faults.MAX_LATENCY_MS + 1}, "$.latencyMs"),
    ({"latencyMs": 1.5}, "$.latencyMs"),
    ({"latencyMs": True}, "$.latencyMs"),
    ({"latencyMs": "100"}, "$.latencyMs"),
    ({"reset": False}, "$.reset: true"),
    ({"reset": 1}, "$.reset: true"),
    ({"reset": "true"}, "$.reset: true"),
    ({"status": 503, "path": "metadata"}, "$.path: an ASCII target prefix starting with '/'"),
    ({"status": 503, "path": "/metadata/ïnstance"}, "$.path: an ASCII target prefix starting with '/'"),
    ({"status": 503, "path": ""}, "$.path"),
    ({"status": 503, "path": 5}, "$.path"),
    ({"status": 503, "path": None}, "$.path"),
    ({"status": 503, "durationSeconds": 0}, "$.durationSeconds: a number of seconds above 0"),
    ({"status": 503, "durationSeconds": -1}, "$.durationSeconds"),
    ({"status": 503, "durationSeconds": faults.MAX_DURATION_S + 1}, "$.durationSeconds"),
    ({"status": 503, "durationSeconds": math.inf}, "$.durationSeconds"),
    ({"status": 503, "durationSeconds": math.nan}, "$.durationSeconds"),
    ({"status": 503, "durationSeconds": True}, "$.durationSeconds"),
    ({"status": 503, "durationSeconds": "5"}, "$.durationSeconds"),
    ({"status": 503, "count": 0}, "$.count: a whole number, 1 or more"),
    ({"status": 503, "count": -1}, "$.count"),
    ({"status": 503, "count": 1.0}, "$.count"),
    ({"status": 503, "count": True}, "$.count"),
    ({"status": 503, "count": "3"}, "$.count"),
    ({"status": 503, "count": None}, "$.count"),
    ({"status": 503, "count": 2**31 + 1}, "$.count"),
    ({"status": 429, "retryAfter": -1}, "$.retryAfter: whole seconds from 0 to 3600"),
    ({"status": 429, "retryAfter": 3601}, "$.retryAfter: whole seconds"),
    ({"status": 429, "retryAfter": 1.5}, "$.retryAfter: whole seconds"),
    ({"status": 429, "retryAfter": True}, "$.retryAfter: whole seconds"),
    ({"status": 500, "retryAfter": 1}, "$.retryAfter: only with status 429 or 503"),
    ({"status": 410, "retryAfter": 1}, "$.retryAfter: only with status 429 or 503"),
    ({"latencyMs": 10, "retryAfter": 1}, "$.retryAfter: only with status 429 or 503"),
    ({"reset": True, "retryAfter": 1}, "$.retryAfter: only with status 429 or 503"),
]


@pytest.mark.parametrize(("value", "problem"), BAD)
def test_each_bad_fault_is_named(value: Any, problem: str) -> None:
    problems = fault_problems(value)
    assert any(found.startswith(problem) for found in problems), problems


def test_every_problem_is_named_at_once() -> None:
    problems = fault_problems({"status": 404, "path": "x", "count": 0, "durationSeconds": 0, "nope": 1})
    assert [problem.split(":")[0] for problem in problems] == [
        "$.nope",
        "$.status",
        "$.path",
        "$.durationSeconds",
        "$.count",
    ]


# ---- records ----


def test_make_fault_fills_in_the_defaults() -> None:
    record = make_fault({"status": 429}, None, NOW, 3, BUDGETS)
    assert record == {
        "id": record["id"],
        "slot": 3,
        "vms": None,
        "path": "/metadata",
        "status": 429,
        "latencyMs": None,
        "reset": False,
        "retryAfter": 1,  # 429 always says when to retry
        "until": None,
        "count": None,
        "created": NOW,
    }
    assert len(record["id"]) == 12 and int(record["id"], 16) >= 0
    assert make_fault({"status": 429}, None, NOW, 3, BUDGETS)["id"] != record["id"]
    assert make_fault({"status": 503}, None, NOW, 0, BUDGETS)["retryAfter"] is None
    assert make_fault({"status": 503, "retryAfter": 9}, None, NOW, 0, BUDGETS)["retryAfter"] == 9


def test_make_fault_keeps_what_was_given_and_sets_the_count() -> None:
    spec = {"latencyMs": 250, "path": "/metadata/identity", "durationSeconds": 2.5, "count": 7}
    record = make_fault(spec, ["a", "b"], NOW, 5, BUDGETS)
    assert (record["vms"], record["path"], record["latencyMs"]) == (["a", "b"], "/metadata/identity", 250)
    assert (record["until"], record["count"], record["status"], record["reset"]) == (NOW + 2.5, 7, None, False)
    assert BUDGETS.left(5) == 7
    assert make_fault({"reset": True}, None, NOW, 6, BUDGETS)["reset"] is True


def test_live_drops_expired_and_spent_records() -> None:
    timed, counted, forever = records(
        {"status": 503, "durationSeconds": 10}, {"status": 500, "count": 1}, {"reset": True}
    )
    assert live([timed, counted, forever], NOW + 9.99, BUDGETS) == [timed, counted, forever]
    assert live([timed, counted, forever], NOW + 10, BUDGETS) == [counted, forever]  # `until` itself is over
    BUDGETS.set(counted["slot"], 0)
    assert live([timed, counted, forever], NOW, BUDGETS) == [timed, forever]


def test_free_slot_goes_round_the_ring_past_held_slots() -> None:
    budgets = FaultBudgets(MAX_FAULTS)
    assert [budgets.free_slot([]) for _ in range(3)] == [0, 1, 2]  # a freed slot is not reused at once
    assert budgets.free_slot([{"slot": 3}, {"slot": 4}]) == 5
    budgets.next_slot = MAX_FAULTS - 1
    assert budgets.free_slot([{"slot": MAX_FAULTS - 1}, {"slot": 0}]) == 1  # wraps
    all_but_7 = [{"slot": slot} for slot in range(MAX_FAULTS) if slot != 7]
    assert budgets.free_slot(all_but_7) == 7


def test_parse_records_gives_back_what_make_fault_makes() -> None:
    made = records({"status": 503, "count": 3, "durationSeconds": 5}, {"latencyMs": 20}, vms=["a"])
    assert faults.parse_records(orjson.loads(orjson.dumps(made))) == made  # as the faults file gives it back
    assert faults.parse_records([]) == []
    assert set(faults._RECORD_FIELDS) == faults.FaultRecord.__required_keys__  # every field is checked


BAD_RECORDS: list[tuple[str, Any, str]] = [
    ("id", "", "faults[0].id: a non-empty string"),
    ("id", 5, "faults[0].id"),
    ("slot", MAX_FAULTS, "faults[0].slot: a whole number from 0 to 999"),
    ("slot", -1, "faults[0].slot"),
    ("slot", True, "faults[0].slot"),
    ("vms", "a", "faults[0].vms: null or an array of strings"),
    ("vms", [1], "faults[0].vms"),
    ("path", None, "faults[0].path: a string"),
    ("status", 404, "faults[0].status: null or a status"),
    ("status", "503", "faults[0].status"),
    ("latencyMs", 0, "faults[0].latencyMs"),
    ("latencyMs", 1.5, "faults[0].latencyMs"),
    ("reset", None, "faults[0].reset: true or false"),
    ("retryAfter", -1, "faults[0].retryAfter"),
    ("until", "soon", "faults[0].until: null or a number"),
    ("count", 0, "faults[0].count"),
    ("created", None, "faults[0].created: a number"),
]


@pytest.mark.parametrize(("key", "value", "problem"), BAD_RECORDS)
def test_parse_records_names_each_bad_field(key: str, value: Any, problem: str) -> None:
    [record] = orjson.loads(orjson.dumps(records({"status": 503})))
    with pytest.raises(ValueError, match=re.escape(problem)):
        faults.parse_records([{**record, key: value}])
    del record[key]
    with pytest.raises(ValueError, match=re.escape(f"faults[0].{key}: missing")):
        faults.parse_records([record])


def test_parse_records_refuses_what_is_no_list_of_objects() -> None:
    with pytest.raises(ValueError, match="must be a list of objects"):
        faults.parse_records({"id": "x"})
    with pytest.raises(ValueError, match=re.escape("faults[1]: expected an object")):
        faults.parse_records([*records({"reset": True}), "x"])


def test_kind_of_names_the_telemetry_label() -> None:
    kinds = [faults.kind_of(make_fault(spec, None, NOW, 0, BUDGETS)) for spec in GOOD]
    assert kinds == ["410", "429", "500", "503", "429", "latency", "latency", "reset", "503"]
    assert set(kinds) == set(FAULT_KINDS)


# ---- shared counts ----


def test_budgets_are_shared_with_a_forked_child() -> None:
    budgets = FaultBudgets(4)
    budgets.set(2, 20_000)
    budgets.set(3, 5)
    pid = os.fork()
    if pid == 0:  # the child takes from slot 2 racing the parent, and reports its share in slot 0
        taken = 0
        while budgets.take(2):
            taken += 1
        budgets.set(0, taken)
        os._exit(0)
    parent_taken = 0
    while budgets.take(2):
        parent_taken += 1
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # Exactly the count between the two, however they interleaved.
    assert parent_taken + budgets.left(0) == 20_000
    assert budgets.left(2) == 0 and not budgets.take(2)
    assert budgets.left(3) == 5  # other slots untouched

    pid = os.fork()
    if pid == 0:
        os._exit(0 if budgets.take(3) and budgets.left(3) == 4 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert budgets.left(3) == 4  # the child's take is seen here


def test_take_never_goes_below_zero() -> None:
    budgets = FaultBudgets(1)
    budgets.set(0, 2)
    assert [budgets.take(0) for _ in range(4)] == [True, True, False, False]
    assert budgets.left(0) == 0


def test_budgets_are_made_by_the_server_and_passed_in_never_at_import() -> None:
    assert not [name for name, value in vars(faults).items() if isinstance(value, FaultBudgets)]
    shared = FaultBudgets(4)
    assert FaultTable(shared).budgets is shared
    first, second = FaultTable(), FaultTable()  # made without the server's: private ones each
    assert first.budgets is not second.budgets and first.budgets.slots == MAX_FAULTS


# ---- the table ----


def test_an_empty_table_is_inactive() -> None:
    empty = FaultTable(BUDGETS)
    assert not empty.active and empty.match("default", b"/metadata/instance", NOW) is None
    empty.load(records({"status": 503, "durationSeconds": 1}), NOW + 5)  # only dead records
    assert not empty.active and empty.faults == []


def test_match_by_vm() -> None:
    mine = table({"status": 500}, vms=["a", "b"])
    assert mine.match("a", b"/metadata/instance", NOW) is not None
    assert mine.match("b", b"/metadata/instance", NOW) is not None
    assert mine.match("c", b"/metadata/instance", NOW) is None
    assert mine.active  # the fault lives on for a and b
    everyone = table({"status": 500})
    assert everyone.match("anything", b"/metadata/instance", NOW) is not None


@pytest.mark.parametrize(
    ("path", "target", "matches"),
    [
        ("/metadata", b"/metadata/instance?api-version=2021-02-01", True),
        ("/metadata", b"/metadata/identity/oauth2/token", True),
        ("/metadata", b"/METADATA/Instance", True),
        ("/metadata", b"/other", False),
        ("/Metadata/Identity", b"/metadata/IDENTITY/oauth2/token?resource=x", True),
        ("/metadata/identity", b"/metadata/instance", False),
        ("/metadata/instance/compute", b"/metadata/instance?api-version=2021-02-01", False),
        ("/metadata/instance?api-version=2021-02-01", b"/metadata/instance?api-version=2021-02-01&x=1", True),
        ("/", b"/anything", True),
    ],
)
def test_match_by_case_insensitive_target_prefix(path: str, target: bytes, matches: bool) -> None:
    loaded = table({"status": 503, "path": path})
    assert (loaded.match("default", target, NOW) is not None) == matches


def test_the_first_matching_fault_wins() -> None:
    loaded = table({"status": 410, "path": "/metadata/identity"}, {"status": 503})
    identity = loaded.match("default", b"/metadata/identity/info", NOW)
    instance = loaded.match("default", b"/metadata/instance", NOW)
    assert identity is not None and identity.kind == "410"
    assert instance is not None and instance.kind == "503"


def test_a_duration_ends_the_fault_and_the_table_goes_inactive() -> None:
    loaded = table({"status": 503, "durationSeconds": 10})
    assert loaded.match("default", b"/metadata/instance", NOW + 9.9) is not None
    assert loaded.active
    assert loaded.match("default", b"/metadata/instance", NOW + 10) is None
    assert not loaded.active  # back to the free path


def test_a_count_ends_the_fault_and_the_table_goes_inactive() -> None:
    loaded = table({"status": 500, "count": 2})
    assert [loaded.match("default", b"/metadata/instance", NOW) is not None for _ in range(3)] == [True, True, False]
    assert BUDGETS.left(0) == 0
    assert not loaded.active


def test_a_non_matching_request_uses_none_of_the_count() -> None:
    loaded = table({"status": 500, "count": 2, "path": "/metadata/identity"})
    assert loaded.match("default", b"/metadata/instance", NOW) is None
    assert BUDGETS.left(0) == 2 and loaded.active


def test_the_table_stays_active_while_any_fault_lives() -> None:
    loaded = table({"status": 500, "count": 1}, {"status": 503, "durationSeconds": 5, "path": "/metadata/identity"})
    first = loaded.match("default", b"/metadata/instance", NOW)
    assert first is not None and first.kind == "500"
    assert loaded.match("default", b"/metadata/instance", NOW) is None  # spent; the other does not match
    assert loaded.active  # the timed one still lives
    assert loaded.match("default", b"/metadata/instance", NOW + 5) is None
    assert not loaded.active


def test_a_count_spent_by_another_process_is_not_taken_again() -> None:
    loaded = table({"reset": True, "count": 3})
    BUDGETS.set(0, 0)  # another worker took the rest
    assert loaded.match("default", b"/metadata/instance", NOW) is None
    assert not loaded.active


def test_load_is_all_or_nothing() -> None:
    loaded = table({"status": 410})
    before = loaded.faults
    broken = records({"status": 503})[0]
    del broken["path"]
    with pytest.raises(KeyError):
        loaded.load([*records({"status": 500}), broken], NOW)
    assert loaded.faults is before and loaded.active


def parsed(reply: Reply | None) -> Response:
    assert reply is not None
    [response] = split_responses(reply.head + b"\r\n" + reply.body)  # the Date block ends a head on the wire
    return response


def test_fault_replies_are_in_azures_words() -> None:
    [too_many, unavailable, gone] = table(
        {"status": 429}, {"status": 503, "retryAfter": 4}, {"status": 410, "path": "/metadata/identity"}
    ).faults
    instance = parsed(too_many.reply)
    assert instance.status == 429 and instance.headers["retry-after"] == "1"
    assert instance.json() == {"error": "Too many requests"}
    identity = parsed(unavailable.identity_reply)
    assert identity.status == 503 and identity.headers["retry-after"] == "4"
    assert identity.json() == {
        "error": "service_unavailable",
        "error_description": "Internal service unavailable. Retry later",
    }
    gone_reply = parsed(gone.reply)
    assert "retry-after" not in gone_reply.headers
    assert gone_reply.json() == {"error": "Retry after some time for a max of 70 seconds"}
    assert parsed(gone.identity_reply).json()["error"] == "service_unavailable"
    [delay, reset] = table({"latencyMs": 250}, {"reset": True}).faults
    assert (delay.reply, delay.identity_reply, delay.latency_s) == (None, None, 0.25)
    assert (reset.reply, reset.identity_reply, reset.latency_s) == (None, None, 0.0)


# ---- the protocol: memo, replies, counters ----


def fault_count(state: Any, kind: str) -> int:
    return int(state.counters[LAYOUT.fault_slot(kind)])


def test_a_remembered_request_is_faulted_once_a_fault_loads_and_served_again_after() -> None:
    protocol, transport, state = make_connection()
    snapshot = state.registry.default.current
    protocol.data_received(LEAF)
    assert len(remembered(snapshot, state.faults)) == 1  # remembered: the next one skips the parser

    load_real(state, {"status": 503, "path": "/metadata/INSTANCE"})  # the load alone: nobody forgets anything
    assert remembered(snapshot, state.faults) == {}
    for _ in range(2):
        protocol.data_received(LEAF)
    protocol.data_received(VERSIONS)  # not under the fault's path: served, and remembered
    assert list(remembered(snapshot, state.faults)) == [VERSIONS[:-4]]  # the faulted reply never is

    load_real(state)  # no faults
    protocol.data_received(LEAF)
    protocol.data_received(LEAF)  # from the memo again
    statuses = [(response.status, response.body) for response in split_responses(transport.output)]
    assert [status for status, _ in statuses] == [200, 503, 503, 200, 200, 200]
    assert statuses[1][1] == b'{"error":"Internal service unavailable. Retry later"}'
    assert statuses[-1][1] == VM_ID_TEXT
    assert LEAF[:-4] in remembered(snapshot, state.faults)
    assert fault_count(state, "503") == 2


def test_a_counted_fault_is_never_remembered_and_its_end_is() -> None:
    protocol, transport, state = make_connection()
    load_real(state, {"status": 500, "count": 2})
    for _ in range(4):
        protocol.data_received(LEAF)
    assert [response.status for response in split_responses(transport.output)] == [500, 500, 200, 200]
    assert not state.faults.active
    [entry] = remembered(state.registry.default.current, state.faults).values()
    assert entry.head.startswith(b"HTTP/1.1 200")
    assert fault_count(state, "500") == 2


def test_a_fault_for_another_vm_leaves_this_one_alone() -> None:
    registry = VmRegistry(default_vm_id="a")
    registry.stores["a"] = SnapshotStore(sample_vm(), vm_id="a")
    registry.stores["b"] = SnapshotStore(sample_vm(), vm_id="b")
    protocol, transport, state = make_connection(registry=registry)
    load_real(state, {"status": 410}, vms=["b"])
    protocol.data_received(LEAF)
    assert [response.status for response in split_responses(transport.output)] == [200]
    load_real(state, {"status": 410}, vms=["a"])
    protocol.data_received(LEAF)
    assert [response.status for response in split_responses(transport.output)] == [200, 410]


def test_identity_requests_get_the_identity_error_shape() -> None:
    protocol, transport, state = make_connection()
    load_real(state, {"status": 429})
    protocol.data_received(TOKEN + LEAF)
    token, instance = split_responses(transport.output)
    assert (token.status, token.headers["retry-after"]) == (429, "1")
    assert token.json() == {"error": "throttled", "error_description": "Too many requests"}
    assert instance.json() == {"error": "Too many requests"}
    assert not transport.ended  # an injected status keeps the connection
    assert fault_count(state, "429") == 2


class SocketTransport(FakeTransport):
    """A FakeTransport with a real (unconnected) socket behind it, to see SO_LINGER."""

    def __init__(self) -> None:
        super().__init__()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else super().get_extra_info(name, default)


def test_a_reset_aborts_with_linger_zero_after_what_came_before() -> None:
    state = make_connection()[2]
    protocol = HttpProtocol(state)
    transport = SocketTransport()
    protocol.connection_made(transport)
    load_real(state, {"reset": True, "path": "/metadata/instance"})
    try:
        protocol.data_received(VERSIONS + LEAF + VERSIONS)
        assert transport.aborted
        assert struct.unpack("ii", transport.sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (1, 0)
    finally:
        transport.sock.close()
    # The reply before the reset went out first; nothing after it was answered.
    [versions] = split_responses(transport.output)
    assert versions.status == 200 and b"apiVersions" in versions.body
    assert fault_count(state, "reset") == 1
    assert remembered(state.registry.default.current, state.faults) == {}


def test_every_kind_is_counted_in_its_own_slot() -> None:
    protocol, _, state = make_connection()
    for kind_spec in ({"status": 410}, {"status": 429}, {"status": 500}, {"status": 503}):
        load_real(state, {**kind_spec, "count": 1})
        protocol.data_received(LEAF)
    assert {kind: fault_count(state, kind) for kind in FAULT_KINDS} == {
        "410": 1,
        "429": 1,
        "500": 1,
        "503": 1,
        "latency": 0,
        "reset": 0,
    }


# ---- the protocol: injected latency ----


class FakeLoop:
    """Stands in for the running loop: records call_later, fires on demand."""

    def __init__(self) -> None:
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((delay, callback))

    def fire_next(self) -> float:
        delay, callback = self.timers.pop(0)
        callback()
        return delay


@pytest.fixture
def loop(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLoop]:
    fake = FakeLoop()
    monkeypatch.setattr(asyncio, "get_running_loop", lambda: fake)
    yield fake


def statuses(transport: FakeTransport) -> list[tuple[int, bool]]:
    """Each reply's status, and whether it is the versions list (else something else)."""
    return [(response.status, b"apiVersions" in response.body) for response in split_responses(transport.output)]


def test_latency_holds_the_reply_and_those_behind_it_in_order(loop: FakeLoop) -> None:
    protocol, transport, state = make_connection()
    load_real(state, {"latencyMs": 250, "path": "/metadata/instance"})
    protocol.data_received(LEAF + VERSIONS)
    assert transport.output == b"" and not transport.reading
    assert [delay for delay, _ in loop.timers] == [0.25]
    assert loop.fire_next() == 0.25
    assert statuses(transport) == [(200, False), (200, True)]  # the real reply, then the one behind it
    assert split_responses(transport.output)[0].body == VM_ID_TEXT
    assert transport.reading and not transport.ended
    assert fault_count(state, "latency") == 1
    assert remembered(state.registry.default.current, state.faults) == {}  # a delayed read is never remembered


def test_each_delayed_read_waits_its_own_latency(loop: FakeLoop) -> None:
    protocol, transport, state = make_connection()
    load_real(state, {"latencyMs": 100})
    protocol.data_received(VERSIONS + VERSIONS)  # both faulted: they wait together, once
    assert len(loop.timers) == 1
    loop.fire_next()
    assert len(statuses(transport)) == 2
    protocol.data_received(VERSIONS)
    assert len(loop.timers) == 1  # no timer of the earlier read is left to cut this one short
    assert len(statuses(transport)) == 2
    loop.fire_next()
    assert len(statuses(transport)) == 3
    assert fault_count(state, "latency") == 3


def test_latency_behind_a_held_long_poll_keeps_the_long_poll_first(loop: FakeLoop) -> None:
    protocol, transport, state = make_connection()
    load_real(state, {"latencyMs": 100, "path": "/metadata/versions"})
    protocol.data_received(LONG_POLL + VERSIONS)
    while loop.timers:
        loop.fire_next()
    assert transport.output == b""  # the long-poll is still held: nothing may overtake it
    state.tick(1000.0, 1_700_000_100.0)  # its timeout passes: answered with the current value
    assert statuses(transport) == [(200, False), (200, True)]
    assert b'"compute"' in split_responses(transport.output)[0].body
    assert protocol not in state.registry.default.watchers


def test_a_delayed_reply_outlives_the_shutdown_linger(loop: FakeLoop) -> None:
    """SIGTERM: the linger's end closes idle half-closed connections, never one whose reply latency holds."""
    protocol, transport, state = make_connection()
    load_real(state, {"latencyMs": 2000})
    state.draining = True
    protocol.data_received(VERSIONS)  # answered while draining: Connection: close, held by the latency
    protocol.shutdown()
    protocol.finish_shutdown()
    assert not transport.ended and transport.output == b""
    loop.fire_next()
    [response] = split_responses(transport.output)
    assert (response.status, response.headers["connection"]) == (200, "close")
    assert transport.ended


@pytest.mark.parametrize("held", [LONG_POLL, VERSIONS], ids=["long-poll", "delayed"])
def test_a_reset_behind_a_held_reply_lets_nothing_overtake_it(loop: FakeLoop, held: bytes) -> None:
    protocol, transport, state = make_connection()
    load_real(
        state, {"latencyMs": 5000, "path": "/metadata/versions"}, {"reset": True, "path": "/metadata/instance/compute"}
    )
    protocol.data_received(held + VERSIONS + LEAF)  # held (long-poll or delayed), answered, reset
    assert transport.aborted
    assert transport.output == b""  # neither the second reply ahead of the first, nor the delayed one early


def test_a_connection_lost_during_a_delay_writes_nothing(loop: FakeLoop) -> None:
    protocol, transport, state = make_connection()
    load_real(state, {"latencyMs": 100})
    protocol.data_received(VERSIONS)
    protocol.connection_lost(None)
    transport.closed = True
    loop.fire_next()  # FakeTransport.write asserts it is not called after close
    assert transport.output == b""


def test_a_delayed_connection_close_closes_after_its_reply(loop: FakeLoop) -> None:
    protocol, transport, state = make_connection()
    load_real(state, {"latencyMs": 100})
    protocol.data_received(request("/metadata/versions", headers=(("Metadata", "true"), ("Connection", "close"))))
    assert not transport.ended
    state.tick(500.0, 1_700_000_500.0)  # deadlines do not cut a delay short
    assert not transport.ended and transport.output == b""
    loop.fire_next()
    assert statuses(transport) == [(200, True)] and transport.ended


# ---- the control plane and the followers ----


@pytest.fixture
def plane(tmp_path: Path) -> ControlPlane:
    made = new_plane(tmp_path / "bus")
    made.control.put("a", vm_document("a", callers=["10.1.0.4"]))
    made.control.put("b", vm_document("b", callers=["10.2.0.4"]))
    return made


@pytest.fixture
def control(plane: ControlPlane) -> Control:
    return plane.control


@pytest.fixture
def fault_list(plane: ControlPlane) -> FaultList:
    return plane.faults


def remembered_by(registry: VmRegistry, vm_id: str, faults: FaultTable) -> dict[bytes, Any]:
    snapshot = registry.stores[vm_id].current
    assert snapshot is not None
    return remembered(snapshot, faults)


def warm(registry: VmRegistry, caller: str, faults: FaultTable) -> None:
    protocol, _, _ = make_connection(registry=registry, peer=caller, faults=faults)
    protocol.data_received(LEAF)


def test_control_writes_loads_and_forgets(fault_list: FaultList, control: Control) -> None:
    served = control.in_process
    assert served is not None
    warm(serving(control), "10.1.0.4", served.fault_table)
    assert remembered_by(serving(control), "a", served.fault_table)
    record = fault_list.add({"status": 503, "count": 3}, ["a"])
    assert remembered_by(serving(control), "a", served.fault_table) == {}
    assert control.bus.read_faults() == [record] == fault_list.live()
    assert served.fault_table.active and fault_list.budgets.left(record["slot"]) == 3
    other = fault_list.add({"reset": True, "path": "/metadata/identity"}, None)
    assert other["slot"] != record["slot"]
    assert fault_list.live() == [record, other]

    assert fault_list.remove(vm_id="b") == []  # b has no fault of its own (the other is everyone's)
    assert fault_list.remove(vm_id="a") == [record["id"]]
    assert fault_list.remove(fault_id=other["id"]) == [other["id"]]
    assert fault_list.live() == [] == control.bus.read_faults()
    assert not control.in_process.fault_table.active


def test_control_refuses_bad_faults_and_changes_nothing(fault_list: FaultList, control: Control) -> None:
    kept = fault_list.add({"status": 410}, None)
    for given, vms, status in [
        ({"status": 404}, None, 400),
        ({"latencyMs": 5, "reset": True}, None, 400),
        ([], None, 400),
        ({"status": 503}, ["a", "nope"], 404),
    ]:
        with pytest.raises(UpdateError) as caught:
            fault_list.add(given, vms)
        assert caught.value.status == status
    with pytest.raises(UpdateError) as caught:
        fault_list.remove(fault_id="0123456789ab")
    assert caught.value.status == 404
    assert fault_list.live() == [kept] == control.bus.read_faults()


def test_a_spent_fault_stays_spent_in_a_worker_that_has_not_reloaded(fault_list: FaultList, control: Control) -> None:
    worker = Follower(control.bus, VmRegistry(), control.log, fault_list.budgets)  # the counts every process shares
    spent = fault_list.add({"status": 500, "count": 1}, None)
    worker.load_faults()
    assert worker.fault_table.match("a", b"/metadata/instance", NOW) is not None
    assert fault_list.live() == []
    again = fault_list.add({"status": 503, "count": 4, "path": "/metadata/identity"}, None)
    # Before the worker sees the new list, its copy of the spent fault must not live again on the new count.
    assert worker.fault_table.match("a", b"/metadata/instance", NOW) is None
    assert again["slot"] != spent["slot"] and fault_list.budgets.left(again["slot"]) == 4
    worker.load_faults()
    found = worker.fault_table.match("a", b"/metadata/identity/info", NOW)
    assert found is not None and found.kind == "503" and fault_list.budgets.left(again["slot"]) == 3


def test_a_follower_loads_the_list_and_forgets_its_memo(fault_list: FaultList, control: Control) -> None:
    registry = VmRegistry()
    follower = Follower(control.bus, registry, control.log, fault_list.budgets)
    follower.rescan()
    assert set(registry.live()) == {"a", "b"} and not follower.fault_table.active
    warm(registry, "10.1.0.4", follower.fault_table)
    assert remembered_by(registry, "a", follower.fault_table)
    record = fault_list.add({"status": 429}, ["a"])
    follower.on_change({FAULTS_FILE})
    assert remembered_by(registry, "a", follower.fault_table) == {}
    assert [fault.id for fault in follower.fault_table.faults] == [record["id"]]
    fault_list.remove()
    follower.rescan()  # the idle rescan sees the file changed too
    assert not follower.fault_table.active


def test_a_restarted_control_keeps_its_faults(fault_list: FaultList, control: Control) -> None:
    record = fault_list.add({"status": 503, "durationSeconds": 600}, None)
    again = ControlPlane.over(control.bus, control.log, budgets=fault_list.budgets)  # a replaced control process
    assert again.faults.live() == [record]
    follower = Follower(control.bus, VmRegistry(), control.log, fault_list.budgets)
    follower.rescan()
    assert follower.fault_table.active


def test_the_control_plane_and_followers_count_in_the_budgets_they_are_given(tmp_path: Path) -> None:
    shared = FaultBudgets(MAX_FAULTS)
    log = EventLog()
    plane = ControlPlane.over(Bus(tmp_path / "bus", durable=False, log=log), log, budgets=shared)
    follower = Follower(plane.control.bus, VmRegistry(), log, shared)
    assert plane.faults.budgets is shared and follower.fault_table.budgets is shared
    record = plane.faults.add({"status": 503, "count": 2}, None)
    assert shared.left(record["slot"]) == 2
    follower.load_faults()
    assert follower.fault_table.match("a", b"/metadata/instance", NOW) is not None
    assert shared.left(record["slot"]) == 1  # the worker's take is the control plane's count
    assert Follower(plane.control.bus, VmRegistry(), log).fault_table.budgets is not shared


def test_the_faults_file_keeps_its_shape(fault_list: FaultList, control: Control) -> None:
    record = fault_list.add({"status": 503, "count": 3, "durationSeconds": 5}, ["a"])
    raw = (control.bus.directory / FAULTS_FILE).read_bytes()
    until, created = orjson.dumps(record["until"]).decode(), orjson.dumps(record["created"]).decode()
    assert (
        raw
        == (
            f'{{"faults":[{{"id":"{record["id"]}","slot":{record["slot"]},"vms":["a"],"path":"/metadata",'
            f'"status":503,"latencyMs":null,"reset":false,"retryAfter":null,"until":{until},"count":3,'
            f'"created":{created}}}]}}'
        ).encode()
    )


def test_a_restarted_server_rearms_counted_faults_with_their_whole_count(
    fault_list: FaultList, control: Control
) -> None:
    record = fault_list.add({"status": 503, "count": 3}, None)
    # A restart: the shared counts start empty.
    again = ControlPlane.over(control.bus, control.log, budgets=FaultBudgets(MAX_FAULTS))
    assert again.faults.budgets.left(record["slot"]) == 0
    assert again.faults.live() == []  # a replaced control process would see it spent
    again.faults.rearm()  # what serve() does once per start
    assert again.faults.live() == [record]
    follower = Follower(control.bus, VmRegistry(), control.log, again.faults.budgets)
    follower.rescan()
    assert follower.fault_table.active
    assert again.faults.budgets.left(record["slot"]) == 3


def test_an_invalid_faults_file_is_served_without_faults(control: Control) -> None:
    control.bus.write_faults([{"id": "x"}])  # a record missing its fields
    assert ControlPlane.over(control.bus, control.log).faults.records == []
    follower = Follower(control.bus, VmRegistry(), control.log)
    follower.load_faults()
    assert not follower.fault_table.active


# ---- the admin routes, without sockets ----


def admin(api: AdminApi, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    import orjson

    raw = b"" if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
    [response] = split_responses(api.handle(method, path, None, raw, False))
    return response.status, response.json()


def test_admin_fault_routes(plane: ControlPlane) -> None:
    api = admin_api(plane, "token")
    status, everyone = admin(api, "POST", "/faults", {"status": 503, "retryAfter": 2})
    assert status == 201 and everyone["vms"] is None and everyone["retryAfter"] == 2
    status, some = admin(api, "POST", "/faults", {"latencyMs": 5, "vms": ["b", "a", "b"]})
    assert status == 201 and some["vms"] == ["a", "b"]
    status, own = admin(api, "POST", "/vms/a/faults", {"reset": True})
    assert status == 201 and own["vms"] == ["a"]
    assert admin(api, "GET", "/faults") == (200, {"faults": [everyone, some, own]})
    assert admin(api, "DELETE", "/vms/a/faults") == (200, {"removed": [own["id"]]})
    assert admin(api, "DELETE", f"/faults/{some['id']}") == (200, {"removed": [some["id"]]})
    assert admin(api, "DELETE", "/faults") == (200, {"removed": [everyone["id"]]})
    assert admin(api, "GET", "/faults") == (200, {"faults": []})


@pytest.mark.parametrize(
    "case",
    [
        ("POST", "/faults", {"status": 418}, 400, "$.status"),
        ("POST", "/faults", {"status": 503, "vms": []}, 400, "'vms'"),
        ("POST", "/faults", {"status": 503, "vms": "a"}, 400, "'vms'"),
        ("POST", "/faults", {"status": 503, "vms": [1]}, 400, "'vms'"),
        ("POST", "/faults", {"status": 503, "vms": ["zz"]}, 404, "zz"),
        ("POST", "/faults", b"{not json", 400, ""),
        ("POST", "/faults", b"[1]", 400, "expected an object"),
        ("POST", "/vms/zz/faults", {"status": 503}, 404, "zz"),
        ("POST", "/vms/a/faults", {"status": 503, "vms": ["b"]}, 400, "$.vms"),
        ("DELETE", "/faults/0123456789ab", None, 404, "0123456789ab"),
        ("PUT", "/faults", {"status": 503}, 405, "PUT"),
        ("GET", "/faults/0123456789ab", None, 405, "GET"),
        ("GET", "/vms/a/faults", None, 405, "GET"),
    ],
)
def test_admin_refusals_change_nothing(plane: ControlPlane, case: tuple[str, str, Any, int, str]) -> None:
    method, path, body, status, words = case
    api = admin_api(plane, "token")
    _, kept = admin(api, "POST", "/faults", {"status": 410})
    found, answer = admin(api, method, path, body)
    assert found == status and words in str(answer)
    assert admin(api, "GET", "/faults") == (200, {"faults": [kept]})


def test_a_lock_held_for_ever_counts_as_spent_instead_of_freezing_the_worker() -> None:
    # A worker killed with -9 while holding the shared lock must not freeze every other loop.
    budgets = FaultBudgets(4)
    budgets.set(1, 5)
    assert budgets.lock.acquire()  # as a dead holder would leave it
    assert budgets.take(1) is False  # gives up after LOCK_WAIT_S
    budgets.set(2, 3)  # the control plane's writes still land
    assert budgets.left(2) == 3
    budgets.lock.release()
    assert budgets.take(1) and budgets.left(1) == 4

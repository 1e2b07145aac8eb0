"""Scheduled events without sockets: fastimds.imds.events, the data file's list, routing, approvals and Control.

The lifecycle (spec §8): Scheduled -> Started at NotBefore or on approval
(NotBefore becomes "") -> removed StartedForSeconds later; every change bumps
DocumentIncarnation exactly once and is a new generation of the VM. Time is
explicit here: every lifecycle step is given its `now`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from dataclasses import replace
from email.utils import formatdate
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastimds.bus.approvals import BusApprovals, take_approvals
from fastimds.bus.files import Bus, BusEntry
from fastimds.bus.follower import apply_entries, apply_entry
from fastimds.control import event_clock as event_clock_module
from fastimds.control.admin_api import AdminApi
from fastimds.control.plane import ControlPlane
from fastimds.control.writer import Control, UpdateError
from fastimds.imds import events
from fastimds.imds.datafile import DataError, describe_vm
from fastimds.imds.effects import Approval
from fastimds.imds.registry import VmRegistry
from fastimds.imds.render import BAD_API_VERSION_MESSAGE
from fastimds.imds.routing import resolve
from fastimds.imds.snapshot import Snapshot, build_snapshot
from fastimds.imds.versions import SCHEDULED_EVENTS_VERSIONS
from fastimds.ops.event_log import EventLog
from tests.support.fakes import admin_api, sample_vm, serving, split_responses
from tests.support.server_process import vm_document

NOW = 2_000_000_000.0  # Wed, 18 May 2033 03:33:20 GMT: later than any real clock these tests run under
NEWEST = "2020-07-01"
TARGET = f"/metadata/scheduledevents?api-version={NEWEST}"
EMPTY_DOCUMENT = {"DocumentIncarnation": 1, "Events": []}
# Scheduled events' own three newest: a bad version's 400 lists versions this endpoint accepts.
BAD_VERSION = {"error": BAD_API_VERSION_MESSAGE, "newest-versions": ["2020-07-01", "2019-08-01", "2019-04-01"]}


def date(unix: float) -> str:
    return formatdate(unix, usegmt=True)


def reboot(**fields: Any) -> dict[str, Any]:
    """A full Reboot event starting at NOW + 900 s (started for 60 s once Started), made as of NOW."""
    given = {"EventType": "Reboot", "EventId": "E1", "StartedForSeconds": 60, **fields}
    return events.make_event(given, NOW, ["vm-name"])


# ---- validating one event as a user gives it ----


def test_a_minimal_and_a_full_event_are_valid() -> None:
    assert events.event_problems({"EventType": "Freeze"}, "$") == []
    full = {
        "EventId": "C7061BAC-AFDC-4513-B24B-AA5F13A16123",
        "EventStatus": "Scheduled",
        "EventType": "Freeze",
        "ResourceType": "VirtualMachine",
        "Resources": ["WestNO_0", "WestNO_1"],
        "NotBefore": "Mon, 13 Apr 2026 22:26:58 GMT",
        "Description": "Virtual machine is being paused because of a memory-preserving Live Migration operation.",
        "EventSource": "Platform",
        "DurationInSeconds": 5,
        "StartedForSeconds": 7.5,
    }
    assert events.event_problems(full, "$") == []
    assert events.event_problems({"EventType": "Preempt", "NotBeforeSeconds": 0, "DurationInSeconds": -1}, "$") == []


# (event, the start of the one problem it must have)
BAD_EVENTS: dict[str, tuple[Any, str]] = {
    "not_an_object": (["Reboot"], "$p: expected an object"),
    "no_type": ({}, "$p.EventType: required, one of Freeze, Reboot, Redeploy, Preempt, Terminate"),
    "preview_type": ({"EventType": "Pause"}, "$p.EventType: required"),
    "null_type": ({"EventType": None}, "$p.EventType: required"),
    "unknown_key": ({"EventType": "Reboot", "eventId": "x"}, "$p.eventId: unknown key"),
    "empty_id": ({"EventType": "Reboot", "EventId": ""}, "$p.EventId: a non-empty printable string"),
    "number_id": ({"EventType": "Reboot", "EventId": 7}, "$p.EventId: "),
    "long_id": ({"EventType": "Reboot", "EventId": "a" * 65}, "$p.EventId: "),
    "control_char_id": ({"EventType": "Reboot", "EventId": "a\nb"}, "$p.EventId: "),
    "null_id": ({"EventType": "Reboot", "EventId": None}, "$p.EventId: "),
    "status": ({"EventType": "Reboot", "EventStatus": "Completed"}, "$p.EventStatus: one of Scheduled, Started"),
    "source": ({"EventType": "Reboot", "EventSource": "Azure"}, "$p.EventSource: one of Platform, User"),
    "resource_type": ({"EventType": "Reboot", "ResourceType": "Disk"}, "$p.ResourceType: one of VirtualMachine"),
    "no_resources": ({"EventType": "Reboot", "Resources": []}, "$p.Resources: a non-empty array"),
    "resources_text": ({"EventType": "Reboot", "Resources": "vm0"}, "$p.Resources: "),
    "empty_resource": ({"EventType": "Reboot", "Resources": ["vm0", ""]}, "$p.Resources: "),
    "number_resource": ({"EventType": "Reboot", "Resources": [1]}, "$p.Resources: "),
    "too_many_resources": ({"EventType": "Reboot", "Resources": ["vm"] * 1001}, "$p.Resources: "),
    "null_resources": ({"EventType": "Reboot", "Resources": None}, "$p.Resources: "),
    "description": ({"EventType": "Reboot", "Description": 5}, "$p.Description: a string"),
    "duration_below_unknown": ({"EventType": "Reboot", "DurationInSeconds": -2}, "$p.DurationInSeconds: "),
    "duration_fraction": ({"EventType": "Reboot", "DurationInSeconds": 1.5}, "$p.DurationInSeconds: "),
    "duration_boolean": ({"EventType": "Reboot", "DurationInSeconds": True}, "$p.DurationInSeconds: "),
    "duration_text": ({"EventType": "Reboot", "DurationInSeconds": "5"}, "$p.DurationInSeconds: "),
    "duration_null": ({"EventType": "Reboot", "DurationInSeconds": None}, "$p.DurationInSeconds: "),
    "both_starts": (
        {"EventType": "Reboot", "NotBefore": "Mon, 13 Apr 2026 22:26:58 GMT", "NotBeforeSeconds": 5},
        "$p: NotBefore and NotBeforeSeconds exclude each other",
    ),
    "iso_date": ({"EventType": "Reboot", "NotBefore": "2026-04-13T22:26:58Z"}, "$p.NotBefore: an RFC 1123 date"),
    "zoneless_date": ({"EventType": "Reboot", "NotBefore": "Mon, 13 Apr 2026 22:26:58"}, "$p.NotBefore: "),
    "number_date": ({"EventType": "Reboot", "NotBefore": 1776119218}, "$p.NotBefore: "),
    "empty_date": ({"EventType": "Reboot", "NotBefore": ""}, "$p.NotBefore: "),
    "null_date": ({"EventType": "Reboot", "NotBefore": None}, "$p.NotBefore: "),
    "date_past_9999": ({"EventType": "Reboot", "NotBefore": "Fri, 31 Dec 9999 23:59:59 -1200"}, "$p.NotBefore: "),
    "negative_notice": ({"EventType": "Reboot", "NotBeforeSeconds": -1}, "$p.NotBeforeSeconds: a number of seconds"),
    "text_notice": ({"EventType": "Reboot", "NotBeforeSeconds": "5"}, "$p.NotBeforeSeconds: "),
    "boolean_notice": ({"EventType": "Reboot", "NotBeforeSeconds": True}, "$p.NotBeforeSeconds: "),
    "nan_notice": ({"EventType": "Reboot", "NotBeforeSeconds": float("nan")}, "$p.NotBeforeSeconds: "),
    "infinite_notice": ({"EventType": "Reboot", "NotBeforeSeconds": float("inf")}, "$p.NotBeforeSeconds: "),
    "huge_notice": ({"EventType": "Reboot", "NotBeforeSeconds": 1e300}, "$p.NotBeforeSeconds: "),
    "negative_started_for": ({"EventType": "Reboot", "StartedForSeconds": -0.5}, "$p.StartedForSeconds: "),
    "null_started_for": ({"EventType": "Reboot", "StartedForSeconds": None}, "$p.StartedForSeconds: "),
}


@pytest.mark.parametrize("case", BAD_EVENTS)
def test_each_bad_field_is_one_problem_naming_its_path(case: str) -> None:
    value, problem = BAD_EVENTS[case]
    problems = events.event_problems(value, "$p")
    assert len(problems) == 1, problems
    assert problems[0].startswith(problem), problems


# Values of every kind for every field, valid ones among them, to find a valid-looking event that cannot be made.
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-2, max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(
        [
            *events.EVENT_TYPES,
            *events.EVENT_STATUSES,
            *events.EVENT_SOURCES,
            "VirtualMachine",
            "Mon, 13 Apr 2026 22:26:58 GMT",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Fri, 31 Dec 9999 23:59:59 -1200",
            "Thu, 01 Jan 1970 00:00:00 +0100",
        ]
    ),
    st.lists(st.text(max_size=3), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(events.EVENT_TYPES), st.dictionaries(st.sampled_from(sorted(events.INPUT_FIELDS)), ANY_VALUE))
def test_every_event_that_validates_can_be_made_served_and_stored(event_type: str, fields: dict[str, Any]) -> None:
    value = {"EventType": event_type, **fields}
    if events.event_problems(value, "$"):
        return
    made = events.make_event(value, NOW, ["vm-name"])
    state = events.add(None, made)
    assert events.state_problems(orjson.loads(orjson.dumps(state))) == []
    for version in SCHEDULED_EVENTS_VERSIONS:
        assert events.reply_at(state, version).status == 200


def test_every_problem_is_collected_at_once() -> None:
    problems = events.event_problems(
        {"EventType": "Nope", "EventId": "", "Resources": [], "DurationInSeconds": -5, "bogus": 1}, "$.e"
    )
    assert [problem.split(":")[0] for problem in problems] == [
        "$.e.bogus",
        "$.e.EventType",
        "$.e.EventId",
        "$.e.Resources",
        "$.e.DurationInSeconds",
    ]


# ---- making an event: Azure's defaults per type ----

# type -> (minimum notice in seconds, DurationInSeconds, seconds Started before removal, EventSource,
# Description), Azure's per spec §8: a Started event stays minutes, whatever its impact's duration.
DEFAULTS = {
    "Freeze": (
        900,
        5,
        300.0,
        "Platform",
        "Virtual machine is being paused because of a memory-preserving Live Migration operation.",
    ),
    "Reboot": (900, -1, 600.0, "User", "Virtual machine is going to be restarted as requested by authorized user."),
    "Redeploy": (600, -1, 600.0, "Platform", "Virtual machine has encountered a failure."),
    "Preempt": (30, -1, 600.0, "Platform", ""),
    "Terminate": (600, -1, 600.0, "User", "Virtual machine is going to be deleted as requested by authorized user."),
}


@pytest.mark.parametrize("event_type", DEFAULTS)
def test_make_event_defaults_per_type(event_type: str) -> None:
    notice, duration, started_for, source, description = DEFAULTS[event_type]
    made = events.make_event({"EventType": event_type}, NOW, ["vm-name"])
    assert list(made) == [*events.WIRE_FIELDS, "startsAt", "startedFor", "endsAt"]
    assert made["EventStatus"] == "Scheduled"
    assert made["EventType"] == event_type
    assert made["ResourceType"] == "VirtualMachine"
    assert made["Resources"] == ["vm-name"]
    assert made["NotBefore"] == date(NOW + notice)
    assert made["startsAt"] == NOW + notice
    assert made["DurationInSeconds"] == duration
    assert made["startedFor"] == started_for
    assert made["endsAt"] is None
    assert made["EventSource"] == source
    assert made["Description"] == description
    assert len(made["EventId"]) == 36 and made["EventId"] == made["EventId"].upper()


def test_default_descriptions_are_azures_text_and_ids_are_unique() -> None:
    """Issue 15 item 8: Azure's documented Reboot text has no "an" before "authorized user"."""
    made = {event_type: events.make_event({"EventType": event_type}, NOW, ["n"]) for event_type in DEFAULTS}
    assert made["Reboot"]["Description"] == "Virtual machine is going to be restarted as requested by authorized user."
    assert not any("by an authorized" in event["Description"] for event in made.values())
    assert len({event["EventId"] for event in made.values()}) == len(DEFAULTS)


def test_a_started_freeze_stays_started_for_minutes_not_its_impact() -> None:
    """Issue 15 item 6: a client polling every minute still sees a Freeze as Started."""
    state = events.add(None, events.make_event({"EventType": "Freeze", "EventId": "F"}, NOW, ["n"]))
    started = events.advance(state, NOW + 900)
    assert started is not None and started["Events"][0]["EventStatus"] == "Started"
    assert started["Events"][0]["DurationInSeconds"] == 5  # the impact, as Azure's sample shows it
    assert events.advance(started, NOW + 900 + 60) is started  # a minute later: still Started
    assert events.advance(started, NOW + 900 + 300)["Events"] == []  # type: ignore[index]


@pytest.mark.parametrize("event_type", DEFAULTS)
def test_compress_time_by_divides_the_default_timings_only_when_asked(event_type: str) -> None:
    notice, _duration, started_for, _source, _description = DEFAULTS[event_type]
    made = events.make_event({"EventType": event_type, "CompressTimeBy": 60}, NOW, ["n"])
    assert (made["startsAt"], made["startedFor"]) == (NOW + notice / 60, started_for / 60)
    assert made["DurationInSeconds"] == _duration  # wire data: never compressed
    given = {"EventType": event_type, "CompressTimeBy": 60, "NotBeforeSeconds": 7, "StartedForSeconds": 8}
    made = events.make_event(given, NOW, ["n"])
    assert (made["startsAt"], made["startedFor"]) == (NOW + 7, 8.0)  # a time given is taken as given
    assert "CompressTimeBy" not in made


@pytest.mark.parametrize("bad", [0, 0.5, -1, 3601, "60", True, None, float("nan")])
def test_compress_time_by_must_be_a_number_from_1(bad: Any) -> None:
    assert events.event_problems({"EventType": "Freeze", "CompressTimeBy": bad}, "$") == [
        f"$.CompressTimeBy: a number from 1 to {events.MAX_TIME_COMPRESSION}"
    ]
    assert events.event_problems({"EventType": "Freeze", "CompressTimeBy": 1.5}, "$") == []


def test_make_event_takes_what_is_given() -> None:
    default_resources = ["vm-name"]
    made = events.make_event(
        {
            "EventType": "Redeploy",
            "EventId": "mine",
            "Resources": ["a", "b"],
            "NotBefore": "Mon, 13 Apr 2026 23:26:58 +0100",  # a zone: served as GMT
            "Description": "custom",
            "EventSource": "User",
            "DurationInSeconds": 0,  # no interruption: removed after the default 600 s
        },
        NOW,
        default_resources,
    )
    assert (made["EventId"], made["Resources"], made["Description"], made["EventSource"]) == (
        "mine",
        ["a", "b"],
        "custom",
        "User",
    )
    assert made["NotBefore"] == "Mon, 13 Apr 2026 22:26:58 GMT"
    assert made["startsAt"] == 1776119218.0
    assert (made["DurationInSeconds"], made["startedFor"]) == (0, 600.0)

    # DurationInSeconds is the impact, not how long the event stays Started.
    assert events.make_event({"EventType": "Reboot", "DurationInSeconds": 30}, NOW, ["n"])["startedFor"] == 600.0
    given = events.make_event({"EventType": "Reboot", "DurationInSeconds": 30, "StartedForSeconds": 2}, NOW, ["n"])
    assert given["startedFor"] == 2.0
    assert events.make_event({"EventType": "Reboot", "NotBeforeSeconds": 1.5}, NOW, ["n"])["startsAt"] == NOW + 1.5

    defaulted = events.make_event({"EventType": "Reboot"}, NOW, default_resources)
    defaulted["Resources"].append("x")
    assert default_resources == ["vm-name"]  # the caller's list is copied, not shared


def test_an_event_given_as_started_starts_now() -> None:
    made = events.make_event({"EventType": "Freeze", "EventStatus": "Started", "StartedForSeconds": 9}, NOW, ["n"])
    assert (made["EventStatus"], made["NotBefore"], made["endsAt"]) == ("Started", "", NOW + 9)


# ---- the lifecycle, with explicit times ----


def test_add_bumps_the_incarnation_once_and_refuses_a_taken_id() -> None:
    first = events.add(None, reboot())
    assert first["DocumentIncarnation"] == 2  # "no events" is incarnation 1
    assert [event["EventId"] for event in first["Events"]] == ["E1"]
    second = events.add(first, reboot(EventId="E2"))
    assert second["DocumentIncarnation"] == 3
    assert [event["EventId"] for event in second["Events"]] == ["E1", "E2"]
    assert [event["EventId"] for event in first["Events"]] == ["E1"]  # states are never changed in place

    with pytest.raises(events.EventError) as caught:
        events.add(second, reboot(EventId="E2"))
    assert caught.value.status == 409 and "E2" in caught.value.message


def test_add_refuses_past_the_per_vm_limit() -> None:
    state: dict[str, Any] | None = None
    for index in range(events.MAX_EVENTS_PER_VM):
        state = events.add(state, reboot(EventId=f"E{index}"))
    assert state is not None and state["DocumentIncarnation"] == events.MAX_EVENTS_PER_VM + 1
    with pytest.raises(events.EventError) as caught:
        events.add(state, reboot(EventId="one-more"))
    assert caught.value.status == 409


def test_cancel_removes_one_event_and_refuses_an_unknown_one() -> None:
    state = events.add(events.add(None, reboot()), reboot(EventId="E2"))
    cancelled = events.cancel(state, "E1")
    assert cancelled["DocumentIncarnation"] == state["DocumentIncarnation"] + 1
    assert [event["EventId"] for event in cancelled["Events"]] == ["E2"]
    for where in (cancelled, None):
        with pytest.raises(events.EventError) as caught:
            events.cancel(where, "E1")
        assert caught.value.status == 404


def test_approve_starts_scheduled_events_once() -> None:
    state = events.add(events.add(None, reboot()), reboot(EventId="E2"))
    assert events.approve(None, frozenset({"E1"}), NOW) is None
    assert events.approve(state, frozenset({"other"}), NOW) is state  # nothing to start: the same object

    started = events.approve(state, frozenset({"E1", "E2", "other"}), NOW + 10)
    assert started is not None
    assert started["DocumentIncarnation"] == state["DocumentIncarnation"] + 1  # two events, one change
    for event in started["Events"]:
        assert (event["EventStatus"], event["NotBefore"], event["endsAt"]) == ("Started", "", NOW + 10 + 60)
        assert event["startsAt"] == NOW + 900  # kept: only the wire NotBefore is cleared
    assert events.approve(started, frozenset({"E1"}), NOW + 20) is started  # approving a Started one: a no-op

    one = events.approve(state, frozenset({"E2"}), NOW)
    assert one is not None
    assert [event["EventStatus"] for event in one["Events"]] == ["Scheduled", "Started"]


def test_advance_starts_at_not_before_and_removes_after_started_for() -> None:
    state = events.add(None, reboot())  # starts at NOW + 900, Started for 60 s
    assert events.advance(None, NOW) is None
    assert events.advance(state, NOW + 899.9) is state
    started = events.advance(state, NOW + 900)
    assert started is not None and started["DocumentIncarnation"] == 3
    [event] = started["Events"]
    assert (event["EventStatus"], event["NotBefore"], event["endsAt"]) == ("Started", "", NOW + 960)
    assert events.advance(started, NOW + 959) is started
    removed = events.advance(started, NOW + 960)
    assert removed == {"DocumentIncarnation": 4, "Events": []}
    assert events.advance(removed, NOW + 10_000) is removed


def test_advance_past_start_and_end_at_once_is_one_change() -> None:
    state = events.add(None, reboot())
    jumped = events.advance(state, NOW + 5000)  # started at 5000, so it ends at 5060: still there
    assert jumped is not None and jumped["DocumentIncarnation"] == state["DocumentIncarnation"] + 1
    assert jumped["Events"][0]["endsAt"] == NOW + 5060

    zero = events.add(None, reboot(StartedForSeconds=0))
    gone = events.advance(zero, NOW + 900)  # started and finished in the same moment
    assert gone == {"DocumentIncarnation": zero["DocumentIncarnation"] + 1, "Events": []}

    two = events.add(events.add(None, reboot()), reboot(EventId="E2", NotBeforeSeconds=100))
    both = events.advance(two, NOW + 900)
    assert both is not None and both["DocumentIncarnation"] == two["DocumentIncarnation"] + 1
    assert [event["EventStatus"] for event in both["Events"]] == ["Started", "Started"]


def test_next_change_is_the_earliest_start_or_end() -> None:
    assert events.next_change(None) is None
    assert events.next_change(events.EMPTY_STATE) is None
    state = events.add(events.add(None, reboot()), reboot(EventId="E2", NotBeforeSeconds=100))
    assert events.next_change(state) == NOW + 100
    started = events.approve(state, frozenset({"E2"}), NOW + 10)
    assert events.next_change(started) == NOW + 70  # E2 ends before E1 starts
    started_both = events.approve(started, frozenset({"E1"}), NOW + 20)
    assert events.next_change(started_both) == NOW + 70


def test_with_events_replaces_the_list_and_bumps_the_incarnation() -> None:
    assert events.with_events(None, []) == EMPTY_DOCUMENT
    fresh = events.with_events(None, [reboot()])
    assert fresh["DocumentIncarnation"] == 2  # events where "no events" (1) was: a change
    replaced = events.with_events(fresh, [reboot(EventId="E9")])
    assert replaced["DocumentIncarnation"] == 3
    assert [event["EventId"] for event in replaced["Events"]] == ["E9"]
    assert events.with_events(replaced, []) == {"DocumentIncarnation": 4, "Events": []}


# ---- the wire document ----

ONE_OF_EACH = {
    "DocumentIncarnation": 7,
    "Events": [
        events.make_event({"EventType": event_type, "EventId": event_type}, NOW, ["n"]) for event_type in DEFAULTS
    ],
}
BASE_FIELDS = ["EventId", "EventStatus", "EventType", "ResourceType", "Resources", "NotBefore"]
# api-version -> (event types shown, fields shown), as spec §8 gates them
GATING = {
    "2017-03-01": (["Freeze", "Reboot", "Redeploy"], BASE_FIELDS),
    "2017-08-01": (["Freeze", "Reboot", "Redeploy"], BASE_FIELDS),
    "2017-11-01": (["Freeze", "Reboot", "Redeploy", "Preempt"], BASE_FIELDS),
    "2019-01-01": (["Freeze", "Reboot", "Redeploy", "Preempt", "Terminate"], BASE_FIELDS),
    "2019-04-01": (list(DEFAULTS), [*BASE_FIELDS, "Description"]),
    "2019-08-01": (list(DEFAULTS), [*BASE_FIELDS, "Description", "EventSource"]),
    "2020-07-01": (list(DEFAULTS), [*BASE_FIELDS, "Description", "EventSource", "DurationInSeconds"]),
}


def test_the_gating_table_covers_every_version() -> None:
    assert set(GATING) == SCHEDULED_EVENTS_VERSIONS


@pytest.mark.parametrize("version", sorted(GATING))
def test_document_at_gates_types_and_fields_by_version(version: str) -> None:
    types, fields = GATING[version]
    document = events.document_at(ONE_OF_EACH, version)
    assert list(document) == ["DocumentIncarnation", "Events"]
    assert document["DocumentIncarnation"] == 7
    assert [event["EventType"] for event in document["Events"]] == types
    for event in document["Events"]:
        assert list(event) == fields  # Azure's order, no private field
    served = orjson.loads(events.reply_at(ONE_OF_EACH, version).body)
    assert served == document


def test_no_events_is_incarnation_1_and_an_empty_list() -> None:
    for version in SCHEDULED_EVENTS_VERSIONS:
        assert events.reply_at(None, version).body == b'{"DocumentIncarnation":1,"Events":[]}'
        assert events.document_at(events.EMPTY_STATE, version) == EMPTY_DOCUMENT


def test_the_documented_sample_byte_for_byte() -> None:
    # spec §8's sample, with the weekday its date really has (11 Apr 2026 is a Saturday).
    sample = (
        b'{"DocumentIncarnation":2,"Events":[{"EventId":"C7061BAC-AFDC-4513-B24B-AA5F13A16123",'
        b'"EventStatus":"Scheduled","EventType":"Freeze","ResourceType":"VirtualMachine",'
        b'"Resources":["WestNO_0","WestNO_1"],"NotBefore":"Sat, 11 Apr 2026 22:26:58 GMT",'
        b'"Description":"Virtual machine is being paused because of a memory-preserving Live Migration operation.",'
        b'"EventSource":"Platform","DurationInSeconds":5}]}'
    )
    made = events.make_event(
        {
            "EventType": "Freeze",
            "EventId": "C7061BAC-AFDC-4513-B24B-AA5F13A16123",
            "Resources": ["WestNO_0", "WestNO_1"],
            "NotBefore": "Sat, 11 Apr 2026 22:26:58 GMT",
        },
        NOW,
        ["unused"],
    )
    reply = events.reply_at(events.add(None, made), NEWEST)
    assert reply.status == 200
    assert reply.body == sample
    assert b"Content-Type: application/json; charset=utf-8\r\n" in reply.head


def test_a_started_event_is_served_with_an_empty_not_before() -> None:
    started = events.approve(events.add(None, reboot()), frozenset({"E1"}), NOW)
    [event] = events.document_at(started, "2017-08-01")["Events"]
    assert (event["EventStatus"], event["NotBefore"]) == ("Started", "")


# ---- the approval body ----

GOOD_APPROVALS = {
    b'{"StartRequests":[{"EventId":"a"}]}': ["a"],
    b'{"StartRequests":[{"EventId":"a"},{"EventId":"b"}]}': ["a", "b"],
    b' {"StartRequests": [{"EventId": "a", "extra": 1}], "more": true} ': ["a"],
}
BAD_APPROVALS = [
    b"",
    b"not json",
    b"\xff\xfe",
    b"null",
    b"[]",
    b"{}",
    b'{"StartRequests":[]}',
    b'{"StartRequests":{"EventId":"a"}}',
    b'{"StartRequests":["a"]}',
    b'{"StartRequests":[{}]}',
    b'{"StartRequests":[{"EventId":""}]}',
    b'{"StartRequests":[{"EventId":5}]}',
    b'{"StartRequests":[{"EventId":"a"},{"EventId":null}]}',
    b'{"startrequests":[{"EventId":"a"}]}',
]


@pytest.mark.parametrize("body", GOOD_APPROVALS)
def test_approval_ids_of_good_bodies(body: bytes) -> None:
    assert events.approval_ids(body) == GOOD_APPROVALS[body]


@pytest.mark.parametrize("body", BAD_APPROVALS)
def test_approval_ids_of_bad_bodies_is_none(body: bytes) -> None:
    assert events.approval_ids(body) is None


# ---- a state read back from the bus ----


def _good_state() -> dict[str, Any]:
    state = events.add(events.add(None, reboot()), reboot(EventId="E2"))
    started = events.approve(state, frozenset({"E2"}), NOW)
    assert started is not None
    return started


def test_good_states_have_no_problems() -> None:
    assert events.state_problems(events.EMPTY_STATE) == []
    state = _good_state()
    assert [event["NotBefore"] for event in state["Events"]] == [date(NOW + 900), ""]  # "" once Started
    assert events.state_problems(state) == []
    assert events.state_problems(orjson.loads(orjson.dumps(state))) == []  # as the bus gives it back


def _event_with(**fields: Any) -> dict[str, Any]:
    state = _good_state()
    state["Events"][0] = {**state["Events"][0], **fields}
    return state


def _started_with(**fields: Any) -> dict[str, Any]:
    state = _good_state()
    state["Events"][1] = {**state["Events"][1], **fields}
    return state


def _event_without(key: str) -> dict[str, Any]:
    state = _good_state()
    del state["Events"][0][key]
    return state


BAD_STATES: dict[str, tuple[Any, str]] = {
    "not_an_object": ([], "events: expected"),
    "no_incarnation": ({"Events": []}, "events: expected"),
    "text_incarnation": ({"DocumentIncarnation": "2", "Events": []}, "events: expected"),
    "events_not_a_list": ({"DocumentIncarnation": 2, "Events": {}}, "events.Events: expected an array"),
    "event_not_an_object": ({"DocumentIncarnation": 2, "Events": ["x"]}, "events.Events[0]: expected an object"),
    "bad_type": (_event_with(EventType="Pause"), "events.Events[0].EventType"),
    "bad_status": (_event_with(EventStatus="Done"), "events.Events[0].EventStatus"),
    "no_resources": (_event_with(Resources=[]), "events.Events[0].Resources"),
    "no_id": (_event_without("EventId"), "events.Events[0]: EventId and NotBefore are required"),
    "no_not_before": (_event_without("NotBefore"), "events.Events[0]: EventId and NotBefore are required"),
    "number_not_before": (_event_with(NotBefore=5), "events.Events[0]: EventId and NotBefore are required"),
    "no_starts_at": (_event_without("startsAt"), "events.Events[0]: startsAt and startedFor"),
    "text_started_for": (_event_with(startedFor="60"), "events.Events[0]: startsAt and startedFor"),
    "text_ends_at": (_event_with(endsAt="soon"), "events.Events[0].endsAt: a number or null"),
    # Every field of a stored event is there (a ScheduledEvent), or the lifecycle could not read it.
    "no_status": (_event_without("EventStatus"), "events.Events[0]: missing EventStatus"),
    "no_description": (_event_without("Description"), "events.Events[0]: missing Description"),
    "no_ends_at": (_event_without("endsAt"), "events.Events[0]: missing endsAt"),
    # A Started event is removed at endsAt: without one the event clock could never remove it.
    "started_without_end": (_started_with(endsAt=None), "events.Events[1].endsAt: a Started event's is a number"),
}


@pytest.mark.parametrize("case", BAD_STATES)
def test_bad_states_are_named(case: str) -> None:
    state, problem = BAD_STATES[case]
    problems = events.state_problems(state)
    assert any(found.startswith(problem) for found in problems), problems


# ---- the VM description's "scheduledEvents" list ----


def document_with(scheduled: Any) -> dict[str, Any]:
    document = copy.deepcopy(sample_vm().document)
    document["scheduledEvents"] = scheduled
    return document


def test_a_description_with_events_validates_and_keeps_the_list() -> None:
    given = [{"EventType": "Reboot", "EventId": "a"}, {"EventType": "Freeze", "NotBeforeSeconds": 5}]
    vm = describe_vm(document_with(given), "test")
    assert vm.reserved["scheduledEvents"] == given
    assert vm.scheduled is None  # only the control plane makes the live events


@pytest.mark.parametrize(
    ("scheduled", "expected"),
    [
        ("Reboot", ["$.scheduledEvents: expected an array, got a string"]),
        ({"EventType": "Reboot"}, ["$.scheduledEvents: expected an array, got an object"]),
        (
            [{"EventType": "Reboot"}, {"EventType": "Pause", "NotBeforeSeconds": -1}, 7],
            [
                "$.scheduledEvents[1].EventType: ",
                "$.scheduledEvents[1].NotBeforeSeconds: ",
                "$.scheduledEvents[2]: expected an object",
            ],
        ),
        (
            [{"EventType": "Reboot", "EventId": "x"}, {"EventType": "Freeze", "EventId": "x"}],
            ["$.scheduledEvents: EventId 'x' is given more than once"],
        ),
        ([{"EventType": "Reboot", "DurationInSeconds": None}], ["$.scheduledEvents[0].DurationInSeconds: "]),
        ([{"EventType": "Reboot"}] * 101, ["$.scheduledEvents: at most 100 events"]),
    ],
)
def test_bad_lists_name_every_problem_with_its_path(scheduled: Any, expected: list[str]) -> None:
    with pytest.raises(DataError) as caught:
        describe_vm(document_with(scheduled), "test")
    problems = caught.value.problems
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problems


# ---- routing: GET and the approval POST ----


class RecordingSink:
    def __init__(self) -> None:
        self.approved: list[frozenset[str]] = []

    def approve(self, event_ids: frozenset[str]) -> bool:
        self.approved.append(event_ids)
        return True


# resolve() only returns an approval (fastimds.imds.effects); `call` hands it to these, as a connection would.
_SINKS: list[RecordingSink] = []


@pytest.fixture
def sink() -> Any:
    recording = RecordingSink()
    _SINKS.append(recording)
    try:
        yield recording
    finally:
        _SINKS.remove(recording)


SCHEDULED_STATE = events.add(events.add(None, reboot()), reboot(EventId="E2", EventType="Terminate"))
STARTED_STATE = events.approve(SCHEDULED_STATE, frozenset({"E2"}), NOW)


def snapshot_with(state: dict[str, Any] | None) -> Snapshot:
    return build_snapshot(replace(sample_vm(), scheduled=state), 1)


def call(
    target: str,
    method: str = "GET",
    body: bytes = b"",
    *,
    metadata_ok: bool = True,
    forwarded: bool = False,
    state: dict[str, Any] | None = STARTED_STATE,
    snapshot: Snapshot | None = None,
) -> tuple[int, Any, bytes]:
    if snapshot is None:
        snapshot = snapshot_with(state)
    reply = resolve(snapshot, method.encode(), target.encode(), metadata_ok, forwarded, body=body)
    if isinstance(reply, Approval):
        for recording in _SINKS:
            recording.approve(reply.event_ids)
    return reply.status, orjson.loads(reply.body) if reply.body else None, reply.head


@pytest.mark.parametrize("version", sorted(SCHEDULED_EVENTS_VERSIONS))
def test_get_serves_the_document_at_each_version(version: str, sink: RecordingSink) -> None:
    for suffix in ("", "&format=json", "&format=JSON"):
        status, body, _head = call(f"/metadata/scheduledevents?api-version={version}{suffix}")
        assert (status, body) == (200, events.document_at(STARTED_STATE, version))
    status, body, head = call(f"/metadata/scheduledevents?api-version={version}", method="HEAD")
    assert status == 200 and b"Content-Length: " in head
    assert sink.approved == []


def test_get_of_a_vm_without_events() -> None:
    assert call(TARGET, state=None)[:2] == (200, EMPTY_DOCUMENT)


MISSING_HEADER = {"error": "Bad request. Required metadata header not specified"}
JSON_ONLY = {"error": "Bad request. This endpoint only serves format=json"}
BAD_FORMAT = {"error": "Bad request. format must be json or text"}
BAD_APPROVAL = {"error": 'Bad request. The body must be JSON: {"StartRequests": [{"EventId": "<id>"}, ...]}'}
UNKNOWN_EVENT = {"error": "Bad request. An EventId in StartRequests is not a scheduled event of this VM"}
NO_VM = {"error": "Not found. No VM is registered for this caller's address"}
APPROVE_E1 = b'{"StartRequests":[{"EventId":"E1"}]}'

# (method, target, body, metadata_ok, forwarded) -> (status, body)
REFUSALS: dict[str, tuple[str, str, bytes, bool, bool, int, Any]] = {
    "no_version": ("GET", "/metadata/scheduledevents", b"", True, False, 400, BAD_VERSION),
    "unknown_version": ("GET", "/metadata/scheduledevents?api-version=2017-07-01", b"", True, False, 400, BAD_VERSION),
    "instance_version": ("GET", "/metadata/scheduledevents?api-version=2021-02-01", b"", True, False, 400, BAD_VERSION),
    "text": ("GET", TARGET + "&format=text", b"", True, False, 400, JSON_ONLY),
    "bad_format": ("GET", TARGET + "&format=xml", b"", True, False, 400, BAD_FORMAT),
    "no_header": ("GET", TARGET, b"", False, False, 400, MISSING_HEADER),
    "forwarded": ("GET", TARGET, b"", True, True, 400, None),
    "sub_path": ("GET", "/metadata/scheduledevents/E1?api-version=2020-07-01", b"", True, False, 404, None),
    "post_no_header": ("POST", TARGET, APPROVE_E1, False, False, 400, MISSING_HEADER),
    "post_forwarded": ("POST", TARGET, APPROVE_E1, True, True, 400, None),
    "post_no_version": ("POST", "/metadata/scheduledevents", APPROVE_E1, True, False, 400, BAD_VERSION),
    "post_text": ("POST", TARGET + "&format=text", APPROVE_E1, True, False, 400, JSON_ONLY),
    "post_bad_format": ("POST", TARGET + "&format=yaml", APPROVE_E1, True, False, 400, BAD_FORMAT),
    "post_empty": ("POST", TARGET, b"", True, False, 400, BAD_APPROVAL),
    "post_malformed": ("POST", TARGET, b'{"StartRequests":"E1"}', True, False, 400, BAD_APPROVAL),
    "post_unknown": ("POST", TARGET, b'{"StartRequests":[{"EventId":"E3"}]}', True, False, 400, UNKNOWN_EVENT),
    "post_one_unknown": (
        "POST",
        TARGET,
        b'{"StartRequests":[{"EventId":"E1"},{"EventId":"E3"}]}',
        True,
        False,
        400,
        UNKNOWN_EVENT,
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_approve_nothing(case: str, sink: RecordingSink) -> None:
    method, target, body, metadata_ok, forwarded, status, expected = REFUSALS[case]
    found_status, found_body, _head = call(target, method, body, metadata_ok=metadata_ok, forwarded=forwarded)
    assert found_status == status, found_body
    if expected is not None:
        assert found_body == expected
    assert isinstance(found_body, dict) and "error" in found_body
    assert sink.approved == []


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "OPTIONS"])
def test_other_methods_are_405_with_allow(method: str, sink: RecordingSink) -> None:
    status, body, head = call(TARGET, method, APPROVE_E1)
    assert status == 405
    assert b"Allow: GET, HEAD, POST\r\n" in head
    assert body == {"error": f'Http method isn\'t allowed: Path = "/metadata/scheduledevents", Method = "{method}"'}
    assert sink.approved == []


def test_a_caller_without_a_vm() -> None:
    for method, body in (("GET", b""), ("POST", APPROVE_E1)):
        reply = resolve(None, method.encode(), TARGET.encode(), True, False, body=body)
        assert (reply.status, orjson.loads(reply.body)) == (404, NO_VM)
        reply = resolve(None, method.encode(), b"/metadata/scheduledevents", True, False, body=body)
        assert (reply.status, orjson.loads(reply.body)) == (400, BAD_VERSION)  # the api-version is checked first


def test_an_approval_is_200_with_no_body_and_reaches_the_sink(sink: RecordingSink) -> None:
    status, body, head = call(TARGET, "POST", b'{"StartRequests":[{"EventId":"E1"},{"EventId":"E2"}]}')
    assert (status, body) == (200, None)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 0\r\n" in head
    # E2 is Started already: still 200 (spec §8), answered from the snapshot with no effect.
    assert sink.approved == [frozenset({"E1"})]
    for version in SCHEDULED_EVENTS_VERSIONS:  # every version of the endpoint approves
        assert call(f"/metadata/scheduledevents?api-version={version}", "POST", APPROVE_E1)[0] == 200
    assert sink.approved[1:] == [frozenset({"E1"})] * len(SCHEDULED_EVENTS_VERSIONS)


def test_an_approval_on_a_vm_without_events_is_unknown(sink: RecordingSink) -> None:
    assert call(TARGET, "POST", APPROVE_E1, state=None)[:2] == (400, UNKNOWN_EVENT)
    assert sink.approved == []


def test_a_post_is_never_memoised(sink: RecordingSink) -> None:
    snapshot = snapshot_with(STARTED_STATE)
    for _ in range(2):
        assert call(TARGET, "POST", APPROVE_E1, snapshot=snapshot)[0] == 200
        assert call(TARGET, "POST", b"{}", snapshot=snapshot)[0] == 400
    assert sink.approved == [frozenset({"E1"})] * 2
    assert call(TARGET, snapshot=snapshot)[0] == 200  # the GET is memoised...
    assert TARGET.encode() in snapshot.url_replies
    assert call(TARGET, "POST", APPROVE_E1, snapshot=snapshot)[0] == 200  # ...and a POST still approves
    assert len(sink.approved) == 3


# ---- approvals through the bus (several workers) ----


def test_bus_approvals_are_taken_once_and_junk_is_dropped(tmp_path: Path) -> None:
    bus_directory = tmp_path / "bus"
    bus_directory.mkdir()
    worker = BusApprovals(bus_directory, durable=True)
    assert worker.approve("vm-1", frozenset({"b", "a"}))
    assert worker.approve("vm-2", frozenset({"c"}))
    folder = bus_directory / "approvals"
    assert len(list(folder.glob("*.json"))) == 2  # no loop to batch on: written at once
    assert not [path for path in folder.iterdir() if path.name.startswith(".")]  # no temp file left
    (folder / "junk.json").write_bytes(b"{not json")
    (folder / "wrong.json").write_bytes(b'{"EventIds": "a"}')
    (folder / "old.json").write_bytes(b'{"EventIds": ["x"]}')  # before approvals named their VM: dropped
    (folder / ".partial.json").write_bytes(b'{"EventIds": ["hidden"]}')  # being written: not read
    assert take_approvals(folder, EventLog()) == {"vm-1": frozenset({"a", "b"}), "vm-2": frozenset({"c"})}
    assert sorted(path.name for path in folder.iterdir()) == [".partial.json"]
    assert take_approvals(folder, EventLog()) == {}


# ---- Control: the lifecycle as the control plane runs it ----


def bus_state(bus: Bus) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(bus.directory.iterdir()) if path.is_file()}


def generation(control: Control, vm_id: str) -> int:
    return control.generation(vm_id)


def served(control: Control, vm_id: str, version: str = NEWEST) -> Any:
    """What VM `vm_id`'s callers get from /metadata/scheduledevents now."""
    snapshot = serving(control).stores[vm_id].current
    assert snapshot is not None
    reply = resolve(snapshot, b"GET", f"/metadata/scheduledevents?api-version={version}".encode(), True, False)
    assert reply.status == 200
    return orjson.loads(reply.body)


def scale_set_vm(vm_id: str, caller: str, scale_set: str = "web") -> dict[str, Any]:
    document = vm_document(vm_id, callers=[caller])
    document["instance"]["compute"]["vmScaleSetName"] = scale_set
    return document


AT_NOW_900 = {"EventType": "Reboot", "NotBefore": date(NOW + 900), "StartedForSeconds": 60}


def test_an_event_runs_its_lifecycle_as_new_generations(plane: ControlPlane, control: Control, bus: Bus) -> None:
    assert control.put("a", vm_document("a", callers=["10.1.0.4"])) == 1
    assert served(control, "a") == EMPTY_DOCUMENT
    assert control.events_of("a") == events.EMPTY_STATE
    assert plane.clock.next_event_change() is None

    event_id, generations = plane.clock.add_event(["a"], {**AT_NOW_900, "EventId": "R1"})
    assert (event_id, generations) == ("R1", {"a": 2})
    state = control.events_of("a")
    assert state["DocumentIncarnation"] == 2
    [event] = state["Events"]
    assert (event["EventStatus"], event["Resources"], event["startsAt"]) == ("Scheduled", ["a-name"], NOW + 900)
    entry = bus.read("a")
    assert entry is not None and (entry.generation, entry.events) == (2, state)  # durable before served
    assert served(control, "a")["Events"][0]["NotBefore"] == date(NOW + 900)
    assert plane.clock.next_event_change() == NOW + 900

    plane.clock.advance_events(NOW + 899)
    assert generation(control, "a") == 2  # nothing due: no new generation

    plane.clock.advance_events(NOW + 900)
    assert generation(control, "a") == 3
    document = served(control, "a")
    assert document["DocumentIncarnation"] == 3
    assert (document["Events"][0]["EventStatus"], document["Events"][0]["NotBefore"]) == ("Started", "")
    assert plane.clock.next_event_change() == NOW + 960

    plane.clock.advance_events(NOW + 960)
    assert generation(control, "a") == 4
    assert served(control, "a") == {"DocumentIncarnation": 4, "Events": []}
    assert plane.clock.next_event_change() is None
    entry = bus.read("a")
    assert entry is not None and entry.events == {"DocumentIncarnation": 4, "Events": []}
    plane.clock.advance_events(NOW + 10_000)
    assert generation(control, "a") == 4


def test_an_approval_starts_the_event_now(plane: ControlPlane, control: Control) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    event_id, _ = plane.clock.add_event(["a"], {"EventType": "Redeploy", "StartedForSeconds": 60})
    before = time.time()
    plane.clock.approve({"a": frozenset({event_id})})
    after = time.time()
    assert generation(control, "a") == 3
    [event] = control.events_of("a")["Events"]
    assert (event["EventStatus"], event["NotBefore"]) == ("Started", "")
    assert before + 60 <= event["endsAt"] <= after + 60
    assert plane.clock.next_event_change() == event["endsAt"]

    plane.clock.approve({"a": frozenset({event_id})})  # already Started
    plane.clock.approve({"a": frozenset({"unknown"})})
    assert generation(control, "a") == 3
    assert control.events_of("a")["DocumentIncarnation"] == 3


def test_a_group_event_is_one_event_on_every_vm(plane: ControlPlane, control: Control, bus: Bus) -> None:
    for index, vm_id in enumerate(("w1", "w2", "w3")):
        control.put(vm_id, scale_set_vm(vm_id, f"10.1.0.{index + 4}"))
    control.put("other", scale_set_vm("other", "10.2.0.4", scale_set="db"))
    assert plane.clock.vms_in_scale_set("web") == ["w1", "w2", "w3"]
    assert plane.clock.vms_in_scale_set("nope") == []

    event_id, generations = plane.clock.add_event(plane.clock.vms_in_scale_set("web"), {**AT_NOW_900})
    assert generations == {"w1": 2, "w2": 2, "w3": 2}
    for vm_id in ("w1", "w2", "w3"):
        [event] = served(control, vm_id)["Events"]
        assert (event["EventId"], event["Resources"]) == (event_id, ["w1-name", "w2-name", "w3-name"])
    assert served(control, "other") == EMPTY_DOCUMENT

    plane.clock.approve({"w2": frozenset({event_id})})  # approved from one VM, it starts on all
    for vm_id in ("w1", "w2", "w3"):
        assert generation(control, vm_id) == 3
        assert served(control, vm_id)["Events"][0]["EventStatus"] == "Started"
    assert generation(control, "other") == 1

    assert plane.clock.cancel_event(event_id) == {"w1": 4, "w2": 4, "w3": 4}
    for vm_id in ("w1", "w2", "w3"):
        assert served(control, vm_id) == {"DocumentIncarnation": 4, "Events": []}
        entry = bus.read(vm_id)
        assert entry is not None and entry.events == {"DocumentIncarnation": 4, "Events": []}


def test_cancel_on_one_vm_leaves_the_others(plane: ControlPlane, control: Control) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    control.put("b", vm_document("b", callers=["10.2.0.4"]))
    event_id, _ = plane.clock.add_event(["a", "b"], AT_NOW_900)
    assert plane.clock.cancel_event(event_id, "a") == {"a": 3}
    assert served(control, "a")["Events"] == []
    assert [event["EventId"] for event in served(control, "b")["Events"]] == [event_id]


def test_advance_runs_every_vm(plane: ControlPlane, control: Control) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    control.put("b", vm_document("b", callers=["10.2.0.4"]))
    plane.clock.add_event(["a"], AT_NOW_900)
    plane.clock.add_event(["b"], {**AT_NOW_900, "NotBefore": date(NOW + 100)})
    assert plane.clock.next_event_change() == NOW + 100
    plane.clock.advance_events(NOW + 100)
    assert (generation(control, "a"), generation(control, "b")) == (2, 3)
    plane.clock.advance_events(NOW + 900)
    assert (generation(control, "a"), generation(control, "b")) == (3, 4)  # b: Started at 100, removed at 160


REFUSED_EVENTS: dict[str, tuple[list[str], Any, int, str]] = {
    "invalid": (["a"], {"EventType": "Pause", "Resources": []}, 400, "$.EventType"),
    "null_duration": (["a"], {"EventType": "Reboot", "DurationInSeconds": None}, 400, "$.DurationInSeconds"),
    "not_an_object": (["a"], ["Reboot"], 400, "$: expected an object"),
    "missing_vm": (["a", "nope"], AT_NOW_900, 404, "'nope'"),
    "taken_on_one": (["a", "b"], {**AT_NOW_900, "EventId": "on-b"}, 409, "on-b"),
}


@pytest.mark.parametrize("case", REFUSED_EVENTS)
def test_a_refused_event_changes_nothing(plane: ControlPlane, case: str, control: Control, bus: Bus) -> None:
    vm_ids, request, status, needle = REFUSED_EVENTS[case]
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    control.put("b", vm_document("b", callers=["10.2.0.4"]))
    plane.clock.add_event(["b"], {**AT_NOW_900, "EventId": "on-b"})
    files = bus_state(bus)
    before = {vm_id: (generation(control, vm_id), control.events_of(vm_id)) for vm_id in ("a", "b")}

    with pytest.raises(UpdateError) as caught:
        plane.clock.add_event(vm_ids, request)
    assert caught.value.status == status
    assert any(needle in text for text in [caught.value.message, *caught.value.problems]), caught.value.problems
    assert bus_state(bus) == files
    assert {vm_id: (generation(control, vm_id), control.events_of(vm_id)) for vm_id in ("a", "b")} == before


def test_a_refused_cancel_changes_nothing(plane: ControlPlane, control: Control, bus: Bus) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    plane.clock.add_event(["a"], {**AT_NOW_900, "EventId": "R1"})
    files = bus_state(bus)
    for event_id, vm_id in (("R2", "a"), ("R2", None), ("R1", "nope")):
        with pytest.raises(UpdateError) as caught:
            plane.clock.cancel_event(event_id, vm_id)
        assert caught.value.status == 404
    with pytest.raises(UpdateError):
        control.events_of("nope")
    assert bus_state(bus) == files
    assert generation(control, "a") == 2


def test_events_survive_updates_that_leave_the_list_alone(plane: ControlPlane, control: Control) -> None:
    document = vm_document("a", callers=["10.1.0.4"])
    document["scheduledEvents"] = [{"EventType": "Freeze", "EventId": "F1", "NotBefore": date(NOW + 900)}]
    control.put("a", document)
    plane.clock.add_event(["a"], {**AT_NOW_900, "EventId": "R1"})
    kept = control.events_of("a")
    assert [event["EventId"] for event in kept["Events"]] == ["F1", "R1"]

    control.patch("a", {"instance": {"compute": {"location": "eastus"}}})
    assert control.events_of("a") == kept
    control.put("a", {**document, "callers": ["10.1.0.5"]})  # a PUT with the same list
    assert control.events_of("a") == kept
    assert served(control, "a")["DocumentIncarnation"] == kept["DocumentIncarnation"]


def test_changing_the_list_replaces_the_events(plane: ControlPlane, control: Control) -> None:
    document = vm_document("a", callers=["10.1.0.4"])
    document["scheduledEvents"] = [{"EventType": "Freeze", "EventId": "F1", "NotBefore": date(NOW + 900)}]
    control.put("a", document)
    plane.clock.add_event(["a"], {**AT_NOW_900, "EventId": "R1"})
    incarnation = control.events_of("a")["DocumentIncarnation"]

    control.patch("a", {"scheduledEvents": [{"EventType": "Preempt", "EventId": "P1", "NotBeforeSeconds": 30}]})
    state = control.events_of("a")
    assert [event["EventId"] for event in state["Events"]] == ["P1"]  # the admin's R1 went with the list
    assert state["DocumentIncarnation"] == incarnation + 1

    control.patch("a", {"scheduledEvents": None})  # no list at all: no events
    assert control.events_of("a") == {"DocumentIncarnation": incarnation + 2, "Events": []}


def test_events_from_a_description_bump_the_incarnation_a_caller_saw(control: Control) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    assert served(control, "a") == EMPTY_DOCUMENT  # a caller sees incarnation 1, no events
    control.patch("a", {"scheduledEvents": [{"EventType": "Reboot", "EventId": "R1"}]})
    document = served(control, "a")
    assert [event["EventId"] for event in document["Events"]] == ["R1"]
    assert document["DocumentIncarnation"] == 2  # Events changed: the incarnation must too

    document = vm_document("b", callers=["10.2.0.4"])
    document["scheduledEvents"] = [{"EventType": "Reboot", "EventId": "R2"}]
    control.put("b", document)
    assert served(control, "b")["DocumentIncarnation"] == 2
    assert control.events_of("b")["Events"][0]["Resources"] == ["b-name"]


def test_events_travel_through_the_bus(plane: ControlPlane, control: Control, bus: Bus) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    plane.clock.add_event(["a"], {**AT_NOW_900, "EventId": "R1"})
    plane.clock.add_event(["a"], {**AT_NOW_900, "EventId": "R2"})
    plane.clock.approve({"a": frozenset({"R2"})})
    state = control.events_of("a")

    worker = VmRegistry()
    entry = bus.read("a")
    assert entry is not None and entry.events == state
    assert apply_entry(worker, entry, EventLog())
    snapshot = worker.stores["a"].current
    assert snapshot is not None and snapshot.vm.scheduled == state

    restarted = ControlPlane.over(bus, EventLog())  # a control process restarted on a --state-dir
    assert restarted.control.events_of("a") == state
    assert restarted.clock.next_event_change() == plane.clock.next_event_change()
    restarted.clock.advance_events(NOW + 900)
    assert restarted.control.generation("a") == generation(control, "a") + 1


@pytest.mark.parametrize(
    "corrupt",
    [
        {"DocumentIncarnation": "2", "Events": []},
        {"DocumentIncarnation": 2, "Events": [{"EventType": "Reboot"}]},
        {"DocumentIncarnation": 2, "Events": "none"},
    ],
)
def test_apply_entry_refuses_a_corrupt_events_state(corrupt: Any, control: Control, bus: Bus) -> None:
    document = vm_document("a", callers=["10.1.0.4"])
    registry = VmRegistry()
    assert apply_entry(registry, BusEntry("a", 1, "admin", document, corrupt), EventLog())
    assert "a" not in registry.live()  # never served

    good = events.add(None, reboot())
    assert apply_entry(registry, BusEntry("a", 2, "admin", document, good), EventLog())
    assert apply_entry(registry, BusEntry("a", 3, "admin", document, corrupt), EventLog())
    snapshot = registry.stores["a"].current
    assert snapshot is not None and (snapshot.generation, snapshot.vm.scheduled) == (2, good)  # the good one stays


def test_the_event_clock_runs_events_on_time(plane: ControlPlane, control: Control) -> None:
    """run_event_clock on a real loop with compressed timing: sleeps until each change, wakes on a new event."""
    control.put("a", vm_document("a", callers=["10.1.0.4"]))

    async def scenario() -> list[str]:
        clock = asyncio.ensure_future(plane.clock.run())
        seen: list[str] = []
        try:
            await asyncio.sleep(0.05)  # the clock is asleep with nothing to do (up to 5 s)
            plane.clock.add_event(["a"], {"EventType": "Reboot", "NotBeforeSeconds": 0.1, "StartedForSeconds": 0.1})
            loop = asyncio.get_running_loop()
            give_up_at = loop.time() + 3.0
            while loop.time() < give_up_at:
                state = control.events_of("a")
                status = state["Events"][0]["EventStatus"] if state["Events"] else "gone"
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status == "gone":
                    break
                await asyncio.sleep(0.01)
        finally:
            clock.cancel()
            with pytest.raises(asyncio.CancelledError):
                await clock
        return seen

    assert asyncio.run(scenario()) == ["Scheduled", "Started", "gone"]
    assert generation(control, "a") == 4


# ---- the admin API's event routes ----


@pytest.fixture
def api(plane: ControlPlane) -> AdminApi:
    return admin_api(plane)


def admin(api: AdminApi, method: str, path: str, body: Any = None) -> tuple[int, Any, dict[str, str]]:
    raw = body if isinstance(body, bytes) else (b"" if body is None else orjson.dumps(body))
    [response] = split_responses(api.handle(method, path, None, raw, False))
    return response.status, response.json(), response.headers


def test_admin_adds_shows_and_cancels_an_event(api: AdminApi) -> None:
    admin(api, "PUT", "/vms/a", vm_document("a", callers=["10.1.0.4"]))
    status, body, _ = admin(api, "POST", "/vms/a/scheduledevents", {**AT_NOW_900, "EventId": "R1"})
    assert (status, body) == (201, {"EventId": "R1", "generations": {"a": 2}})
    status, body, _ = admin(api, "GET", "/vms/a/scheduledevents")
    assert status == 200
    assert (body["id"], body["DocumentIncarnation"]) == ("a", 2)
    [event] = body["Events"]
    assert (event["startsAt"], event["startedFor"], event["endsAt"]) == (NOW + 900, 60, None)  # private fields shown
    assert admin(api, "DELETE", "/vms/a/scheduledevents/R1")[:2] == (200, {"EventId": "R1", "generations": {"a": 3}})
    assert admin(api, "GET", "/vms/a/scheduledevents")[1] == {"id": "a", "DocumentIncarnation": 3, "Events": []}


def test_admin_group_events(api: AdminApi, control: Control) -> None:
    for index, vm_id in enumerate(("w1", "w2")):
        admin(api, "PUT", f"/vms/{vm_id}", scale_set_vm(vm_id, f"10.1.0.{index + 4}"))
    admin(api, "PUT", "/vms/c", vm_document("c", callers=["10.3.0.4"]))
    status, body, _ = admin(api, "POST", "/scheduledevents", {**AT_NOW_900, "vmScaleSetName": "web"})
    assert (status, body["generations"]) == (201, {"w1": 2, "w2": 2})
    by_set = body["EventId"]
    status, body, _ = admin(api, "POST", "/scheduledevents", {**AT_NOW_900, "vms": ["c", "w1", "c"]})
    assert (status, body["generations"]) == (201, {"c": 2, "w1": 3})
    [event] = control.events_of("c")["Events"]
    assert event["Resources"] == ["c-name", "w1-name"]
    assert admin(api, "DELETE", f"/scheduledevents/{by_set}")[:2] == (
        200,
        {"EventId": by_set, "generations": {"w1": 4, "w2": 3}},
    )


@pytest.mark.parametrize(
    "case",
    [
        ("POST", "/vms/a/scheduledevents", b"{not json", 400, "not valid JSON"),
        ("POST", "/vms/a/scheduledevents", {"EventType": "Pause"}, 400, "invalid scheduled event"),
        ("POST", "/vms/a/scheduledevents", {"EventType": "Reboot", "NotBefore": None}, 400, "invalid scheduled event"),
        ("POST", "/vms/nope/scheduledevents", AT_NOW_900, 404, "nope"),
        ("GET", "/vms/nope/scheduledevents", None, 404, "nope"),
        ("DELETE", "/vms/a/scheduledevents/nope", None, 404, "nope"),
        ("PUT", "/vms/a/scheduledevents", AT_NOW_900, 405, "PUT"),
        ("GET", "/vms/a/scheduledevents/x", None, 405, "GET"),
        ("POST", "/scheduledevents", AT_NOW_900, 400, "'vms'"),
        ("POST", "/scheduledevents", {**AT_NOW_900, "vms": []}, 400, "'vms'"),
        ("POST", "/scheduledevents", {**AT_NOW_900, "vms": [1]}, 400, "'vms'"),
        ("POST", "/scheduledevents", {**AT_NOW_900, "vms": ["a"], "vmScaleSetName": "web"}, 400, "'vms'"),
        ("POST", "/scheduledevents", {**AT_NOW_900, "vmScaleSetName": 5}, 400, "'vms'"),
        ("POST", "/scheduledevents", {**AT_NOW_900, "vmScaleSetName": "none"}, 404, "none"),
        ("POST", "/scheduledevents", ["x"], 400, "JSON object"),
        ("DELETE", "/scheduledevents/nope", None, 404, "nope"),
        ("GET", "/scheduledevents", None, 405, "GET"),
    ],
)
def test_admin_event_refusals_change_nothing(api: AdminApi, bus: Bus, case: tuple[str, str, Any, int, str]) -> None:
    method, path, body, status, needle = case
    admin(api, "PUT", "/vms/a", vm_document("a", callers=["10.1.0.4"]))
    files = bus_state(bus)
    found_status, found_body, headers = admin(api, method, path, body)
    assert found_status == status, found_body
    assert needle in orjson.dumps(found_body).decode()
    if status == 405:
        assert "allow" in headers
    assert bus_state(bus) == files


def test_admin_cancels_an_event_whose_id_needs_percent_encoding(api: AdminApi) -> None:
    admin(api, "PUT", "/vms/a", vm_document("a", callers=["10.1.0.4"]))
    assert admin(api, "POST", "/vms/a/scheduledevents", {**AT_NOW_900, "EventId": "maint 1/a"})[0] == 201
    status, body, _ = admin(api, "DELETE", "/vms/a/scheduledevents/maint%201%2Fa")
    assert (status, body["EventId"]) == (200, "maint 1/a")
    assert admin(api, "GET", "/vms/a/scheduledevents")[1]["Events"] == []


def test_only_vms_with_events_wake_or_cost_the_event_clock(plane: ControlPlane, control: Control, bus: Bus) -> None:
    for name in ("a", "b", "c"):
        control.put(name, vm_document(name, callers=[f"10.1.0.{ord(name)}"]))
    control.events_changed.clear()
    control.patch("a", {"instance": {"compute": {"location": "eastus"}}})
    assert not control.events_changed.is_set()  # an update of a VM without events does not wake the clock
    assert control.with_events == set()
    event_id, _ = plane.clock.add_event(["b"], {**AT_NOW_900, "EventId": "E1"})
    assert control.with_events == {"b"} and control.events_changed.is_set()
    plane.clock.add_event(["c"], {**AT_NOW_900, "EventId": "E2"})
    assert Control(bus, EventLog()).with_events == set()  # a fresh control learns them from the bus:
    again = Control(bus, EventLog())
    again.load_state()
    assert again.with_events == {"b", "c"}
    plane.clock.cancel_event(event_id, "b")
    control.delete("c")
    assert control.with_events == set()


def test_a_group_event_never_names_more_vms_than_a_reader_accepts(
    plane: ControlPlane, control: Control, bus: Bus
) -> None:
    # Regression: Resources defaulted to every VM's name, unchecked; past MAX_RESOURCES every
    # reader of the bus (workers, a restarted control) refused those VMs while the event lived.
    document = vm_document("v")
    document.pop("id", None)
    ids = [f"vm-{index:04d}" for index in range(events.MAX_RESOURCES + 1)]
    for index, vm_id in enumerate(ids):
        control.put(vm_id, {**document, "callers": [f"10.9.{index // 256}.{index % 256}"]})
    generations = [control.generation(vm_id) for vm_id in ids]
    with pytest.raises(UpdateError) as refused:
        plane.clock.add_event(ids, {"EventType": "Reboot"})
    assert refused.value.status == 400 and "Resources" in refused.value.message
    assert [control.generation(vm_id) for vm_id in ids] == generations  # nothing changed
    plane.clock.add_event(ids, {"EventType": "Reboot", "EventId": "E1", "Resources": ["the-scale-set"]})
    reader = VmRegistry()
    apply_entries(reader, bus.read_all(), EventLog())
    assert all(reader.stores[vm_id].current is not None for vm_id in ids)


def test_the_event_clock_survives_a_failed_bus_write(
    plane: ControlPlane, control: Control, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_clock_module, "EVENT_CLOCK_RETRY_S", 0.05)
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    real_write = bus.write
    failures = [OSError(28, "No space left on device")]

    def flaky_write(entry: BusEntry) -> None:
        if failures:
            raise failures.pop()
        real_write(entry)

    async def scenario() -> dict[str, str]:
        clock = asyncio.ensure_future(plane.clock.run())
        plane.clock.add_event(["a"], {"EventType": "Reboot", "EventId": "E1", "NotBeforeSeconds": 0.05})
        bus.write = flaky_write  # type: ignore[method-assign]  # the clock's start of E1 fails once
        deadline = asyncio.get_running_loop().time() + 5
        while asyncio.get_running_loop().time() < deadline:
            started = {event["EventId"]: event["EventStatus"] for event in control.events_of("a")["Events"]}
            if started == {"E1": "Started"}:
                break
            await asyncio.sleep(0.01)
        assert not clock.done()
        clock.cancel()
        return started

    assert asyncio.run(scenario()) == {"E1": "Started"}
    assert not failures  # it did fail once


def test_approvals_go_through_the_folder_never_inside_the_parser(
    plane: ControlPlane, control: Control, bus: Bus
) -> None:
    """One path in every topology: the approving request only drops a file; the control's watch applies it."""
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    event_id, _ = plane.clock.add_event(["a"], AT_NOW_900)

    async def scenario() -> tuple[int, int, str, str]:
        watch = await plane.clock.start_approvals_watch()
        try:
            before = control.generation("a")
            assert BusApprovals(bus.directory, bus.durable).approve("a", frozenset({event_id}))
            during = control.generation("a")  # nothing applied inside the call (the parser callback)
            loop = asyncio.get_running_loop()
            give_up_at = loop.time() + 5
            while loop.time() < give_up_at and control.events_of("a")["Events"][0]["EventStatus"] != "Started":
                await asyncio.sleep(0.01)
            return (
                before,
                during,
                control.events_of("a")["Events"][0]["EventStatus"],
                served(control, "a")["Events"][0]["EventStatus"],
            )
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    assert asyncio.run(scenario()) == (2, 2, "Started", "Started")
    assert not list((bus.directory / "approvals").glob("*.json"))  # taken

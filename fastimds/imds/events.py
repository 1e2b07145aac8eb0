"""Scheduled events: their validation, their lifecycle and their wire documents.

Rules of this module:
- Pure: every function takes the time as an argument; nothing here reads the
  clock or does I/O. The control plane runs the lifecycle
  (fastimds.control.event_clock) and writes each change as a new generation
  of the VM (fastimds.control.writer).
- A VM's events state is plain JSON, so it travels through the bus beside
  the VM description: {"DocumentIncarnation": N, "Events": [event, ...]},
  typed as `EventsState` and `ScheduledEvent` (TypedDicts: the JSON the bus
  stores, key for key). Each event holds its wire fields at the newest
  api-version, plus private fields that are never served: "startsAt"
  (NotBefore, unix seconds), "startedFor" (seconds from Started to removal),
  "endsAt" (when a Started event is removed; null while Scheduled) and
  "group" (the VM ids the event was scheduled on, fixed when it is added).
- An approval acts only within the approved event's group (`group_of`): an
  EventId alone never reaches another VM. An event stored before groups
  existed (no "group") is its own VM's only, the safe reading: an old
  scale-set event approved from one VM then starts on that VM, and the
  others start at NotBefore.
- `dict[str, Any]` only at the JSON boundary: what a user gives (checked by
  `event_problems`) and what the bus gives back (checked by `state_problems`,
  after which it is an `EventsState`).
- States are never changed in place: a change returns a new state whose
  DocumentIncarnation is one higher (Azure increments it whenever Events
  change); no change returns the same object.
- The lifecycle (spec §8): Scheduled -> Started at NotBefore or on approval
  (NotBefore becomes "") -> removed `startedFor` seconds later. A cancelled
  event just vanishes.
- Timings are Azure's (`TYPE_DEFAULTS`) unless asked otherwise: the user
  gives NotBefore, NotBeforeSeconds or StartedForSeconds, or asks with
  "CompressTimeBy": N for the defaults divided by N (N = 60 is the 15 s
  notice of Microsoft's mock server's "Dev Timing"). How long an event stays
  Started never follows DurationInSeconds, which is the impact (seconds)
  within a Started window Azure keeps for minutes.
- Version gating (spec §8): Preempt events appear from 2017-11-01 and
  Terminate events from 2019-01-01; Description from 2019-04-01, EventSource
  from 2019-08-01, DurationInSeconds from 2020-07-01. Before 2017-08-01 (the
  2017-03-01 preview) resource names carry a leading "_" (spec §4).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from typing import Any, Literal, NotRequired, TypedDict

import orjson

from fastimds.imds.preview import preview_resource
from fastimds.imds.render import CONTENT_TYPE_JSON, SERVER_HEADER, STATUS_LINES, Reply, make_reply

EVENT_TYPES = ("Freeze", "Reboot", "Redeploy", "Preempt", "Terminate")
EVENT_SOURCES = ("Platform", "User")
EVENT_STATUSES = ("Scheduled", "Started")


@dataclass(frozen=True, slots=True)
class TypeDefaults:
    """What an event of one EventType gets when the user leaves a field out (spec §8)."""

    notice_s: float  # NotBefore, counted from when the event is added: Azure's documented minimum notice
    duration_s: int  # DurationInSeconds, the impact: -1 is "unknown"
    started_for_s: float  # from Started to removal: Azure's typical time, never the impact's duration
    description: str  # Azure's text, as documented or captured ("" where a capture shows "")
    source: str  # EventSource, consistent with the description


# Per EventType; spec §8 names the source of each value. Notice: Microsoft's table of
# minimum notice. Started -> removed: the medians of events Azure sent in July 2025
# (Azure-Samples/scheduled-events-mock-server: 5 min for a Live Migration, 10 min for a
# reboot or redeploy), else the docs' typical 10 min. Descriptions: the docs' and captures'.
TYPE_DEFAULTS: dict[str, TypeDefaults] = {
    "Freeze": TypeDefaults(
        900,
        5,
        300,
        "Virtual machine is being paused because of a memory-preserving Live Migration operation.",
        "Platform",
    ),
    "Reboot": TypeDefaults(
        900, -1, 600, "Virtual machine is going to be restarted as requested by authorized user.", "User"
    ),
    "Redeploy": TypeDefaults(600, -1, 600, "Virtual machine has encountered a failure.", "Platform"),
    "Preempt": TypeDefaults(30, -1, 600, "", "Platform"),
    "Terminate": TypeDefaults(
        600, -1, 600, "Virtual machine is going to be deleted as requested by authorized user.", "User"
    ),
}
# "CompressTimeBy" divides the default notice and Started time by at most this: the longest
# default (15 min) becomes 0.25 s; more would only make states too short to poll.
MAX_TIME_COMPRESSION = 3600

# When each event type and field first appears in a response.
EVENT_TYPE_SINCE: dict[str, str] = {"Preempt": "2017-11-01", "Terminate": "2019-01-01"}
FIELD_SINCE: dict[str, str] = {
    "Description": "2019-04-01",
    "EventSource": "2019-08-01",
    "DurationInSeconds": "2020-07-01",
}
# From this version on, resource names are served as they are; the preview before it prefixed "_".
PLAIN_RESOURCES_SINCE = "2017-08-01"
# Wire order, as Azure's documented sample sends it.
WIRE_FIELDS = (
    "EventId",
    "EventStatus",
    "EventType",
    "ResourceType",
    "Resources",
    "NotBefore",
    "Description",
    "EventSource",
    "DurationInSeconds",
)
# What a VM description's "scheduledEvents" entry or an admin request may give.
INPUT_FIELDS = frozenset({*WIRE_FIELDS, "NotBeforeSeconds", "StartedForSeconds", "CompressTimeBy"})
MAX_EVENT_ID_CHARS = 64
MAX_RESOURCES = 1000
MAX_EVENTS_PER_VM = 100
# NotBeforeSeconds and StartedForSeconds are capped so that every moment they
# make is a date formatdate can write (Azure's longest notice is ~7 days).
MAX_SECONDS = 10 * 366 * 86400


class ScheduledEvent(TypedDict):
    """One event as the bus stores it: its wire fields (WIRE_FIELDS, newest api-version), then the private ones."""

    EventId: str
    EventStatus: Literal["Scheduled", "Started"]
    EventType: str
    ResourceType: str
    Resources: list[str]
    NotBefore: str  # RFC 1123; "" once Started
    Description: str
    EventSource: str
    DurationInSeconds: int
    startsAt: float  # NotBefore as unix seconds
    startedFor: float  # seconds from Started to removal
    endsAt: float | None  # when a Started event is removed; None while Scheduled
    group: NotRequired[list[str]]  # the VM ids it was scheduled on (sorted); absent before groups: its own VM


# ScheduledEvent's NotRequired keys: under `from __future__ import annotations`, Python 3.11's
# TypedDict counts them in __required_keys__ anyway.
OPTIONAL_EVENT_KEYS = frozenset({"group"})


class EventsState(TypedDict):
    """A VM's events: what the bus stores beside its description, and the admin API shows."""

    DocumentIncarnation: int
    Events: list[ScheduledEvent]


class EventsDocument(TypedDict):
    """GET /metadata/scheduledevents at one api-version: its events' fields depend on the version."""

    DocumentIncarnation: int
    Events: list[dict[str, object]]


EMPTY_STATE: EventsState = {"DocumentIncarnation": 1, "Events": []}

# The answer to an approval: 200 with no body (spec §8).
APPROVED = Reply(200, STATUS_LINES[200] + SERVER_HEADER + b"Content-Length: 0\r\n", b"")


class EventError(Exception):
    """A request about events that cannot be done; `status` is the admin API's answer."""

    def __init__(self, status: int, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems or []


# ---- validating what users give ----


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_not_before(text: str) -> float | None:
    """An RFC 1123 date ("Mon, 11 Apr 2026 22:26:58 GMT") as unix seconds; None if it is not one."""
    try:
        moment = parsedate_to_datetime(text)
        if moment.tzinfo is None:
            return None
        seconds = moment.timestamp()
        formatdate(seconds, usegmt=True)  # past year 9999 once in GMT ("Fri, 31 Dec 9999 23:59:59 -1200")
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return seconds


def event_problems(value: Any, path: str) -> list[str]:
    """Every problem with one event as a user gives it, each naming its JSON path."""
    if not isinstance(value, dict):
        return [f"{path}: expected an object"]
    problems = [f"{path}.{key}: unknown key" for key in sorted(set(value) - INPUT_FIELDS)]
    event_type = value.get("EventType")
    if event_type not in EVENT_TYPES:
        problems.append(f"{path}.EventType: required, one of {', '.join(EVENT_TYPES)}")
    event_id = value.get("EventId")
    if "EventId" in value and not (
        isinstance(event_id, str) and 0 < len(event_id) <= MAX_EVENT_ID_CHARS and event_id.isprintable()
    ):
        problems.append(f"{path}.EventId: a non-empty printable string of at most {MAX_EVENT_ID_CHARS} characters")
    for key, allowed in (
        ("EventStatus", EVENT_STATUSES),
        ("EventSource", EVENT_SOURCES),
        ("ResourceType", ("VirtualMachine",)),
    ):
        if key in value and value[key] not in allowed:
            problems.append(f"{path}.{key}: one of {', '.join(allowed)}")
    resources = value.get("Resources")
    if "Resources" in value and not (
        isinstance(resources, list)
        and 0 < len(resources) <= MAX_RESOURCES
        and all(isinstance(name, str) and name for name in resources)
    ):
        problems.append(f"{path}.Resources: a non-empty array of non-empty strings (at most {MAX_RESOURCES})")
    if "Description" in value and not isinstance(value["Description"], str):
        problems.append(f"{path}.Description: a string")
    duration = value.get("DurationInSeconds")
    if "DurationInSeconds" in value and not (
        isinstance(duration, int) and not isinstance(duration, bool) and duration >= -1
    ):
        problems.append(f"{path}.DurationInSeconds: a whole number, -1 (unknown) or more")
    if "NotBefore" in value and "NotBeforeSeconds" in value:
        problems.append(f"{path}: NotBefore and NotBeforeSeconds exclude each other")
    not_before = value.get("NotBefore")
    if "NotBefore" in value and not (isinstance(not_before, str) and parse_not_before(not_before) is not None):
        problems.append(f"{path}.NotBefore: an RFC 1123 date such as 'Mon, 11 Apr 2026 22:26:58 GMT'")
    for key in ("NotBeforeSeconds", "StartedForSeconds"):
        if key in value and not (_is_number(value[key]) and 0 <= value[key] <= MAX_SECONDS):
            problems.append(f"{path}.{key}: a number of seconds, from 0 to {MAX_SECONDS}")
    if "CompressTimeBy" in value and not (
        _is_number(value["CompressTimeBy"]) and 1 <= value["CompressTimeBy"] <= MAX_TIME_COMPRESSION
    ):
        problems.append(f"{path}.CompressTimeBy: a number from 1 to {MAX_TIME_COMPRESSION}")
    return problems


def make_event(
    value: dict[str, Any], now: float, default_resources: list[str], group: list[str] | None = None
) -> ScheduledEvent:
    """A full event (wire fields and timing) from a validated user event, as of `now`.

    `group`: the VM ids it is scheduled on, stored with it (an approval acts
    within them only); None stores none, which reads as its own VM only.
    """
    event_type = value["EventType"]
    defaults = TYPE_DEFAULTS[event_type]
    # Only the timings chosen here are compressed: a time the user gives is taken as given.
    compression = float(value.get("CompressTimeBy", 1))
    duration = value.get("DurationInSeconds", defaults.duration_s)
    if "NotBefore" in value:
        starts_at = parse_not_before(value["NotBefore"])
        assert starts_at is not None  # event_problems checked it
    else:
        starts_at = now + float(value.get("NotBeforeSeconds", defaults.notice_s / compression))
    started_for = float(value.get("StartedForSeconds", defaults.started_for_s / compression))
    event: ScheduledEvent = {
        "EventId": value.get("EventId") or str(uuid.uuid4()).upper(),
        "EventStatus": "Scheduled",
        "EventType": event_type,
        "ResourceType": value.get("ResourceType", "VirtualMachine"),
        "Resources": list(value.get("Resources") or default_resources),
        "NotBefore": formatdate(starts_at, usegmt=True),
        "Description": value.get("Description", defaults.description),
        "EventSource": value.get("EventSource", defaults.source),
        "DurationInSeconds": duration,
        "startsAt": starts_at,
        "startedFor": started_for,
        "endsAt": None,
    }
    if group is not None:
        event["group"] = sorted(set(group))
    if value.get("EventStatus") == "Started":
        event = _started(event, now)
    return event


def state_problems(state: Any) -> list[str]:
    """What is wrong with an events state read back from the bus (a hand-edited state dir, say)."""
    if not isinstance(state, dict) or not isinstance(state.get("DocumentIncarnation"), int):
        return ["events: expected {'DocumentIncarnation': int, 'Events': [...]}"]
    events = state.get("Events")
    if not isinstance(events, list):
        return ["events.Events: expected an array"]
    problems = []
    for index, event in enumerate(events):
        path = f"events.Events[{index}]"
        if not isinstance(event, dict):
            problems.append(f"{path}: expected an object")
            continue
        missing = sorted(ScheduledEvent.__required_keys__ - OPTIONAL_EVENT_KEYS - set(event))
        if missing:
            problems.append(f"{path}: missing {', '.join(missing)}")
        # NotBefore is checked on its own: a Started event's is "".
        given = {key: value for key, value in event.items() if key in INPUT_FIELDS and key != "NotBefore"}
        problems.extend(event_problems(given, path))
        if not isinstance(event.get("EventId"), str) or not isinstance(event.get("NotBefore"), str):
            problems.append(f"{path}: EventId and NotBefore are required strings")
        if not (_is_number(event.get("startsAt")) and _is_number(event.get("startedFor"))):
            problems.append(f"{path}: startsAt and startedFor are required numbers")
        if event.get("endsAt") is not None and not _is_number(event["endsAt"]):
            problems.append(f"{path}.endsAt: a number or null")
        elif event.get("EventStatus") == "Started" and event.get("endsAt") is None:
            problems.append(f"{path}.endsAt: a Started event's is a number (when it is removed)")
        group = event.get("group")
        if "group" in event and not (
            isinstance(group, list) and group and all(isinstance(vm_id, str) and vm_id for vm_id in group)
        ):
            problems.append(f"{path}.group: a non-empty array of VM ids (or absent: its own VM)")
    return problems


# ---- the lifecycle ----


def _started(event: ScheduledEvent, now: float) -> ScheduledEvent:
    return {**event, "EventStatus": "Started", "NotBefore": "", "endsAt": now + event["startedFor"]}


def _next(state: EventsState, events: list[ScheduledEvent]) -> EventsState:
    return {"DocumentIncarnation": state["DocumentIncarnation"] + 1, "Events": events}


def _changes_at(event: ScheduledEvent) -> float:
    """When `advance` next changes `event`: its start while Scheduled, its removal once Started."""
    if event["EventStatus"] == "Scheduled":
        return event["startsAt"]
    ends_at = event["endsAt"]
    assert ends_at is not None  # _started sets it; state_problems refuses a Started event without it
    return ends_at


def event_ids(state: EventsState | None) -> frozenset[str]:
    return frozenset(event["EventId"] for event in state["Events"]) if state is not None else frozenset()


def find(state: EventsState | None, event_id: str) -> ScheduledEvent | None:
    """The event `event_id` of `state`; None if it has none."""
    if state is not None:
        for event in state["Events"]:
            if event["EventId"] == event_id:
                return event
    return None


def group_of(event: ScheduledEvent, holder: str) -> frozenset[str]:
    """The VMs an approval of `event`, held by VM `holder`, may start it on (see the module rules)."""
    group = event.get("group")
    return frozenset(group) if group is not None else frozenset({holder})


def add(state: EventsState | None, event: ScheduledEvent) -> EventsState:
    """`state` with `event` added; EventError if its EventId is taken or the VM has too many."""
    state = state if state is not None else EMPTY_STATE
    if event["EventId"] in event_ids(state):
        raise EventError(409, f"event {event['EventId']} already exists")
    if len(state["Events"]) >= MAX_EVENTS_PER_VM:
        raise EventError(409, f"a VM holds at most {MAX_EVENTS_PER_VM} events")
    return _next(state, [*state["Events"], event])


def with_events(state: EventsState | None, events: list[ScheduledEvent]) -> EventsState:
    """A VM's events replaced wholesale (its description's list changed).

    No state reads as EMPTY_STATE (incarnation 1, no events), so events that
    appear where there were none make incarnation 2, as `add` does.
    """
    if state is None and not events:
        return EMPTY_STATE
    return _next(state if state is not None else EMPTY_STATE, events)


def cancel(state: EventsState | None, event_id: str) -> EventsState:
    """`state` without the event; EventError(404) if it has no such event."""
    if event_id not in event_ids(state):
        raise EventError(404, f"no event {event_id}")
    assert state is not None
    return _next(state, [event for event in state["Events"] if event["EventId"] != event_id])


def scheduled_ids(state: EventsState | None) -> frozenset[str]:
    """The EventIds of `state` still Scheduled: the only ones an approval can change."""
    if state is None:
        return frozenset()
    return frozenset(event["EventId"] for event in state["Events"] if event["EventStatus"] == "Scheduled")


def approve(state: EventsState | None, approved: frozenset[str], now: float) -> EventsState | None:
    """Start the approved events that are still Scheduled (approving a Started one is a no-op).

    Which VMs an approval reaches is the caller's business (`group_of`): this
    starts the ids on the one state it is given.
    """
    if state is None or not any(
        event["EventId"] in approved and event["EventStatus"] == "Scheduled" for event in state["Events"]
    ):
        return state
    events = [
        _started(event, now) if event["EventId"] in approved and event["EventStatus"] == "Scheduled" else event
        for event in state["Events"]
    ]
    return _next(state, events)


def advance(state: EventsState | None, now: float) -> EventsState | None:
    """Start the events whose NotBefore has come and remove the ones whose time is up."""
    if state is None:
        return None
    events = []
    changed = False
    for event in state["Events"]:
        current = event
        if current["EventStatus"] == "Scheduled" and current["startsAt"] <= now:
            current, changed = _started(current, now), True
        if current["EventStatus"] == "Started" and _changes_at(current) <= now:
            changed = True
            continue
        events.append(current)
    return _next(state, events) if changed else state


def next_change(state: EventsState | None) -> float | None:
    """When `advance` will next change `state` (unix seconds); None if never."""
    if state is None:
        return None
    return min((_changes_at(event) for event in state["Events"]), default=None)


# ---- what the endpoint answers ----


def document_at(state: EventsState | None, version: str) -> EventsDocument:
    """The wire document at `version`: gated event types and fields, no private fields."""
    state = state if state is not None else EMPTY_STATE
    events: list[dict[str, object]] = []
    for event in state["Events"]:
        if EVENT_TYPE_SINCE.get(event["EventType"], "") > version:
            continue
        fields: dict[str, object] = {**event}
        if version < PLAIN_RESOURCES_SINCE:
            fields["Resources"] = [preview_resource(name) for name in event["Resources"]]
        events.append({key: fields[key] for key in WIRE_FIELDS if FIELD_SINCE.get(key, "") <= version})
    return {"DocumentIncarnation": state["DocumentIncarnation"], "Events": events}


def reply_at(state: EventsState | None, version: str) -> Reply:
    """GET /metadata/scheduledevents at `version`, in Azure's field order (not key-sorted)."""
    return make_reply(200, orjson.dumps(document_at(state, version)), CONTENT_TYPE_JSON)


def approval_ids(body: bytes) -> list[str] | None:
    """The EventIds of an approval body ({"StartRequests": [{"EventId": ...}, ...]}); None if malformed."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    requests = value.get("StartRequests") if isinstance(value, dict) else None
    if not isinstance(requests, list) or not requests:
        return None
    ids = []
    for request in requests:
        event_id = request.get("EventId") if isinstance(request, dict) else None
        if not isinstance(event_id, str) or not event_id:
            return None
        ids.append(event_id)
    return ids

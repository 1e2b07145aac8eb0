"""Fault injection: make chosen requests fail the ways Azure's IMDS can, on purpose.

Rules of this module:
- A fault answers the requests it matches (one VM, some VMs or all; a target
  prefix) with a status Azure documents for retry (410, 429, 500, 503), adds
  latency to their replies, or resets their connections; for a duration, for
  a count, or until removed. Users test their clients' retry logic with it.
- The control plane owns the list (admin API) and writes it to the bus as one
  file, FAULTS_FILE, whose name is no VM id; every worker loads it into its
  `FaultTable`. A fault's count is shared by every worker: it lives in a
  slot of `FaultBudgets`, shared memory the server makes once at start
  (before any fork) and passes to the control plane and to every worker's
  table, taken under a lock, so "fail the next 3 requests" means 3 however
  many workers. Nothing here is made at import.
- Free when unused: the request memo answers known requests without the
  parser, so faults are checked on the parser path only, and every load
  empties the memos filled before it (`depend`); a faulted reply is never
  remembered, and a request a fault could match is never answered from the
  memo while that fault lives. With no live fault the check is one attribute
  test per parsed request.
- Every injected fault is counted in telemetry (fastimds.ops.telemetry FAULT_KINDS).
- A stored fault is a `FaultRecord` (a TypedDict: the JSON of the faults file
  and of the admin API, key for key). `dict[str, Any]` only at the JSON
  boundary: what a user gives (`fault_problems`) and what the file gives
  back (`parse_records`, which checks every field before it is a record).
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
import struct
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, TypedDict

from fastimds.imds.render import Reply, json_reply

STATUSES = (410, 429, 500, 503)
MAX_LATENCY_MS = 600_000  # ten minutes: longer than any client waits
MAX_DURATION_S = 7 * 24 * 3600
MAX_FAULTS = 1000
INPUT_FIELDS = frozenset({"status", "latencyMs", "reset", "path", "durationSeconds", "count", "retryAfter"})

# Bodies in the words of Azure's error table (spec §3.5); identity requests get
# the identity family's shape, which their clients parse.
_MESSAGES = {
    410: "Retry after some time for a max of 70 seconds",
    429: "Too many requests",
    500: "Internal server error. Retry later",
    503: "Internal service unavailable. Retry later",
}
_IDENTITY_ERRORS = {410: "service_unavailable", 429: "throttled", 500: "unknown_error", 503: "service_unavailable"}


class FaultRecord(TypedDict):
    """One injected fault as the faults file, the admin API and the event log show it."""

    id: str
    slot: int  # its count's slot in FaultBudgets
    vms: list[str] | None  # None: every VM, present and future
    path: str  # the target prefix it matches (case-insensitive)
    status: int | None  # one of STATUSES; None for latency or reset
    latencyMs: int | None
    reset: bool
    retryAfter: int | None  # seconds, sent in Retry-After
    until: float | None  # unix seconds; None: no duration
    count: int | None  # how many requests it takes; None: no count
    created: float  # unix seconds


class FaultBudgets:
    """What is left of each fault's count, in memory every process shares (one int64 slot per fault).

    The lock is a process-shared semaphore, waited on at most LOCK_WAIT_S: a
    worker killed while holding it (a window of microseconds) must not freeze
    the others, so a count that cannot be taken in time counts as spent.

    Made before any fork, so every process maps the same memory. A table or
    control plane made without one (a test, a tool) makes its own, private.
    """

    _SLOT = struct.Struct("<q")
    LOCK_WAIT_S = 0.05

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.memory = mmap.mmap(-1, slots * self._SLOT.size)  # anonymous and shared: children see writes
        try:
            self.lock: Any = multiprocessing.get_context("fork").Lock()
        except OSError:  # no POSIX semaphores (no /dev/shm): counts stay exact within one process only
            self.lock = threading.Lock()
        # Where free_slot looks first. Only the control plane hands out slots;
        # each process has its own copy of this cursor, as it had of the module
        # global it replaces.
        self.next_slot = 0

    def set(self, slot: int, remaining: int) -> None:
        locked = self.lock.acquire(timeout=self.LOCK_WAIT_S)
        try:
            self._SLOT.pack_into(self.memory, slot * self._SLOT.size, remaining)
        finally:
            if locked:
                self.lock.release()

    def take(self, slot: int) -> bool:
        """Use one of the slot's count; False if none is left (or the lock could not be had)."""
        if not self.lock.acquire(timeout=self.LOCK_WAIT_S):
            return False
        try:
            (remaining,) = self._SLOT.unpack_from(self.memory, slot * self._SLOT.size)
            if remaining <= 0:
                return False
            self._SLOT.pack_into(self.memory, slot * self._SLOT.size, remaining - 1)
            return True
        finally:
            self.lock.release()

    def left(self, slot: int) -> int:
        return int(self._SLOT.unpack_from(self.memory, slot * self._SLOT.size)[0])

    def free_slot(self, records: list[FaultRecord]) -> int:
        """A slot no live record holds: the first after the last one given, round the ring.

        Slots are reused as late as possible: a worker that has not reloaded the
        list yet still holds spent and removed faults, and one whose slot had a
        new count would come back to life on that count.
        """
        taken = {record["slot"] for record in records}
        start = self.next_slot
        slot = next(slot % self.slots for slot in range(start, start + self.slots) if slot % self.slots not in taken)
        self.next_slot = (slot + 1) % self.slots
        return slot


def fault_problems(value: Any) -> list[str]:
    """Every problem with a fault as a user gives it."""
    if not isinstance(value, dict):
        return ["$: expected an object"]
    problems = [f"$.{key}: unknown key" for key in sorted(set(value) - INPUT_FIELDS)]
    actions = [key for key in ("status", "latencyMs", "reset") if key in value]
    if len(actions) != 1:
        problems.append("$: give exactly one of status, latencyMs, reset")
    if "status" in value and not (_whole(value["status"], 0, 999) and value["status"] in STATUSES):  # 500.0 == 500
        problems.append(f"$.status: one of {', '.join(map(str, STATUSES))}")
    if "latencyMs" in value and not _whole(value["latencyMs"], 1, MAX_LATENCY_MS):
        problems.append(f"$.latencyMs: a whole number from 1 to {MAX_LATENCY_MS}")
    if "reset" in value and value["reset"] is not True:
        problems.append("$.reset: true")
    if "path" in value and not (
        isinstance(value["path"], str) and value["path"].startswith("/") and value["path"].isascii()
    ):
        problems.append("$.path: an ASCII target prefix starting with '/', such as '/metadata/instance'")
    duration = value.get("durationSeconds")
    if duration is not None and not (
        isinstance(duration, (int, float))
        and not isinstance(duration, bool)
        and math.isfinite(duration)
        and 0 < duration <= MAX_DURATION_S
    ):
        problems.append(f"$.durationSeconds: a number of seconds above 0, at most {MAX_DURATION_S}")
    if "count" in value and not _whole(value["count"], 1, 2**31):
        problems.append("$.count: a whole number, 1 or more")
    if "retryAfter" in value and not _whole(value["retryAfter"], 0, 3600):
        problems.append("$.retryAfter: whole seconds from 0 to 3600")
    if "retryAfter" in value and value.get("status") not in (429, 503):
        problems.append("$.retryAfter: only with status 429 or 503")
    return problems


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What each field of a stored record may hold: what make_fault makes from a valid fault.
_RECORD_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "id": (lambda value: isinstance(value, str) and value != "", "a non-empty string"),
    "slot": (lambda value: _whole(value, 0, MAX_FAULTS - 1), f"a whole number from 0 to {MAX_FAULTS - 1}"),
    "vms": (
        lambda value: value is None or (isinstance(value, list) and all(isinstance(vm, str) for vm in value)),
        "null or an array of strings",
    ),
    "path": (lambda value: isinstance(value, str), "a string"),
    "status": (lambda value: value is None or (_whole(value, 0, 999) and value in STATUSES), "null or a status"),
    "latencyMs": (lambda value: value is None or _whole(value, 1, MAX_LATENCY_MS), "null or milliseconds"),
    "reset": (lambda value: isinstance(value, bool), "true or false"),
    "retryAfter": (lambda value: value is None or _whole(value, 0, 3600), "null or whole seconds"),
    "until": (lambda value: value is None or _number(value), "null or a number"),
    "count": (lambda value: value is None or _whole(value, 1, 2**31), "null or a whole number"),
    "created": (_number, "a number"),
}


def parse_records(value: Any) -> list[FaultRecord]:
    """The records of a faults file's "faults" list; ValueError naming every problem if any is not one."""
    if not isinstance(value, list):
        raise ValueError("'faults' must be a list of objects")
    problems = []
    for index, record in enumerate(value):
        if not isinstance(record, dict):
            problems.append(f"faults[{index}]: expected an object")
            continue
        for key, (valid, expected) in _RECORD_FIELDS.items():
            if key not in record:
                problems.append(f"faults[{index}].{key}: missing")
            elif not valid(record[key]):
                problems.append(f"faults[{index}].{key}: {expected}")
    if problems:
        raise ValueError("; ".join(problems))
    return value  # every element checked above: each is a FaultRecord


def make_fault(
    value: dict[str, Any], vms: list[str] | None, now: float, slot: int, budgets: FaultBudgets
) -> FaultRecord:
    """The stored record of a validated fault, as of `now`; its count (if any) goes in `budgets` at `slot`."""
    duration = value.get("durationSeconds")
    if value.get("count") is not None:
        budgets.set(slot, value["count"])
    return {
        "id": uuid.uuid4().hex[:12],
        "slot": slot,
        "vms": vms,
        "path": value.get("path", "/metadata"),
        "status": value.get("status"),
        "latencyMs": value.get("latencyMs"),
        "reset": value.get("reset", False),
        "retryAfter": value.get("retryAfter", 1 if value.get("status") == 429 else None),
        "until": now + duration if duration is not None else None,
        "count": value.get("count"),
        "created": now,
    }


def live(records: Iterable[FaultRecord], now: float, budgets: FaultBudgets) -> list[FaultRecord]:
    """The records whose duration has not run out and whose count (in `budgets`) is not used up."""
    return [
        record
        for record in records
        if (record["until"] is None or record["until"] > now)
        and (record["count"] is None or budgets.left(record["slot"]) > 0)
    ]


def kind_of(record: FaultRecord) -> str:
    """Its telemetry label: the status, "latency" or "reset"."""
    if record["status"] is not None:
        return str(record["status"])
    return "latency" if record["latencyMs"] is not None else "reset"


class Fault:
    """One loaded fault, ready to apply: what it matches and its pre-rendered replies."""

    __slots__ = ("id", "vms", "path", "kind", "reply", "identity_reply", "latency_s", "until", "slot", "counted")

    def __init__(self, record: FaultRecord) -> None:
        self.id: str = record["id"]
        self.vms: frozenset[str] | None = frozenset(record["vms"]) if record["vms"] is not None else None
        self.path: bytes = record["path"].lower().encode("latin-1", "replace")
        self.kind = kind_of(record)
        status = record["status"]
        self.reply: Reply | None = None
        self.identity_reply: Reply | None = None
        if status is not None:
            retry = record["retryAfter"]
            headers = f"Retry-After: {retry}\r\n".encode() if retry is not None else b""
            self.reply = json_reply(status, {"error": _MESSAGES[status]}, extra_headers=headers)
            identity_body = {"error": _IDENTITY_ERRORS[status], "error_description": _MESSAGES[status]}
            self.identity_reply = json_reply(status, identity_body, extra_headers=headers)
        self.latency_s = record["latencyMs"] / 1000 if record["latencyMs"] is not None else 0.0
        self.until: float | None = record["until"]
        self.slot: int = record["slot"]
        self.counted = record["count"] is not None  # its count is in the table's budgets, at `slot`


class FaultTable:
    """A worker's faults; `active` is False whenever no fault can match.

    `budgets` holds the counts: the server's, shared by every process, or
    without one (tests) private ones made here.

    A cache of replies decided while these faults held (the http layer's
    request memo) registers with `depend`, and every `load` empties every
    registered cache: a fault change clears memos here, in one place, and
    no request pays a check for it. A cache is held weakly: one that dies
    with its snapshot drops out by itself.
    """

    __slots__ = ("faults", "active", "budgets", "dependents")

    def __init__(self, budgets: FaultBudgets | None = None) -> None:
        self.faults: list[Fault] = []
        self.active = False
        self.budgets = budgets if budgets is not None else FaultBudgets(MAX_FAULTS)
        # By id: a cache may be an unhashable dict. An entry leaves when its cache dies.
        self.dependents: weakref.WeakValueDictionary[int, MutableMapping[Any, Any]] = weakref.WeakValueDictionary()

    def depend(self, cache: MutableMapping[Any, Any]) -> None:
        """`cache` holds what was decided under these faults: every later `load` empties it."""
        self.dependents[id(cache)] = cache

    def load(self, records: list[FaultRecord], now: float) -> None:
        """Replace the faults (all or nothing: a bad record raises and changes nothing), and empty the caches."""
        faults = [Fault(record) for record in live(records, now, self.budgets)]
        self.faults = faults
        self.active = bool(faults)
        for cache in list(self.dependents.values()):
            cache.clear()

    def match(self, vm_id: str, target: bytes, now: float) -> Fault | None:
        """The fault that takes this request (using one of its count), or None."""
        lowered = target.lower()
        budgets = self.budgets
        live_left = False
        for fault in self.faults:
            if (fault.until is not None and fault.until <= now) or (fault.counted and budgets.left(fault.slot) <= 0):
                continue
            live_left = True
            if (fault.vms is None or vm_id in fault.vms) and lowered.startswith(fault.path):
                if fault.counted and not budgets.take(fault.slot):
                    continue  # another worker took the last of its count just now
                return fault
        if not live_left:
            self.active = False  # every fault ran out: back to the free path
        return None

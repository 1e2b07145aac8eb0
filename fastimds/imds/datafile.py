"""VM description files: parse, validate, normalise.

Rules of this module:
- Validation collects every problem, each with its JSON path, before giving
  up; a user fixing a file should see all of them at once.
- Nothing half-valid leaves this module: `load_vm` either returns a complete
  normalised `VmDescription` or raises `DataError`.
- Normalising turns every number and boolean of the instance document into
  the string Azure would send ("36", "true"), and null into "" (Azure's
  "missing value"). After it, the instance tree holds only dicts, lists and
  strings.
- `extended` is not normalised: its values keep the JSON types the file gives
  them, because clients read them typed (cloud-init tests
  `extended.compute.hasCustomData` as a JSON boolean; a string "false" would
  be truthy: spec §3.7).

File format: a JSON object with the key "instance" (the instance document at
the latest schema) and optional reserved keys for other endpoints.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fastimds.imds.events import MAX_EVENTS_PER_VM, EventsState, event_problems
from fastimds.imds.versions import INSTANCE_FIELD_KIND, child_pattern

# A data file larger than this is refused before parsing: a VM description is
# a few KiB (the sample is 5 KiB), so 1 MiB leaves room and caps build cost.
MAX_VM_FILE_BYTES = 1024 * 1024
# Deeper nesting than this is refused: the real schema is 7 levels deep.
MAX_NESTING_DEPTH = 32

# Sections for the other endpoints, type-checked here and validated below.
RESERVED_KEYS: dict[str, type] = {
    "id": str,
    "callers": list,
    "identities": dict,
    "loadbalancer": dict,
    "scheduledEvents": list,
}
TOP_LEVEL_KEYS = frozenset({"instance", "extended", *RESERVED_KEYS})

# `extended.compute` when the file leaves a key out: a boolean, as cloud-init reads it (spec §3.7).
EXTENDED_DEFAULTS: dict[str, Any] = {"ppsType": "None", "hasCustomData": False}

SAMPLE_NAME = "sample_vm.json"

# VM ids name files in --data-dir and --state-dir and appear in admin URLs.
VM_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class DataError(Exception):
    """A VM description that cannot be served; `problems` lists every reason."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True)
class VmDescription:
    """A validated, normalised VM description."""

    instance: dict[str, Any]
    extended: dict[str, Any]
    source: str
    reserved: dict[str, Any] = field(default_factory=dict)
    document: dict[str, Any] = field(default_factory=dict)  # as given, before normalising
    # The live scheduled events (fastimds.imds.events), set by the control plane, never by a file.
    scheduled: EventsState | None = None


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "leaf"


_KIND_WORDS = {"object": "an object", "array": "an array", "leaf": "a string, number or boolean"}


def _check_tree(value: Any, json_path: str, pattern: str, depth: int, problems: list[str]) -> None:
    """Check keys, depth and the kinds of known fields below `value`."""
    if depth > MAX_NESTING_DEPTH:
        problems.append(f"{json_path}: nested deeper than {MAX_NESTING_DEPTH} levels")
        return
    expected = INSTANCE_FIELD_KIND.get(pattern)
    actual = _kind(value)
    if expected is not None and expected != actual:
        problems.append(f"{json_path}: expected {_KIND_WORDS[expected]}, got {_json_type(value)}")
        return
    if isinstance(value, dict):
        for key, child in value.items():
            if not key or "/" in key or not key.isprintable():
                # "/" would split its path; a control character would split its text listing.
                problems.append(f"{json_path}: key {key!r} is empty or contains '/' or a control character")
                continue
            _check_tree(child, f"{json_path}.{key}", child_pattern(pattern, key), depth + 1, problems)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            _check_tree(child, f"{json_path}[{index}]", child_pattern(pattern, index), depth + 1, problems)


# The load balancer section, as /metadata/loadbalancer returns it under "loadbalancer":
# each list's entries and the type of each of their fields (ports are numbers, as Azure sends).
LOADBALANCER_FIELDS: dict[str, dict[str, type]] = {
    "publicIpAddresses": {"frontendIpAddress": str, "privateIpAddress": str},
    "inboundRules": {
        "frontendIpAddress": str,
        "protocol": str,
        "frontendPort": int,
        "backendPort": int,
        "privateIpAddress": str,
    },
    "outboundRules": {"frontendIpAddress": str, "privateIpAddress": str},
}


def _loadbalancer_problems(section: dict[str, Any]) -> list[str]:
    problems = []
    for key in sorted(set(section) - set(LOADBALANCER_FIELDS)):
        problems.append(f"$.loadbalancer.{key}: unknown key (allowed: {', '.join(LOADBALANCER_FIELDS)})")
    for key, fields in LOADBALANCER_FIELDS.items():
        entries = section.get(key, [])
        if not isinstance(entries, list):
            problems.append(f"$.loadbalancer.{key}: expected an array, got {_json_type(entries)}")
            continue
        for index, entry in enumerate(entries):
            path = f"$.loadbalancer.{key}[{index}]"
            if not isinstance(entry, dict):
                problems.append(f"{path}: expected an object, got {_json_type(entry)}")
                continue
            for name, kind in fields.items():
                value = entry.get(name)
                if value is None:
                    problems.append(f"{path}.{name}: required key is missing")
                elif not isinstance(value, kind) or isinstance(value, bool):
                    expected = "a number" if kind is int else "a string"
                    problems.append(f"{path}.{name}: expected {expected}, got {_json_type(value)}")
            for name in sorted(set(entry) - set(fields)):
                problems.append(f"{path}.{name}: unknown key")
    return problems


def _identities_problems(section: dict[str, Any]) -> list[str]:
    """The managed identities: {"tenantId", "systemAssigned": {...}, "userAssigned": [{...}]}."""
    problems = []
    for key in sorted(set(section) - {"tenantId", "systemAssigned", "userAssigned"}):
        problems.append(f"$.identities.{key}: unknown key (allowed: tenantId, systemAssigned, userAssigned)")
    if not isinstance(section.get("tenantId"), str):
        problems.append("$.identities.tenantId: required, a string")
    identities: list[tuple[str, Any, tuple[str, ...]]] = []
    if "systemAssigned" in section:
        identities.append(("$.identities.systemAssigned", section["systemAssigned"], ("clientId", "objectId")))
    user_assigned = section.get("userAssigned", [])
    if not isinstance(user_assigned, list):
        problems.append(f"$.identities.userAssigned: expected an array, got {_json_type(user_assigned)}")
        user_assigned = []
    for index, entry in enumerate(user_assigned):
        path = f"$.identities.userAssigned[{index}]"
        identities.append((path, entry, ("clientId", "objectId", "resourceId")))
    for path, entry, fields in identities:
        if not isinstance(entry, dict):
            problems.append(f"{path}: expected an object, got {_json_type(entry)}")
            continue
        for name in fields:
            if not isinstance(entry.get(name), str) or not entry[name]:
                problems.append(f"{path}.{name}: required, a non-empty string")
    return problems


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def validate_document(doc: Any) -> list[str]:
    """Every problem with a parsed VM description, each naming its JSON path."""
    if not isinstance(doc, dict):
        return [f"$: expected an object with the key 'instance', got {_json_type(doc)}"]
    problems: list[str] = []
    for key in sorted(set(doc) - TOP_LEVEL_KEYS):
        allowed = ", ".join(sorted(TOP_LEVEL_KEYS))
        problems.append(f"$.{key}: unknown top-level key (allowed: {allowed})")
    for key, expected_type in RESERVED_KEYS.items():
        if key in doc and not isinstance(doc[key], expected_type):
            problems.append(f"$.{key}: expected {_KIND_WORDS[_kind(expected_type())]}, got {_json_type(doc[key])}")

    if isinstance(doc.get("id"), str) and not VM_ID_PATTERN.fullmatch(doc["id"]):
        problems.append(f"$.id: {doc['id']!r} is not a VM id (letters, digits, '.', '_', '-'; at most 128)")
    if isinstance(doc.get("callers"), list):
        for index, address in enumerate(doc["callers"]):
            problem = _caller_problem(address)
            if problem:
                problems.append(f"$.callers[{index}]: {address!r} {problem}")

    instance = doc.get("instance")
    if instance is None:
        problems.append("$.instance: required key is missing")
    elif not isinstance(instance, dict):
        problems.append(f"$.instance: expected an object, got {_json_type(instance)}")
    else:
        for section in ("compute", "network"):
            if section not in instance:
                problems.append(f"$.instance.{section}: required key is missing")
        _check_tree(instance, "$.instance", "", 1, problems)

    if isinstance(doc.get("loadbalancer"), dict):
        problems.extend(_loadbalancer_problems(doc["loadbalancer"]))
    if isinstance(doc.get("identities"), dict):
        problems.extend(_identities_problems(doc["identities"]))
    if isinstance(doc.get("scheduledEvents"), list):
        if len(doc["scheduledEvents"]) > MAX_EVENTS_PER_VM:
            problems.append(f"$.scheduledEvents: at most {MAX_EVENTS_PER_VM} events")
        given_ids = []
        for index, event in enumerate(doc["scheduledEvents"]):
            problems.extend(event_problems(event, f"$.scheduledEvents[{index}]"))
            if isinstance(event, dict) and isinstance(event.get("EventId"), str):
                given_ids.append(event["EventId"])
        for event_id in sorted({event_id for event_id in given_ids if given_ids.count(event_id) > 1}):
            problems.append(f"$.scheduledEvents: EventId {event_id!r} is given more than once")

    extended = doc.get("extended")
    if extended is not None:
        if not isinstance(extended, dict) or set(extended) - {"compute"}:
            problems.append("$.extended: expected an object whose only key is 'compute'")
        elif not isinstance(extended.get("compute", {}), dict):
            problems.append(f"$.extended.compute: expected an object, got {_json_type(extended['compute'])}")
        else:
            for key, value in extended.get("compute", {}).items():
                if _kind(value) != "leaf":
                    problems.append(f"$.extended.compute.{key}: expected {_KIND_WORDS['leaf']}")
    return problems


def _is_ip_address(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _caller_problem(value: Any) -> str | None:
    """What is wrong with one "callers" entry, or None (fastimds.imds.registry keys callers)."""
    if not _is_ip_address(value):
        return "is not an IPv4 or IPv6 address"
    address = ipaddress.ip_address(value.partition("%")[0])
    zone = value.partition("%")[2]
    if isinstance(address, ipaddress.IPv6Address) and address.is_link_local and not (zone.isdigit() and zone.isascii()):
        # Link-local addresses repeat on every link: the zone says which link, as the socket reports it.
        return "is link-local: give its zone as the interface index, e.g. fe80::1%2 (`ip link` shows the index)"
    return None


def normalise(value: Any) -> Any:
    """Serve every primitive as a string, as Azure does."""
    if isinstance(value, dict):
        return {key: normalise(child) for key, child in value.items()}
    if isinstance(value, list):
        return [normalise(child) for child in value]
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value


def parse_vm(raw: bytes, source: str) -> VmDescription:
    """Parse, validate and normalise one VM description, or raise DataError."""
    if len(raw) > MAX_VM_FILE_BYTES:
        raise DataError(source, [f"$: file is {len(raw)} bytes, over the {MAX_VM_FILE_BYTES}-byte limit"])
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DataError(source, [f"$: not valid JSON: {exc}"]) from None
    return describe_vm(doc, source)


def describe_vm(doc: Any, source: str) -> VmDescription:
    """Validate and normalise an already parsed VM description, or raise DataError."""
    problems = validate_document(doc)
    if problems:
        raise DataError(source, problems)
    extended_compute = dict(EXTENDED_DEFAULTS)
    extended_compute.update((doc.get("extended") or {}).get("compute", {}))  # "extended": null is no extended
    return VmDescription(
        instance=normalise(doc["instance"]),
        extended={"compute": extended_compute},  # typed as given: leaves only, checked above
        source=source,
        reserved={key: doc[key] for key in RESERVED_KEYS if key in doc},
        document=doc,
    )


def load_vm(path: Path | None) -> VmDescription:
    """Load a VM description file; None loads the embedded sample VM."""
    if path is None:
        raw = importlib.resources.files("fastimds").joinpath(SAMPLE_NAME).read_bytes()
        return parse_vm(raw, f"<embedded {SAMPLE_NAME}>")
    try:
        with open(path, "rb") as handle:
            # Read one byte past the limit so an oversized file is named as such.
            raw = handle.read(MAX_VM_FILE_BYTES + 1)
    except OSError as exc:
        raise DataError(str(path), [f"cannot read: {exc.strerror}"]) from None
    return parse_vm(raw, str(path))

"""References written independently of the code they check, for more than one test module.

Rules of this module: a reference here is written from the rule it states
(the versions table, an RFC), never copied from fastimds' implementation of
it, so that a bug there cannot hide in both; it imports only fastimds' data
tables, never the function it is the reference for.
"""

from __future__ import annotations

import copy
from typing import Any

from fastimds.imds.versions import INSTANCE_FIELD_SINCE, INSTANCE_FIRST_VERSION


def reference_gate(value: Any, pattern: str, version: str) -> Any:
    """Gate by the table, written independently of fastimds.imds.snapshot."""
    if isinstance(value, dict):
        out = {}
        for key, child in value.items():
            child_pattern = f"{pattern}.{key}" if pattern else key
            if INSTANCE_FIELD_SINCE.get(child_pattern, INSTANCE_FIRST_VERSION) <= version:
                out[key] = reference_gate(child, child_pattern, version)
        return out
    if isinstance(value, list):
        return [reference_gate(child, pattern + "[]", version) for child in value]
    return value


def rfc7396_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 (JSON Merge Patch) section 2, written from the RFC, not from fastimds.control.writer.

    The RFC's MergePatch(Target, Patch) is recursive; this is a loop over an
    explicit stack of pending members, so that it shares no structure with
    fastimds' recursive merge_patch (and a bug in one is unlikely to be in
    both). The whole document is treated as the one member of a holder
    object, so the top level follows the same two rules as every member:
    - a Patch that is not an object replaces the Target outright;
    - an object Patch turns a non-object Target into {} first, then for each
      of its members: null removes the Target's member (if any), anything
      else is merged into the Target's member (which may not exist yet).
    Neither argument is changed: every object on the result's merged path is
    a new dict, and replacement values are deep copies.
    """
    holder: dict[str, Any] = {"document": target}
    pending: list[tuple[dict[str, Any], str, Any]] = [(holder, "document", patch)]
    while pending:
        parent, name, value = pending.pop()
        if not isinstance(value, dict):
            parent[name] = copy.deepcopy(value)
            continue
        existing = parent.get(name)
        merged: dict[str, Any] = dict(existing) if isinstance(existing, dict) else {}
        parent[name] = merged
        for member, member_value in value.items():
            if member_value is None:
                merged.pop(member, None)
            else:
                pending.append((merged, member, member_value))
    return holder["document"]

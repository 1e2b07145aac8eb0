"""References written independently of the code they check, for more than one test module.

Rules of this module: a reference here is written from the rule it states
(the versions table, an RFC), never copied from fastimds' implementation of
it, so that a bug there cannot hide in both; it imports only fastimds' data
tables, never the function it is the reference for.
"""

from __future__ import annotations

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

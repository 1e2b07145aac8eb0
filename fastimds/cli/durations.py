"""Durations and moments as an engineer types them on a command line: 500ms, 10m, 2h, 1d, 2026-11-26T10:00Z.

Rules of this module:
- Pure functions; errors are ValueError with a message that quotes the input
  and shows the accepted forms, ready to print after the flag's name.
- A moment without a time zone is UTC: every time fastimds writes is.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION: Final = re.compile(r"^(?P<number>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h|d)?$")


def parse_duration(text: str, *, bare_unit: str = "s") -> float:
    """Seconds in "500ms", "1s", "1.5s", "10m", "2h", "1d"; a bare number is in `bare_unit`."""
    match = DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (like 500ms, 1s, 10m, 2h, 1d)")
    return float(match["number"]) * UNIT_SECONDS[match["unit"] or bare_unit]


def parse_moment(text: str, now: float) -> float:
    """Unix time of "10m" (that long before `now`) or of an ISO 8601 time (2026-11-26T10:00:00Z, 2026-11-26)."""
    text = text.strip()
    if DURATION.match(text) and not text.isdigit():
        return now - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration before now (10m, 2h, 1d) nor an ISO time (2026-11-26T10:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_moment(unix_time: float) -> str:
    """2026-11-26T10:00:00.123Z: UTC, milliseconds."""
    moment = datetime.fromtimestamp(unix_time, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

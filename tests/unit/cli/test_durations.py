"""Durations and moments as typed on a command line."""

from __future__ import annotations

import pytest

from fastimds.cli.durations import format_moment, parse_duration, parse_moment

NOW = 1_795_000_000.0  # 2026-11-18T11:06:40Z


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("1s", 1.0), ("1.5s", 1.5), ("2", 2.0), ("0", 0.0), ("10m", 600.0), ("2h", 7200.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "fast", "-1s", "1w", "1 s", "s", "1.s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("10m", NOW - 600),
        ("1d", NOW - 86400),
        ("2026-11-18T11:06:40Z", NOW),
        ("2026-11-18T11:06:40", NOW),  # no zone: UTC
        ("2026-11-18T12:06:40+01:00", NOW),
        ("2026-11-18", NOW - (11 * 3600 + 6 * 60 + 40)),
    ],
)
def test_parse_moment(text: str, moment: float) -> None:
    assert parse_moment(text, NOW) == moment


@pytest.mark.parametrize("text", ["yesterday", "10 minutes", "2026-13-01"])
def test_parse_moment_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="neither a duration before now"):
        parse_moment(text, NOW)


def test_format_moment() -> None:
    assert format_moment(NOW + 0.1234) == "2026-11-18T11:06:40.123Z"

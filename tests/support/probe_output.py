"""What `fastimds probe` prints, parsed: one line per probe, then the summary line.

Rules of this module: the patterns are the output format itself, anchored
at both ends, so a changed field fails every test that reads the output.
"""

from __future__ import annotations

import re

import pytest

from fastimds.cli.main import main

SUMMARY = re.compile(
    r"^summary probes=(?P<probes>\d+) successes=(?P<successes>\d+) failures=(?P<failures>\d+) "
    r"availability=(?P<availability>\d+\.\d\d)% threshold=(?P<threshold>\d+\.\d\d)% "
    r"p50_ms=(?P<p50>[\d.]+|-) p90_ms=(?P<p90>[\d.]+|-) p99_ms=(?P<p99>[\d.]+|-) max_ms=(?P<max>[\d.]+|-)$"
)
PROBE_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z probe=(?P<number>\d+) result=(?P<result>ok|fail) "
    r"status=(?P<status>\d{3}|-) latency_ms=(?P<latency>\d+\.\d{3}) bytes=(?P<bytes>\d+) target=(?P<target>\S+)"
    r'(?: error="(?P<error>[^"]*)")?$'
)


def probe(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[re.Match[str]], re.Match[str]]:
    """Run `fastimds probe` in process; its exit code, its probe lines and its summary line, each parsed."""
    code = main(["probe", *argv])
    *lines, last = capsys.readouterr().out.splitlines()
    summary = SUMMARY.match(last)
    assert summary is not None, last
    matches = [PROBE_LINE.match(line) for line in lines]
    assert all(matches), lines
    return code, [m for m in matches if m is not None], summary

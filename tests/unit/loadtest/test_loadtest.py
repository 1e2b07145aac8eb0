"""The locust SLO runner: its gate logic.

One short real run, against a real server, is in tests/e2e/test_loadtest_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.run import Outcome, Slo, broken_slos, read_aggregate

STATS_HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
    "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
    "99.99%,100%\n"
)


def test_read_aggregate_takes_the_aggregated_row(tmp_path: Path) -> None:
    stats = tmp_path / "locust_stats.csv"
    stats.write_text(
        STATS_HEADER
        + "GET,text leaf,900,0,1,0.6,0,9,36,30,0,1,1,1,1,1,2,2,3,9,9,9\n"
        + ",Aggregated,1000,2,1,0.7,0,12,300,33.3,0.1,1,1,1,1,1,2,3,4,12,12,12\n"
    )
    assert read_aggregate(stats) == Outcome(requests=1000, failures=2, rate=33.3, p50_ms=1.0, p99_ms=4.0)


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (Outcome(120_000, 0, 2000, 1, 3), []),
        (Outcome(120_000, 1, 2000, 1, 3), ["1 unexpected failures (allowed 0)"]),
        (Outcome(120_000, 0, 2000, 2, 3), ["p50 2 ms > 1 ms"]),
        (Outcome(120_000, 0, 2000, 1, 7), ["p99 7 ms > 5 ms"]),
        (Outcome(100_000, 0, 1800, 1, 3), ["achieved 1,800 req/s < 95% of the offered 2,000"]),
        (Outcome(0, 0, 0, 0, 0), ["no request completed"]),
    ],
)
def test_every_broken_slo_is_named(outcome: Outcome, expected: list[str]) -> None:
    assert broken_slos(outcome, Slo(), offered_rate=2000) == expected

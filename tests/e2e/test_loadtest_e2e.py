"""The locust SLO runner, one short real run against a real server.

The gate logic, on made-up outcomes, is in tests/unit/loadtest/test_loadtest.py.
"""

from __future__ import annotations

from pathlib import Path

from loadtest.run import Slo, broken_slos, main, read_aggregate


def test_a_short_real_run_passes_generous_slos_and_writes_its_reports(tmp_path: Path) -> None:
    # Small and short, for CI: 100 req/s for 4 s. The SLOs are loose because
    # a shared CI machine is noisy; the gate itself is tested above.
    load = ["--rate", "100", "--users", "10", "--duration", "4"]
    slos = ["--p50-ms", "50", "--p99-ms", "500", "--min-rate-fraction", "0.5"]
    code = main([*load, *slos, "--out", str(tmp_path)])
    assert code == 0
    outcome = read_aggregate(tmp_path / "locust_stats.csv")
    assert outcome.requests > 100
    assert outcome.failures == 0  # the bad requests got exactly their documented 400s
    assert (tmp_path / "report.html").stat().st_size > 0
    impossible_p99 = Slo(p50_ms=1000, p99_ms=-1, min_rate_fraction=0)  # only the p99 can break
    assert broken_slos(outcome, impossible_p99, offered_rate=100) == [f"p99 {outcome.p99_ms:g} ms > -1 ms"]

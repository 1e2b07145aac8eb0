"""contrib/: the Prometheus alert rules and the Grafana dashboard name only metrics fastimds exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fastimds.ops.telemetry import EXPORTED_METRICS
from tests.support import REPO_ROOT

CONTRIB = REPO_ROOT / "contrib"
RULES = CONTRIB / "prometheus" / "fastimds-alerts.yml"
RULE_TESTS = CONTRIB / "prometheus" / "fastimds-alerts.test.yml"
DASHBOARD = CONTRIB / "grafana" / "fastimds-dashboard.json"

METRIC = re.compile(r"\bfastimds_[A-Za-z0-9_]+")
# Families exported as a histogram, hence as _bucket, _sum and _count series.
HISTOGRAMS = frozenset({"fastimds_request_duration_seconds"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels every scraped series has: Prometheus adds them.
TARGET_LABELS = frozenset({"instance", "job"})
SELECTOR = re.compile(r"\b(?P<metric>fastimds_[A-Za-z0-9_]+)\s*\{(?P<matchers>[^}]*)\}")
MATCHER_LABEL = re.compile(r"(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\((?P<labels>[^)]*)\)")
EXPECTED_ALERTS = frozenset(
    {
        "FastimdsDown",
        "FastimdsErrorRate",
        "FastimdsLatencyP99High",
        "FastimdsNoSnapshot",
        "FastimdsStaleGeneration",
    }
)


def family_of(name: str) -> str:
    """The exported family a series name belongs to: histogram series lose their suffix."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def unknown_metrics(text: str) -> set[str]:
    return {name for name in METRIC.findall(text) if family_of(name) not in EXPORTED_METRICS}


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in load_dashboard()["panels"] for target in panel["targets"]]


def rule_exprs() -> list[str]:
    return [rule["expr"] for rule in load_rules()]


# ---- the checker itself ----


def test_the_checker_catches_names_fastimds_does_not_export() -> None:
    assert HISTOGRAMS <= EXPORTED_METRICS
    assert unknown_metrics("rate(fastimds_requests_total[5m])") == set()
    assert unknown_metrics("fastimds_request_duration_seconds_bucket + fastimds_request_duration_seconds_sum") == set()
    assert unknown_metrics("rate(fastimds_requests[5m])") == {"fastimds_requests"}  # counters end in _total
    assert unknown_metrics("fastimds_vms_count") == {"fastimds_vms_count"}  # only histograms have _count
    assert unknown_metrics("fastimds_request_duration_seconds_total") == {"fastimds_request_duration_seconds_total"}
    assert unknown_metrics("fastimds_nope_total > 0") == {"fastimds_nope_total"}


# ---- names ----


@pytest.mark.parametrize("path", [RULES, RULE_TESTS, DASHBOARD], ids=lambda path: path.name)
def test_every_metric_named_anywhere_is_exported(path: Path) -> None:
    text = path.read_text()
    assert METRIC.search(text) is not None
    assert unknown_metrics(text) == set()


def test_every_expression_names_exported_metrics() -> None:
    named: set[str] = set()
    for expr in rule_exprs() + dashboard_exprs():
        found = {family_of(name) for name in METRIC.findall(expr)}
        assert found, f"no fastimds metric in {expr!r}"
        named |= found
    assert named <= EXPORTED_METRICS
    # the dashboard and the rules between them plot or watch every family fastimds exports
    assert EXPORTED_METRICS - named == set()


def exposition() -> dict[str, set[str]]:
    """Series name -> label names, from a real render of /metrics with one VM and one update."""
    from prometheus_client.parser import text_string_to_metric_families

    from fastimds.ops.telemetry import LAYOUT, ScrapeSources, VmState, render_metrics

    sources = ScrapeSources(
        totals=lambda: [1] * LAYOUT.size,
        vms=lambda: [VmState("vm-a", 3, 12.5, True)],
        updates=lambda: {("accepted", "admin"): 1},
        workers=lambda: 2,
    )
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(render_metrics(sources).decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def test_every_series_named_is_in_a_real_exposition() -> None:
    exported = exposition()
    named = {name for expr in rule_exprs() + dashboard_exprs() for name in METRIC.findall(expr)}
    assert named - exported.keys() == set()


def test_every_label_used_exists_on_its_metric() -> None:
    exported = exposition()
    for expr in rule_exprs() + dashboard_exprs():
        in_expr: set[str] = set(TARGET_LABELS)
        for name in METRIC.findall(expr):
            in_expr |= exported[name]
        for selector in SELECTOR.finditer(expr):
            used = {match["label"] for match in MATCHER_LABEL.finditer(selector["matchers"])}
            assert used <= exported[selector["metric"]] | TARGET_LABELS, (selector.group(0), expr)
        for grouping in GROUPING.finditer(expr):
            used = {label.strip() for label in grouping["labels"].split(",") if label.strip()}
            assert used <= in_expr, (grouping.group(0), expr)


# ---- the alert rules ----


def test_every_rule_is_a_complete_alert() -> None:
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"}
    rules = load_rules()
    assert {rule["alert"] for rule in rules} >= EXPECTED_ALERTS
    assert len({rule["alert"] for rule in rules}) == len(rules)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert rule["labels"]["severity"] in {"page", "ticket"}
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip()
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]


def test_the_alerts_watch_what_the_issue_asks_for() -> None:
    exprs = {rule["alert"]: " ".join(rule["expr"].split()) for rule in load_rules()}
    assert 'fastimds_requests_total{code=~"5.."}' in exprs["FastimdsErrorRate"]
    assert "histogram_quantile(0.99," in exprs["FastimdsLatencyP99High"]
    assert "fastimds_request_duration_seconds_bucket" in exprs["FastimdsLatencyP99High"]
    assert exprs["FastimdsNoSnapshot"] == "fastimds_vms_ready < fastimds_vms"
    assert "fastimds_snapshot_age_seconds" in exprs["FastimdsStaleGeneration"]
    assert "absent(up" in exprs["FastimdsDown"] and "fastimds_workers" in exprs["FastimdsDown"]


def promtool() -> str:
    found = shutil.which("promtool")
    # `make test` installs it (Debian's prometheus package, via `make system-deps`).
    assert found is not None, "promtool is missing: run `make system-deps` (apt-get install prometheus)"
    return found


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


def test_promtool_unit_tests_fire_each_alert_when_it_should() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in load_rules()}


# ---- the dashboard ----


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["title"] and dashboard["uid"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "fastimds_workers" in variables["instance"]["definition"]
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["title"] and panel["type"] in {"timeseries", "stat"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids)
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])


def test_panels_overlap_nowhere() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in load_dashboard()["panels"]:
        x, y, w, h = (panel["gridPos"][key] for key in ("x", "y", "w", "h"))
        mine = {(column, row) for column in range(x, x + w) for row in range(y, y + h)}
        assert not cells & mine, panel["title"]
        cells |= mine


def test_the_dashboard_plots_what_the_issue_asks_for() -> None:
    by_title = {panel["title"]: " ".join(t["expr"] for t in panel["targets"]) for panel in load_dashboard()["panels"]}
    assert "sum by (category, code)" in by_title["Request rate by category and code"]
    assert 'code=~"5.."' in by_title["Error rate"]
    latency = by_title["Latency percentiles"]
    assert all(f"histogram_quantile({q}," in latency for q in ("0.5", "0.9", "0.99"))
    assert "fastimds_connections{" in by_title["Connections"]
    assert "sum by (reason)" in by_title["Rejects by reason"]
    assert "fastimds_vms{" in by_title["VMs and ready VMs"] and "fastimds_vms_ready{" in by_title["VMs and ready VMs"]
    assert "fastimds_snapshot_age_seconds" in by_title["Snapshot age per VM (oldest 20)"]
    assert "by (result, source)" in by_title["Updates by result"]
    assert "fastimds_log_lines_suppressed_total" in by_title["Log lines suppressed"]
    assert "sum by (kind)" in by_title["Injected faults by kind"]

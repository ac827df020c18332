"""The operator artifacts in deploy/: Prometheus rules, their promtool unit tests, the Grafana dashboard.

Every PromQL expression may only name metrics the gateway exports (EXPORTED_METRICS), so a renamed
metric breaks this test instead of silently emptying a panel or muting an alert.
The promtool tests skip when promtool is missing, except in CI (env `CI` set), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# The metrics gateway/metrics.py exports (base names: histograms without _bucket/_sum/_count,
# counters with their _total). `up` comes from Prometheus itself, not from the gateway.
EXPORTED_METRICS: tuple[str, ...] = (
    "agnes_gateway_key_quota_used",
    "agnes_gateway_key_quota_limit",
    "agnes_gateway_key_quota_remaining",
    "agnes_gateway_key_state",
    "agnes_gateway_quota_reset_timestamp_seconds",
    "agnes_gateway_requests_total",
    "agnes_gateway_request_duration_seconds",
    "agnes_gateway_upstream_requests_total",
    "agnes_gateway_upstream_request_duration_seconds",
    "agnes_gateway_failovers_total",
    "agnes_gateway_exhausted_rejections_total",
    "agnes_gateway_tasks_created_total",
    "agnes_gateway_tasks",
)
HISTOGRAM_METRICS: frozenset[str] = frozenset(
    {"agnes_gateway_request_duration_seconds", "agnes_gateway_upstream_request_duration_seconds"}
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "agnes-gateway.json"

REQUIRED_ALERTS = (
    "AgnesGatewayPoolNearlySpent",
    "AgnesGatewayAllKeysSpent",
    "AgnesGatewayKeyDisabled",
    "AgnesGatewayUpstreamErrorRate",
    "AgnesGatewayDown",
)

METRIC_NAME = re.compile(r"(?<![\w:])agnes_gateway_\w+")
RECORDED_NAME = re.compile(r"(?<![\w:])agnes_gateway:[\w:]+")


def base_metric(name: str) -> str:
    """`name` as listed in EXPORTED_METRICS: histogram series lose their _bucket/_sum/_count suffix."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAM_METRICS:
            return name.removesuffix(suffix)
    return name


def unknown_metrics(expr: str) -> set[str]:
    """Names in `expr` that look like gateway metrics but are not exported."""
    return {name for name in METRIC_NAME.findall(expr) if base_metric(name) not in EXPORTED_METRICS}


def used_metrics(exprs: list[str]) -> set[str]:
    return {base_metric(name) for expr in exprs for name in METRIC_NAME.findall(expr)}


# --- loading -----------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """All panels, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """PromQL of every panel target and every query variable."""
    exprs = [
        target["expr"]
        for panel in iter_panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query))
    return exprs


def load_rules() -> list[dict[str, Any]]:
    with RULES.open(encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts_by_name() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in load_rules() if "alert" in rule}


# --- dashboard ---------------------------------------------------------------------------


def test_dashboard_is_importable_json_with_panels() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "agnes-gateway"
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    assert "id" not in dashboard or dashboard["id"] is None  # a fixed id would clash on import

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"

    panels = list(iter_panels(dashboard["panels"]))
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 11
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in graphs:
        assert panel["title"], panel
        assert panel["targets"], f"panel {panel['title']!r} has no queries"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]

    types = {p["type"] for p in graphs}
    assert {"timeseries", "bargauge", "stat", "state-timeline"} <= types


def test_dashboard_queries_name_only_exported_metrics() -> None:
    exprs = dashboard_exprs(load_dashboard())
    assert exprs
    unknown = {expr: names for expr in exprs if (names := unknown_metrics(expr))}
    assert not unknown, f"dashboard queries name metrics the gateway does not export: {unknown}"
    recorded = {expr for expr in exprs if RECORDED_NAME.search(expr)}
    assert not recorded, f"the dashboard must work without the recording rules: {recorded}"


def test_dashboard_shows_every_exported_metric() -> None:
    missing = set(EXPORTED_METRICS) - used_metrics(dashboard_exprs(load_dashboard()))
    assert not missing, f"no panel shows {sorted(missing)}"


def test_dashboard_latency_panels_use_histogram_buckets() -> None:
    exprs = dashboard_exprs(load_dashboard())
    for histogram in HISTOGRAM_METRICS:
        quantiles = {
            q
            for expr in exprs
            if f"{histogram}_bucket" in expr
            for q in re.findall(r"histogram_quantile\(\s*(0\.\d+)", expr)
        }
        assert {"0.5", "0.95", "0.99"} <= quantiles, histogram


# --- alert rules -------------------------------------------------------------------------


def test_rules_name_only_exported_metrics_and_defined_recordings() -> None:
    rules = load_rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    assert "agnes_gateway:pool_quota_remaining:sum" in recorded
    for rule in rules:
        name = rule.get("alert") or rule["record"]
        # Annotations may run queries too (`{{ ... | query }}`), so they are checked as well.
        texts = [rule["expr"], *rule.get("annotations", {}).values()]
        for text in texts:
            assert not unknown_metrics(text), f"{name}: unknown metrics {unknown_metrics(text)}"
            undefined = set(RECORDED_NAME.findall(text)) - recorded
            assert not undefined, f"{name}: recording rules not defined in alerts.yml: {undefined}"
        if "record" in rule:
            assert RECORDED_NAME.fullmatch(rule["record"]), f"{name}: use the level:metric:operations form"


def test_required_alerts_are_defined_with_labels_and_annotations() -> None:
    alerts = alerts_by_name()
    assert set(REQUIRED_ALERTS) <= set(alerts)
    for name, alert in alerts.items():
        assert re.fullmatch(r"\d+[smh]", str(alert.get("for", ""))), f"{name}: needs a `for:` duration"
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert alert["annotations"]["summary"].strip(), name
        assert alert["annotations"]["description"].strip(), name
    assert "$labels.key" in alerts["AgnesGatewayKeyDisabled"]["annotations"]["summary"]
    assert 'up{job="agnes-gateway"}' in alerts["AgnesGatewayDown"]["expr"]
    assert "absent(" in alerts["AgnesGatewayDown"]["expr"]


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    with RULES_TEST.open(encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    assert doc["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = set(alerts_by_name())
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested staying silent"


# --- promtool ----------------------------------------------------------------------------


def find_promtool() -> str:
    """promtool's path; skips the calling test when it is missing, or fails it when `CI` is set."""
    path = shutil.which("promtool")
    if path is not None:
        return path
    reason = "promtool is not on PATH (install Debian's `prometheus` package or a Prometheus release)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the rule checks must run", pytrace=False)
    pytest.skip(reason)


def run_promtool(*args: str) -> None:
    promtool = find_promtool()
    result = subprocess.run([promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def test_promtool_check_rules() -> None:
    run_promtool("check", "rules", str(RULES.relative_to(ROOT)))


def test_promtool_test_rules() -> None:
    run_promtool("test", "rules", str(RULES_TEST.relative_to(ROOT)))


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Grafana's variables replaced by plain values, every panel query must parse for promtool."""

    def concrete(expr: str) -> str:
        expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
        return re.sub(r"\$\{?\w+\}?", ".*", expr)

    exprs = [e for e in dashboard_exprs(load_dashboard()) if not e.startswith("label_values(")]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:expr_{i}", "expr": concrete(expr)} for i, expr in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    run_promtool("check", "rules", str(path))


def test_missing_promtool_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        find_promtool()


def test_missing_promtool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="promtool is not on PATH"):
        find_promtool()

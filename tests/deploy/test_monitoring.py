"""Alerts and dashboards: `promtool check rules` and `promtool test rules` on the rules the chart
renders; the dashboards regenerated from code equal the committed JSON; every PromQL expression
(alerts and panels) parses; every metric they name exists in common.metrics.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import promql_parser
import pytest
import yaml
from deploy_support import CHART, ROOT, run
from prometheus_client import REGISTRY

from common.metrics import metric_names

ALERTS = {"AlignerTrainingStalled", "AlignerKLHigh", "AlignerRewardCollapse", "AlignerServiceDown",
          "AlignerHighErrorRate"}
# Series Prometheus makes itself, not our exporters.
PROMETHEUS_SERIES = {"up"}
# Grafana's variables, as Grafana substitutes them before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$namespace": ".*", "$job": ".*"}


def exposed_series() -> set[str]:
    """The series names Prometheus stores for the metrics of common.metrics (counters with _total,
    histograms as _bucket/_count/_sum): what a query may name."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("aligner_"):
            names |= {family.name + suffix for suffix in suffixes[family.type]}
    assert names and names <= set(metric_names())
    return names | PROMETHEUS_SERIES


def load_module(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rules_module = load_module("aligner_monitoring_rules", ROOT / "monitoring" / "rules.py")
dashboards_module = load_module("aligner_monitoring_dashboards", ROOT / "monitoring" / "dashboards.py")


def rule_file(chart, directory, args: list[str] = ()) -> dict:
    """Render the PrometheusRule (release aligner, namespace rlhf) into directory/rules.yaml,
    beside a copy of the promtool unit tests."""
    result = chart.template(sets=["monitoring.prometheusRule.enabled=true"],
                            extra=["--show-only", "templates/prometheusrule.yaml", *args])
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(result.stdout)["spec"]
    (directory / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, width=1000))
    shutil.copy(ROOT / "monitoring" / "alerts_test.yaml", directory / "alerts_test.yaml")
    return spec


def alert_exprs(spec: dict) -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for group in spec["groups"] for rule in group["rules"]}


def panel_exprs() -> list[tuple[str, str]]:
    found = []
    for name, build in dashboards_module.DASHBOARDS.items():
        board = json.loads(dashboards_module.render(build))
        for panel in board["panels"]:
            for target in panel.get("targets") or []:
                found.append((f"{name}: {panel['title']}", target["expr"]))
    return found


def grafana_substituted(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def selected_metrics(expr: str) -> set[str]:
    names = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


# --- alerts ------------------------------------------------------------------------------------


def test_promtool_checks_the_rendered_rules(chart, tool, tmp_path):
    spec = rule_file(chart, tmp_path)
    assert set(alert_exprs(spec)) == ALERTS
    result = run([tool("promtool"), "check", "rules", str(tmp_path / "rules.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_rule_unit_tests_pass(chart, tool, tmp_path):
    rule_file(chart, tmp_path)
    result = run([tool("promtool"), "test", "rules", "alerts_test.yaml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {line.split(":", 1)[1].strip() for line in
              (ROOT / "monitoring" / "alerts_test.yaml").read_text().splitlines()
              if line.strip().startswith("alertname:")}
    assert tested == ALERTS  # each alert has its unit test


@pytest.mark.parametrize(("setting", "failing_alert"), [
    ("monitoring.prometheusRule.klMax=25", "AlignerKLHigh"),
    ("monitoring.prometheusRule.stallMinutes=60", "AlignerTrainingStalled"),
    ("monitoring.prometheusRule.errorRatio=0.1", "AlignerHighErrorRate"),
    ("monitoring.prometheusRule.rewardCollapse.stds=10", "AlignerRewardCollapse"),
    ('monitoring.prometheusRule.serviceDownFor="15m"', "AlignerServiceDown"),
])
def test_rule_unit_tests_notice_a_changed_threshold(chart, tool, tmp_path, setting, failing_alert):
    """The unit tests pin the behaviour: move a threshold and the matching test fails."""
    rule_file(chart, tmp_path, args=["--set-json", setting])  # --set would make 0.1 a string
    result = run([tool("promtool"), "test", "rules", "alerts_test.yaml"], cwd=tmp_path)
    assert result.returncode != 0
    assert f"alertname: {failing_alert}" in result.stdout + result.stderr


def test_rules_script_prints_the_same_rules(chart, tmp_path):
    spec = rules_module.render_rules(helm=chart.helm)
    assert spec == rule_file(chart, tmp_path)


def test_alert_expressions_parse_and_use_known_metrics(chart, tmp_path):
    known = exposed_series()
    for alert, expr in alert_exprs(rule_file(chart, tmp_path)).items():
        names = selected_metrics(expr)
        assert names, alert
        assert names <= known, f"{alert} uses metrics not in common.metrics: {sorted(names - known)}"


# --- dashboards --------------------------------------------------------------------------------


def test_committed_dashboards_are_regenerated_from_code(tmp_path):
    assert dashboards_module.main(["--out", str(tmp_path)]) == 0
    for name in dashboards_module.DASHBOARDS:
        committed = CHART / "files" / "dashboards" / name
        assert committed.read_text() == (tmp_path / name).read_text(), (
            f"{committed} is stale: run `python monitoring/dashboards.py`")
    assert dashboards_module.main(["--check"]) == 0


def test_dashboards_cover_the_issue_panels():
    titles = {where.split(": ", 1)[1] for where, _ in panel_exprs()}
    for title in ("Reward", "KL to the initial policy", "Entropy", "Clip fraction", "Response length",
                  "Step time by phase", "Response tokens / s", "Policy version",
                  "Requests / s", "Latency p50", "Latency p99", "Errors / s", "Mean batch size", "Queue depth"):
        assert title in titles, title


def test_panel_queries_parse_and_use_known_metrics():
    known = exposed_series()
    used = set()
    for where, expr in panel_exprs():
        assert 'namespace=~"$namespace", job=~"$job"' in expr, where  # every query follows the variables
        names = selected_metrics(grafana_substituted(expr))
        assert names, where
        assert names <= known, f"{where} uses metrics not in common.metrics: {sorted(names - known)}"
        used |= names
    # The dashboards show every metric the orchestrator exports (a histogram through its buckets).
    ppo = {name for name in known if name.startswith("aligner_ppo_") and not name.endswith(("_sum", "_count"))}
    assert not ppo - used, f"PPO metrics on no dashboard: {sorted(ppo - used)}"


def test_unknown_metric_names_are_caught():
    """The metric check is not vacuous: a misspelt metric is reported."""
    known = exposed_series()
    assert "aligner_ppo_kl" in known and "aligner_rpc_requests_total" in known
    assert "aligner_rpc_requests" not in known  # a counter is stored with _total only
    assert selected_metrics('rate(aligner_rpc_request_total{job=~".*"}[1m])') - known == {"aligner_rpc_request_total"}
    with pytest.raises(Exception):  # noqa: B017 - the parser raises its own error types
        promql_parser.parse("sum by (service (rate(aligner_rpc_requests_total[1m]))")

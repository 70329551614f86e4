"""Prometheus rules, Grafana dashboards and the metrics the code exports agree."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest

import bytewax.connectors.kafka  # noqa: F401  (registers bytewax_kafka_consumer_lag)
from ops import metrics  # noqa: F401  (registers gatewatch_*)

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "ops" / "prometheus"
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")
FUNCTIONS = {"sum", "rate", "irate", "increase", "histogram_quantile", "min", "max", "avg", "by", "without",
             "clamp_min", "le", "and", "or", "unless", "on", "ignoring"}


def exported_names() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names |= {family.name + suffix for suffix in SUFFIXES}
    return names


def recorded_names() -> set[str]:
    rules = yaml.safe_load((PROM / "rules.yml").read_text())
    return {rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule}


def metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', "", expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_labels)
    tokens = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_ranges))
    return {t for t in tokens if t not in FUNCTIONS and ("_" in t or ":" in t)}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; ops/setup-test-env.sh installs it)")
    return path


def test_every_dashboard_query_names_an_exported_metric():
    """Prometheus panels only; the usage dashboard's ClickHouse panels run in test_dashboards."""
    known = exported_names() | recorded_names()
    dashboards = sorted((ROOT / "ops" / "grafana").glob("*.json"))
    assert dashboards
    prometheus_panels = [(dashboard, panel) for dashboard in dashboards
                         for panel in json.loads(dashboard.read_text())["panels"]
                         if panel.get("datasource", {}).get("type") == "prometheus"]
    assert prometheus_panels
    for dashboard, panel in prometheus_panels:
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, (dashboard.name, panel["title"])
            assert names <= known, (dashboard.name, panel["title"], names - known)


def test_every_rule_names_an_exported_metric():
    known = exported_names() | recorded_names()
    rules = yaml.safe_load((PROM / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert metric_names(rule["expr"]) <= known, rule.get("alert") or rule.get("record")


def test_metric_names_finds_names_not_functions():
    assert metric_names('sum by (le) (rate(gatewatch_x_bucket{le="120.0"}[5m]))') == {"gatewatch_x_bucket"}


def test_rules_pass_promtool_unit_tests():
    result = subprocess.run([promtool(), "test", "rules", "rules_test.yml"], cwd=PROM, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_exported_metrics_pass_promtool_check():
    metrics.EVENTS.labels(stage="decoded").inc()
    metrics.FRESHNESS_SECONDS.labels(sink="clickhouse").observe(1.5)
    result = subprocess.run([promtool(), "check", "metrics"], input=generate_latest(REGISTRY),
                            capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def observed(registry) -> list[str]:
    """The registry's exposition without its creation times."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_a_batch_of_timings_fills_a_histogram_as_one_observe_per_value():
    from hypothesis import given, settings, strategies as st
    from prometheus_client import CollectorRegistry, Histogram

    buckets = (0.5, 1, 2, 5, 10)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.one_of(st.floats(-1, 20), st.sampled_from(buckets), st.floats(allow_nan=True)), max_size=50))
    def check(values):
        per_value, batched = CollectorRegistry(), CollectorRegistry()
        one = Histogram("fresh", "f", ["sink"], buckets=buckets, registry=per_value).labels(sink="x")
        for value in values:
            one.observe(value)
        many = Histogram("fresh", "f", ["sink"], buckets=buckets, registry=batched)
        metrics.PrometheusMetrics(many).timings("fresh", iter(values), tags={"sink": "x"})
        assert observed(batched) == observed(per_value)

    check()

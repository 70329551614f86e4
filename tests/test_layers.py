"""The packages below ops/ never import ops or dataflows, and dataflows never import ops
(ops is the composition root: it loads the settings and passes them in); the hooks that
replace those imports still deliver: schema defaults, sink and flow metrics."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOWER = ("schemas", "redaction", "sinks", "connectors")
UPPER = ("ops", "dataflows")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", LOWER)
def test_lower_packages_do_not_import_ops_or_dataflows(package):
    upward = sorted(f"{path.relative_to(ROOT)} imports {name}"
                    for path in (ROOT / package).rglob("*.py")
                    for name in imported_modules(path) if name.split(".")[0] in UPPER)
    assert upward == []


def test_dataflows_do_not_import_ops():
    upward = sorted(f"{path.relative_to(ROOT)} imports {name}"
                    for path in (ROOT / "dataflows").rglob("*.py")
                    for name in imported_modules(path) if name.split(".")[0] == "ops")
    assert upward == []


def test_event_rules_defaults_match_the_validation_settings():
    from ops.settings import ValidationSettings
    from schemas.codec import EventRules

    settings, rules = ValidationSettings(), EventRules()
    for name in EventRules.__dataclass_fields__:
        expected = getattr(settings, name)
        assert getattr(rules, name) == (tuple(expected) if isinstance(expected, list) else expected), name


def test_sink_retries_reach_the_prometheus_counters():
    from ops import metrics
    from sinks.retry import write_with_retries

    def samples():
        return (metrics.SINK_ERRORS.labels(sink="layers-test")._value.get(),
                metrics.SINK_RETRIES.labels(sink="layers-test")._value.get())

    errors, retries = samples()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    assert write_with_retries("layers-test", flaky, initial_backoff_s=0.001, max_backoff_s=0.001) == "ok"
    assert samples() == (errors + 2, retries + 2)
    assert metrics.SINK_UP.labels(sink="layers-test")._value.get() == 1


def test_every_metric_a_flow_or_lower_package_reports_is_registered_with_prometheus():
    import re

    from ops import metrics
    from sinks.metrics import get_metrics

    reported = {name for package in (*LOWER, "dataflows") for path in (ROOT / package).rglob("*.py")
                for name in re.findall(r'get_metrics\(\)\.\w+\(\s*"(\w+)"', path.read_text())}
    assert {"gatewatch_sink_errors", "gatewatch_replay_rows", "gatewatch_sink_rows", "gatewatch_tokens",
            "gatewatch_freshness_seconds"} <= reported
    backend = get_metrics()
    assert isinstance(backend, metrics.PrometheusMetrics)
    assert reported - backend.names == set()


def test_bytewax_run_finds_every_flow_the_launcher_starts(monkeypatch):
    """`python -m bytewax.run ops.launch:<flow>` reaches the launcher (a module attribute of
    the same name would shadow it), which builds the flow from the environment's settings."""
    from bytewax.dataflow import Dataflow
    from bytewax.run import _locate_dataflow

    from ops import launch

    built = []
    monkeypatch.setattr(launch, "FLOWS", {name: lambda settings, name=name: built.append(settings) or Dataflow(name)
                                          for name in launch.FLOWS})
    monkeypatch.setenv("GATEWATCH_KAFKA__EVENTS_TOPIC", "layers-test-events")
    for name, entry in launch.ENTRY_POINTS.items():
        module, attribute = entry.split(":")
        assert module == launch.__name__ and attribute == name
        assert _locate_dataflow(module, attribute).flow_id == name
    assert [settings.kafka.events_topic for settings in built] == ["layers-test-events"] * len(launch.FLOWS)


def test_a_sinks_freshness_reaches_the_prometheus_histogram_without_late_events():
    import time

    from ops import metrics
    from sinks.metrics import observe_freshness

    def observed() -> tuple[float, float]:
        samples = {s.name: s.value for s in metrics.FRESHNESS_SECONDS.collect()[0].samples
                   if s.labels.get("sink") == "layers-test" and s.name.endswith(("_count", "_sum"))}
        return samples.get("gatewatch_freshness_seconds_count", 0.0), samples.get("gatewatch_freshness_seconds_sum", 0.0)

    count, total = observed()
    now_ms = time.time() * 1000
    observe_freshness("layers-test", [now_ms - 2_000, now_ms - 4_000, now_ms - 3_600_000], lateness_s=600)
    new_count, new_total = observed()
    assert new_count == count + 2  # the hour-old event is late: not the pipeline's delay
    assert 6 <= new_total - total < 8

"""Prometheus metrics of a gatewatch process. Labels never carry user ids or text."""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import Counter as Tally
from pathlib import Path
from typing import Iterable, Mapping

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest, start_http_server

from sinks.metrics import configure_metrics

EVENTS = Counter("gatewatch_events", "Events leaving a pipeline stage", ["stage"])
DLQ_RECORDS = Counter("gatewatch_dlq_records", "Records sent to the dead-letter queue", ["stage", "code"])
DEDUPE_DROPS = Counter("gatewatch_dedupe_drops", "Events dropped as duplicates of an event_id already seen")
LATE_EVENTS = Counter("gatewatch_late_events", "Events older than the allowed lateness", ["policy"])
TOKENS = Counter("gatewatch_tokens", "Tokens of unique valid events", ["model", "kind"])
QUOTA_ALERTS = Counter("gatewatch_quota_alerts", "Quota alert events delivered (80%/100% of a limit)")
SINK_WRITE_SECONDS = Histogram("gatewatch_sink_write_seconds", "Duration of one successful sink write", ["sink"])
SINK_ROWS = Counter("gatewatch_sink_rows", "Rows written by a sink", ["sink"])
SINK_ERRORS = Counter("gatewatch_sink_errors", "Failed sink writes (each is retried)", ["sink"])
SINK_RETRIES = Counter("gatewatch_sink_retries", "Sink write retries after backoff", ["sink"])
SINK_REJECTED = Counter("gatewatch_sink_rejected", "Rows a sink refused for good (sent to the DLQ, not retried)",
                        ["sink", "code"])
DLQ_SPOOLED = Counter("gatewatch_dlq_spooled", "DLQ records the broker refused, appended to the local spool file "
                                               "(alert on any)", ["code"])
SINK_UP = Gauge("gatewatch_sink_up", "1 when the last write to the sink succeeded, 0 while it is failing", ["sink"])
REDACTION_SECONDS = Histogram(
    "gatewatch_redaction_seconds", "Redaction time per batch of events",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
PII_ENTITIES = Counter("gatewatch_pii_entities", "PII entities redacted", ["entity"])
POLICY_FLAGS = Counter("gatewatch_policy_flags", "Policy flags set on events (entity types found, pii_redacted)", ["flag"])
CLASSIFICATIONS = Counter("gatewatch_classifications", "Events by data classification level", ["level"])
REPLAY_FILES = Counter("gatewatch_replay_files", "Raw Parquet files a replay has read to the end")
REPLAY_ROWS = Counter("gatewatch_replay_rows", "Raw Parquet rows a replay has read")
REPLAY_FLOOR_FILES = Counter("gatewatch_replay_floor_files",
                             "Raw Parquet files whose window floor a replay read before their rows (their horizons)")
FRESHNESS_SECONDS = Histogram(
    "gatewatch_freshness_seconds", "Seconds from event_time until the event is queryable in a sink", ["sink"],
    # A second apart up to 10 s: a p99 read against a 10 s target between bounds 10 and 20
    # came out anywhere in 10-20 s for a true ~10.5 s (ops/bench/FINDINGS.md). 120: the SLO's.
    buckets=(0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 30, 60, 120, 300, 600, 3600))
# dataflows.step_cpu: each step's own thread CPU in the running flow, beside `bench stages`.
STEP_CPU_SECONDS = Counter("gatewatch_step_cpu_seconds", "Thread CPU seconds spent in a flow step's Python calls",
                           ["step"])
STEP_CALLS = Counter("gatewatch_step_calls", "Calls Bytewax made to a flow step (a keyed step: one per key and batch)",
                     ["step"])
STEP_ITEMS = Counter("gatewatch_step_items", "Items handed to a flow step (a source: items it returned)", ["step"])
STEP_WALL_SECONDS = Counter("gatewatch_step_wall_seconds",
                            "Wall seconds inside a flow step's Python calls: its CPU and its waits (a sink's server)",
                            ["step"])
WORKER_CPU_SECONDS = Counter("gatewatch_worker_cpu_seconds",
                             "Thread CPU seconds of the flow's worker threads, up to their latest step call")
AGGREGATE_KEYS = Counter("gatewatch_aggregate_keys", "(org, hour, user) keys the aggregate refreshes recomputed")
AGGREGATE_REFRESH_SECONDS = Histogram("gatewatch_aggregate_refresh_seconds",
                                      "Duration of one aggregate refresh that recomputed keys",
                                      buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
GC_CPU_SECONDS = Counter("gatewatch_gc_cpu_seconds", "Thread CPU seconds of CPython's cyclic GC collections")


class PrometheusMetrics:
    """The backend of ``sinks.metrics``: a report names one of the metrics above by its
    Prometheus name; a name not registered here is a programming error and raises."""

    def __init__(self, *metrics: Counter | Gauge | Histogram):
        self._by_name = {metric.describe()[0].name: metric for metric in metrics}

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def _metric(self, name: str, tags: Mapping[str, str] | None):
        metric = self._by_name[name]
        return metric.labels(**tags) if tags else metric

    def increment(self, name: str, value: float = 1, tags: Mapping[str, str] | None = None) -> None:
        self._metric(name, tags).inc(value)

    def gauge(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._metric(name, tags).set(value)

    def timing(self, name: str, seconds: float, tags: Mapping[str, str] | None = None) -> None:
        self._metric(name, tags).observe(seconds)

    def timings(self, name: str, seconds: Iterable[float], tags: Mapping[str, str] | None = None) -> None:
        metric = self._metric(name, tags)
        values = list(seconds)
        bounds = getattr(metric, "_upper_bounds", None)
        if bounds is None or any(value != value for value in values):  # (NaN: observe's own handling)
            for value in values:
                metric.observe(value)
            return
        # A batch's observations bucketed here and added once per bucket: Histogram.observe
        # walks the bounds and takes two locks per value (1.4 µs per event of a sink's
        # freshness). prometheus-client is pinned to 0.26, whose observe does exactly this.
        metric._raise_if_not_observable()
        metric._sum.inc(sum(values))
        for index, count in Tally(bisect_left(bounds, value) for value in values).items():
            metric._buckets[index].inc(count)


# Installed on import: every process that runs a flow or a sink imports this module, so the
# reports of the flows and the lower packages reach Prometheus without each entry point wiring it.
configure_metrics(PrometheusMetrics(
    EVENTS, DLQ_RECORDS, DEDUPE_DROPS, LATE_EVENTS, TOKENS, QUOTA_ALERTS, SINK_WRITE_SECONDS, SINK_ROWS, SINK_ERRORS,
    SINK_RETRIES, SINK_REJECTED, DLQ_SPOOLED, SINK_UP, REDACTION_SECONDS, PII_ENTITIES, POLICY_FLAGS, CLASSIFICATIONS,
    REPLAY_FILES, REPLAY_ROWS, REPLAY_FLOOR_FILES, FRESHNESS_SECONDS, STEP_CPU_SECONDS, STEP_CALLS, STEP_ITEMS,
    STEP_WALL_SECONDS, WORKER_CPU_SECONDS, GC_CPU_SECONDS, AGGREGATE_KEYS, AGGREGATE_REFRESH_SECONDS))


def serve(port: int | None, host: str = "127.0.0.1") -> int | None:
    """Expose /metrics on host:port (0 picks a free port); return the port bound."""
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=host)
    return server.server_address[1]


def counter_totals() -> dict[str, float]:
    """Every gatewatch counter summed over its labels, e.g. {"gatewatch_dedupe_drops": 3}."""
    totals: dict[str, float] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("gatewatch_") or family.type != "counter":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = sample.name
                if sample.labels:
                    key += "{" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) + "}"
                totals[key] = totals.get(key, 0) + sample.value
    return totals


def freshness_quantiles(qs: tuple[float, ...] = (0.5, 0.99)) -> dict[str, float]:
    """{"freshness_p99_s{sink=clickhouse}": 1.7, ...} from this process's histogram."""
    from ops.status import parse, quantile

    snapshot = parse(generate_latest(REGISTRY).decode(), 0)
    out = {}
    for (name, labels), rows in snapshot.buckets.items():
        if name == "gatewatch_freshness_seconds":
            for q in qs:
                value = quantile(rows, q)
                if value is not None:
                    out[f"freshness_p{round(q * 100)}_s{{sink={dict(labels)['sink']}}}"] = round(value, 3)
    return out


def dump_counters(path: str | Path) -> None:
    """Counter totals and freshness quantiles as JSON, for a run that has ended."""
    Path(path).write_text(json.dumps({**counter_totals(), **freshness_quantiles()}, sort_keys=True))

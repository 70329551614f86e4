from ops.status import merge, parse, quantile, render

BEFORE = """
# TYPE gatewatch_events_total counter
gatewatch_events_total{stage="decoded"} 100
# TYPE gatewatch_sink_up gauge
gatewatch_sink_up{sink="clickhouse"} 1
# TYPE bytewax_kafka_consumer_lag gauge
bytewax_kafka_consumer_lag{partition="0",step_id="s",topic="t"} 40
# TYPE gatewatch_freshness_seconds histogram
gatewatch_freshness_seconds_bucket{le="1.0",sink="clickhouse"} 50
gatewatch_freshness_seconds_bucket{le="2.0",sink="clickhouse"} 100
gatewatch_freshness_seconds_bucket{le="+Inf",sink="clickhouse"} 100
gatewatch_freshness_seconds_count{sink="clickhouse"} 100
gatewatch_freshness_seconds_sum{sink="clickhouse"} 120
"""


def test_quantile_interpolates_within_buckets():
    assert quantile([(1.0, 50), (2.0, 100), (float("inf"), 100)], 0.5) == 1.0
    assert quantile([(1.0, 50), (2.0, 100), (float("inf"), 100)], 0.75) == 1.5
    assert quantile([(1.0, 0), (float("inf"), 0)], 0.5) is None


def test_render_shows_rates_lag_and_sink_health():
    before = parse(BEFORE, at=0)
    after = parse(BEFORE.replace('{stage="decoded"} 100', '{stage="decoded"} 300')
                  .replace("} 40", "} 7").replace('sink_up{sink="clickhouse"} 1', 'sink_up{sink="clickhouse"} 0'), at=2)
    screen = render(before, after)
    assert "decoded 100" in screen
    assert "consumer lag  7 messages" in screen
    assert "clickhouse      NO" in screen
    assert "1.0 s" in screen and "2.0 s" in screen


def test_merge_sums_processes():
    snap = merge([parse(BEFORE, 0), parse(BEFORE, 1)])
    assert snap.counters[("gatewatch_events", (("stage", "decoded"),))] == 200
    assert dict(snap.buckets[("gatewatch_freshness_seconds", (("sink", "clickhouse"),))])[2.0] == 200


def test_usage_lines_read_the_aggregates(tmp_path):
    import time
    import uuid

    from ops.status import usage_lines
    from sinks.clickhouse import ClickHouse, close_chdb, refresh_aggregates
    from tests.test_aggregates import events

    client = ClickHouse(f"chdb://{tmp_path / 'chdb'}", f"st_{uuid.uuid4().hex[:8]}")
    try:
        client.migrate()
        now = int(time.time() * 1000)
        rows = events(120, now_ms=now, hours=1)
        client.insert_events(rows)
        refresh_aggregates(client)
        text = "\n".join(usage_lines(client, rows[0]["event_time"] / 1000))
    finally:
        close_chdb()
    today = sum(1 for e in rows if e["event_time"] // 86_400_000 == rows[0]["event_time"] // 86_400_000)
    assert f"today{today:>21,}" in text and "top orgs today org-" in text


def test_freshness_p99_near_the_10_s_target_is_resolved_to_a_second():
    """98% of events 4.5 s fresh, 2% at 10.5 s: the true p99 is 10.5 s. Bounds at 10 and 20
    alone would interpolate it to 15 s."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from ops.metrics import FRESHNESS_SECONDS, PrometheusMetrics

    registry = CollectorRegistry()  # the flows' bounds, on a histogram of the test's own
    histogram = Histogram("gatewatch_freshness_seconds", "test", ["sink"],
                          buckets=FRESHNESS_SECONDS._upper_bounds[:-1], registry=registry)
    PrometheusMetrics(histogram).timings("gatewatch_freshness_seconds", [4.5] * 980 + [10.5] * 20,
                                         tags={"sink": "clickhouse"})
    snap = parse(generate_latest(registry).decode(), 0)
    rows = snap.buckets[("gatewatch_freshness_seconds", (("sink", "clickhouse"),))]
    assert 10.0 <= quantile(rows, 0.99) <= 11.0
